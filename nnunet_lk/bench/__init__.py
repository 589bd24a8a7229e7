"""``nnunet-lk bench``: every backbone and stock nnU-Net built from the same nnU-Net plans, measured side
by side.

For one dataset's plans and configuration, each network is built exactly as training builds it (the
trainer class's ``build_network_architecture``) and measured (``measure``): parameters, MACs (torch's FLOP
counter), eval-mode forward latency per patch (batch 1), one training step at the plans' batch, and memory.
Each backbone can be measured in several variants (``--variants``, ``measure.VARIANTS``): as shipped, with
torch's own depthwise path (``torch``: the speed before our depthwise op), with our depthwise op on contiguous
tensors (``contiguous``) or with the whole network channels-last (``channels_last``), one after the other,
each in a fresh process, so that speed-ups are read from one run.
``report`` writes the table and checks the speed targets on the figures.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from .. import settings
from ..errors import UsageError
from ..nnunet_io import STOCK_TRAINER, default_trainers, resolve_trainer
from ..plans import plans_context
from .measure import VARIANTS, measure_network
from .report import fmt_count, markdown_table, write_outputs  # noqa: F401  (the CLI and tests use them here)

# figures compared (smaller is better for all): ratio = value / stock's; speed-up = torch path's / value
SPEEDUP_KEYS = ("latency_ms_median", "latency_unfused_ms_median", "train_step_ms_median")
RATIO_KEYS = ("params", "params_without_ds_heads", "macs", "latency_ms_median", "latency_unfused_ms_median",
              "train_step_ms_median", "inference_memory_mib", "train_memory_mib", "train_peak_mib",
              "inference_peak_mib", "train_estimate_mib", "inference_estimate_mib")


# ---- trainers and plans ---------------------------------------------------------------------------------
def precheck(trainer: str, patch_size: Sequence[int]) -> Optional[str]:
    """Why a trainer cannot build this configuration (None if it may): cheap, before any process starts."""
    from ..networks import get_backbone
    cls = resolve_trainer(trainer)
    backbone = getattr(cls, "backbone", None)
    if backbone is None:
        return None
    return get_backbone(backbone).dimension_problem(len(patch_size))


def build_network(trainer: str, plans: dict, dataset_json: dict, configuration: str, deep_supervision: bool):
    pm, cm, n_in, n_out = plans_context(plans, dataset_json, configuration)
    cls = resolve_trainer(trainer)
    return cls.build_network_architecture(pm, cm, n_in, n_out, deep_supervision), (pm, cm, n_in, n_out)


# ---- the whole run --------------------------------------------------------------------------------------
def run_bench(plans: dict, dataset_json: dict, configuration: str, *, trainers: Optional[Sequence[str]] = None,
              batch: Optional[int] = None, warmup: int = 2, repeats: int = 5, device: str = "cpu",
              threads: int = 0, isolate: bool = True, dataset: str = "", plans_name: str = "",
              timeout: Optional[float] = None, variants: Sequence[str] = ("shipped",), profile: bool = False,
              log=print) -> dict:
    """Measure stock nnU-Net and every trainer's network in each variant; returns the results record (see
    ``report.write_outputs``)."""
    import torch
    import nnunetv2

    if repeats < 0 or warmup < 0:
        raise UsageError(f"--repeats and --warmup must be >= 0 (got {repeats}, {warmup}); --repeats 0 measures "
                         f"memory only")
    if batch is not None and batch < 1:
        raise UsageError(f"--batch must be >= 1, got {batch}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise UsageError(f"--variants {' '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    _, cm, n_in, n_out = plans_context(plans, dataset_json, configuration)
    names = list(trainers) if trainers else default_trainers()
    names = [STOCK_TRAINER] + [t for t in names if t != STOCK_TRAINER]
    # the baseline once, as nnU-Net runs it (it has no depthwise convs); every backbone in every variant
    jobs = [(STOCK_TRAINER, "shipped")] + [(t, v) for t in names[1:] for v in variants]
    results = []
    for i, (trainer, variant) in enumerate(jobs, 1):
        label = trainer if len(variants) == 1 or trainer == STOCK_TRAINER else f"{trainer} [{variant}]"
        reason = precheck(trainer, cm.patch_size)
        if reason is not None:
            log(f"[{i}/{len(jobs)}] {label}: skipped ({reason})")
            results.append({"trainer": trainer, "variant": variant, "status": "skipped", "reason": reason})
            continue
        log(f"[{i}/{len(jobs)}] {label}: measuring ({'fresh process' if isolate else 'in process'}) ...")
        job = {"trainer": trainer, "variant": variant, "plans": plans, "dataset_json": dataset_json,
               "configuration": configuration, "batch": batch, "warmup": warmup, "repeats": repeats,
               "device": device, "threads": threads, "profile": profile}
        start = time.perf_counter()
        r = _measure_in_subprocess(job, timeout) if isolate else _measure_here(job)
        if r["status"] == "ok":
            timing = (f"latency {r['latency_ms_median']:.2f} ms, train step {r['train_step_ms_median']:.1f} ms, "
                      if "train_step_ms_median" in r else "")
            log(f"    {fmt_count(r['params'])} params, {r['macs'] / 1e9:.3f} GMACs, {timing}train peak "
                f"{r['train_peak_mib']:.0f} MiB (estimate {r['train_estimate_mib']:.0f}) "
                f"({time.perf_counter() - start:.0f} s)")
        else:
            log(f"    {r['status']}: {r['reason'].splitlines()[-1] if r['reason'] else ''}")
        results.append(r)
    add_ratios(results)
    return {
        "dataset": dataset, "configuration": configuration, "plans": plans_name or plans.get("plans_name", ""),
        "patch_size": list(cm.patch_size), "plans_batch": cm.batch_size, "train_batch": batch or cm.batch_size,
        "latency_batch": 1, "input_channels": n_in, "output_channels": n_out, "warmup": warmup, "repeats": repeats,
        "device": device, "device_name": _device_name(device), "threads": threads or torch.get_num_threads(),
        "amp": device.startswith("cuda"), "isolated_processes": isolate, "variants": list(variants),
        "torch": torch.__version__, "nnunetv2": getattr(nnunetv2, "__version__", _dist_version("nnunetv2")),
        "python": platform.python_version(), "baseline": STOCK_TRAINER, "results": results,
    }


def add_ratios(results: List[dict]) -> None:
    """Each figure's ratio to stock nnU-Net (the first result), and each variant's speed-up over the same
    trainer measured with torch's depthwise path."""
    stock = results[0] if results and results[0]["status"] == "ok" else None
    torch_rows = {r["trainer"]: r for r in results if r["status"] == "ok" and r.get("variant") == "torch"}
    for r in results:
        if r["status"] != "ok":
            continue
        if stock is not None:
            r["ratio_to_stock"] = {k: round(r[k] / stock[k], 4) for k in RATIO_KEYS
                                   if k in r and k in stock and stock[k]}
            if "latency_unfused_ms_median" in r and stock.get("latency_ms_median"):
                r["ratio_to_stock"]["latency_unfused_ms_median"] = round(
                    r["latency_unfused_ms_median"] / stock["latency_ms_median"], 4)
        old = torch_rows.get(r["trainer"])
        if old is not None:
            r["speedup_vs_torch_path"] = {k: round(old[k] / r[k], 4) for k in SPEEDUP_KEYS
                                            if r.get(k) and old.get(k)}


def _variant_environment(variant: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != settings.DEPTHWISE}
    env.update(VARIANTS[variant][0])
    return env


def _measure_here(job: dict) -> dict:
    saved = os.environ.get(settings.DEPTHWISE)
    os.environ.pop(settings.DEPTHWISE, None)
    os.environ.update(VARIANTS[job.get("variant", "shipped")][0])  # the op reads it at every call
    try:
        return measure_network(job)
    finally:
        os.environ.pop(settings.DEPTHWISE, None)
        if saved is not None:
            os.environ[settings.DEPTHWISE] = saved


def _measure_in_subprocess(job: dict, timeout: Optional[float]) -> dict:
    try:
        proc = subprocess.run([sys.executable, "-m", "nnunet_lk.bench.measure"], input=json.dumps(job),
                              capture_output=True, text=True, timeout=timeout,
                              env=_variant_environment(job.get("variant", "shipped")))
    except subprocess.TimeoutExpired:  # one slow network must not lose the others' figures
        return {"trainer": job["trainer"], "variant": job.get("variant", "shipped"), "status": "timeout",
                "reason": f"not measured within --timeout {timeout:g} s; raise --timeout or lower --repeats/--batch"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"trainer": job["trainer"], "variant": job.get("variant", "shipped"), "status": "error",
                "reason": f"measuring process exited {proc.returncode}: {tail.strip()}"}
    return json.loads(lines[-1])


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


