"""Every ``NNUNET_LK_*`` environment variable: its name, its parser and its default, in one place.

The trainers, ``ablate`` (which sets them per job), ``bench`` and the depthwise op read them through this
module, so what a job is given cannot drift from what the trainers read. Each is read when it is used (not
at import), so it can be set per process and flipped at run time."""
from __future__ import annotations

import os
import time
from typing import Optional

from .errors import UsageError

PREFIX = "NNUNET_LK_"
EPOCHS = "NNUNET_LK_EPOCHS"
ITERATIONS = "NNUNET_LK_ITERATIONS"
VAL_ITERATIONS = "NNUNET_LK_VAL_ITERATIONS"
SAVE_EVERY = "NNUNET_LK_SAVE_EVERY"
VAL_MIRRORING = "NNUNET_LK_VAL_MIRRORING"
THREADS = "NNUNET_LK_THREADS"
DEPTHWISE = "NNUNET_LK_DEPTHWISE"
SEED = "NNUNET_LK_SEED"

# nnUNetTrainer attribute -> the variable that overrides it (nnU-Net's own idiom is a class per budget,
# e.g. nnUNetTrainer_5epochs; one set of variables covers every backbone and loss variant)
BUDGET = {
    "num_epochs": EPOCHS,
    "num_iterations_per_epoch": ITERATIONS,
    "num_val_iterations_per_epoch": VAL_ITERATIONS,
    "save_every": SAVE_EVERY,
}
DEPTHWISE_MODES = ("fast", "torch")
IDLE_WINDOW_SECONDS = 0.25
_BOOLEAN = {"0": False, "false": False, "no": False, "off": False, "1": True, "true": True, "yes": True, "on": True}


def positive_int(name: str) -> Optional[int]:
    """The variable as a positive integer; None when unset or empty."""
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        parsed = int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not an integer; unset it or give a positive integer") from None
    if parsed < 1:
        raise UsageError(f"{name}={value!r} must be a positive integer")
    return parsed


def budget() -> dict:
    """nnUNetTrainer attribute -> value, for the budget variables that are set."""
    return {attribute: value for attribute, name in BUDGET.items() if (value := positive_int(name)) is not None}


def budget_env(epochs=None, iterations=None, val_iterations=None) -> dict:
    """The budget variables for a job (those given)."""
    given = ((EPOCHS, epochs), (ITERATIONS, iterations), (VAL_ITERATIONS, val_iterations))
    return {name: str(value) for name, value in given if value is not None}


def seed() -> Optional[int]:
    """``NNUNET_LK_SEED``: the training's seed (torch, numpy, Python and the data-augmentation workers); None when
    unset (nnU-Net's own behaviour: unseeded)."""
    value = os.environ.get(SEED)
    if value in (None, ""):
        return None
    try:
        parsed = int(value)
    except ValueError:
        raise UsageError(f"{SEED}={value!r} is not an integer; unset it or give an integer from 0 to 2**32 - 1") \
            from None
    if not 0 <= parsed < 2 ** 32:
        raise UsageError(f"{SEED}={value!r} is out of range; give an integer from 0 to 2**32 - 1")
    return parsed


def seed_env(value: Optional[int]) -> dict:
    """The seed variable for a job (empty when unseeded)."""
    return {} if value is None else {SEED: str(int(value))}


def validation_mirroring() -> bool:
    """``NNUNET_LK_VAL_MIRRORING=0``: the validation that ends nnUNetv2_train runs without test-time mirroring
    (default on, as in nnU-Net)."""
    value = os.environ.get(VAL_MIRRORING, "1").strip().lower()
    if value not in _BOOLEAN:
        raise UsageError(f"{VAL_MIRRORING}={value!r}: use 0 (off) or 1 (on, nnU-Net's default)")
    return _BOOLEAN[value]


def threads() -> Optional[int]:
    """``NNUNET_LK_THREADS``: torch's threads for nnunet-lk trainers, in training and in prediction."""
    return positive_int(THREADS)


def depthwise_mode() -> str:
    """``fast`` (default: our CPU depthwise op) or ``torch`` (PyTorch's own path everywhere)."""
    raw = os.environ.get(DEPTHWISE, "fast")
    mode = raw.strip().lower() or "fast"
    if mode not in DEPTHWISE_MODES:
        raise UsageError(f"{DEPTHWISE}={raw!r} is not valid; use 'fast' (the default) or 'torch' (PyTorch's own "
                         f"depthwise convolution everywhere), or unset it")
    return mode


_prediction_process = False
_idle_at_start: Optional[int] = None  # sampled once per prediction process


def mark_prediction_process() -> None:
    """Called at start-up of the stock prediction commands (and by predict-onnx): this process predicts."""
    global _prediction_process
    _prediction_process = True


def _idle_at_prediction_start() -> int:
    global _idle_at_start
    if _idle_at_start is None:
        _idle_at_start = idle_cores()
    return _idle_at_start


def cpu_threads(current: int, predicting: Optional[bool] = None) -> int:
    """Threads for a network nnU-Net is about to run on a CPU: ``NNUNET_LK_THREADS`` if set; else ``current``
    (what nnU-Net set: every core of the machine for -device cpu, 1 for CUDA prediction) capped at the cores
    this process may use, and in a prediction process at the cores idle right now. A thread on a busy core
    stalls every parallel op at its barrier: measured on 2 cores with one busy, a 2-thread LGMSNet forward took
    288 ms against 10.5 ms with one thread, and nnUNetv2_predict took 525 s against 21 s (idle: 2 threads
    9 ms, 1 thread 11 ms). Training runs for hours, so what is idle at its start says little: there, only
    the cap at the usable cores applies. ``predicting``: None = whether this process was marked as a
    prediction; the idle cores are sampled once per process, when first needed."""
    fixed = threads()
    if fixed is not None:
        return fixed
    if current <= 1:  # nothing to cap (CUDA prediction): no sampling
        return current
    predicting = _prediction_process if predicting is None else predicting
    return min(current, _idle_at_prediction_start() if predicting else usable_cores())


def _cpu_times() -> dict:
    """cpu number -> (idle + iowait ticks, all ticks) from /proc/stat (Linux)."""
    times = {}
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0].startswith("cpu") and fields[0][3:].isdigit():
                ticks = [int(x) for x in fields[1:]]
                times[int(fields[0][3:])] = (ticks[3] + ticks[4], sum(ticks))
    return times


def idle_cores(window: float = IDLE_WINDOW_SECONDS) -> int:
    """The usable cores that were idle more than half of the last ``window`` seconds (sampled now, while this
    process waits), at least 1; the usable cores where /proc/stat cannot be read. A load average would count
    the previous prediction of a sequence as load."""
    usable = usable_cores()
    try:
        cpus = os.sched_getaffinity(0)
        before = _cpu_times()
        time.sleep(window)
        after = _cpu_times()
    except (OSError, AttributeError, ValueError, IndexError):
        return usable
    idle = 0
    for cpu in cpus:
        if cpu in before and cpu in after:
            total = after[cpu][1] - before[cpu][1]
            idle += total <= 0 or (after[cpu][0] - before[cpu][0]) / total > 0.5
    return max(1, min(usable, idle))


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which ``multiprocessing.cpu_count()`` ignores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
