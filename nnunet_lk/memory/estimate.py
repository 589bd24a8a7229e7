"""A network's training and inference memory from its shapes alone.

The network is built on the ``meta`` device and runs one whole training step there (``step.py``: forward with
deep supervision, nnU-Net's loss, backward, clipping, the optimiser step) under ``LiveStorageTracker``: no
compute, no memory, a fraction of a second. The estimate of a step is

    what stays allocated between steps (parameters, buffers, the optimiser's momentum, the batch and its targets)
  + the peak of what the step allocates (activations saved for backward, gradients, the largest temporaries).

It models the device-independent path (torch's own convolutions, contiguous tensors: what CUDA runs); with
``amp=True`` the tensors have the dtypes CUDA's autocast gives them (``AmpEmulation``). Backbones' lean block forms
are modelled as ``runs_on`` (default a GPU) runs them: "auto" is lean there, plain on a CPU. On the CPU it is
validated against torch's memory profiler on the same path (``nnunet-lk bench``): within a few per cent.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch

from ..blocks.recompute import lean_on
from .step import make_train_step
from .tracker import MiB, AmpEmulation, FusedAttention, LiveStorageTracker, module_state_bytes, storage_bytes


class MemoryEstimate(NamedTuple):
    persistent: int  # parameters, buffers, optimiser state, and the inputs
    step_peak: int   # the most the step allocates above that
    parameters: int
    amp: bool

    @property
    def total(self) -> int:
        return self.persistent + self.step_peak

    @property
    def total_mib(self) -> float:
        return self.total / MiB

    def as_dict(self) -> Dict[str, float]:
        return {"estimate_mib": round(self.total_mib, 1), "persistent_mib": round(self.persistent / MiB, 1),
                "step_peak_mib": round(self.step_peak / MiB, 1), "parameters_mib": round(self.parameters / MiB, 1),
                "amp": self.amp}


def _reference_path():
    """The fused attention kernel that real devices run. (Convolutions already take torch's own path: the CPU
    depthwise op runs on real CPU tensors only, so meta tensors get what CUDA runs.)"""
    return FusedAttention()


def _on_meta(build: Callable[[bool], torch.nn.Module], deep_supervision: bool,
             runs_on: str = "cuda") -> torch.nn.Module:
    with torch.device("meta"):
        net = build(deep_supervision)
    if hasattr(net, "cpu_channels_last"):
        net.cpu_channels_last = False
    for module in net.modules():  # the meta device would count as a GPU: settle "auto" for ``runs_on``
        if getattr(module, "memory_lean", None) == "auto":
            module.memory_lean = lean_on("auto", runs_on)
    return net


def estimate_training(build: Callable[[bool], torch.nn.Module], n_in: int, n_out: int, patch: Sequence[int],
                      batch: int, *, batch_dice: bool = False, amp: bool = False,
                      runs_on: str = "cuda") -> MemoryEstimate:
    """Peak memory of one training step of ``build(deep_supervision=True)`` at ``batch`` × ``patch``: the
    second step, so the optimiser's state exists before it starts, as in every step of a real training."""
    with _reference_path():
        net = _on_meta(build, True, runs_on)
        step = make_train_step(net, n_in, n_out, patch, batch, batch_dice=batch_dice, device="meta",
                               autocast=AmpEmulation if amp else contextlib.nullcontext)
        step.run()  # creates the momentum buffers
        step.optimizer.zero_grad(set_to_none=True)
        persistent = module_state_bytes(net, step.optimizer) + storage_bytes(step.inputs)
        with LiveStorageTracker() as tracker:
            step.run()
    return MemoryEstimate(persistent, tracker.peak, storage_bytes(net.parameters()), amp)


def estimate_inference(build: Callable[[bool], torch.nn.Module], n_in: int, patch: Sequence[int], *,
                       batch: int = 1, amp: bool = False) -> MemoryEstimate:
    """Peak memory of one eval-mode forward of one patch (nnU-Net's sliding window predicts one at a time)."""
    with _reference_path():
        net = _on_meta(build, False).eval()
        x = torch.empty(batch, n_in, *patch, device="meta")
        persistent = module_state_bytes(net) + storage_bytes([x])
        with torch.no_grad(), LiveStorageTracker() as tracker, (AmpEmulation() if amp else contextlib.nullcontext()):
            net(x)
    return MemoryEstimate(persistent, tracker.peak, storage_bytes(net.parameters()), amp)


def block_profile(build: Callable[[bool], torch.nn.Module], n_in: int, patch: Sequence[int], batch: int, *,
                  depth: int = 2, amp: bool = False) -> List[dict]:
    """Where a training forward's memory goes: for every module ``depth`` levels below the network, the bytes
    it leaves allocated after its forward (its output and what it saved for backward), largest first."""
    with _reference_path():
        net = _on_meta(build, True).train()
        x = torch.empty(batch, n_in, *patch, device="meta")
        tracker = LiveStorageTracker()
        retained: Dict[str, int] = {}
        kinds: Dict[str, str] = {}
        starts: Dict[str, int] = {}
        handles = []
        for name, module in net.named_modules():
            if name.count(".") + 1 != depth or not name:
                continue
            kinds[name] = type(module).__name__

            def pre(_m, _a, name=name):
                starts[name] = tracker.live

            def post(_m, _a, _o, name=name):
                retained[name] = retained.get(name, 0) + tracker.live - starts.pop(name)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        try:
            with tracker, (AmpEmulation() if amp else contextlib.nullcontext()):
                outputs = net(x)
            total = tracker.live
        finally:
            for h in handles:
                h.remove()
        del outputs
    rows = [{"module": name, "kind": kinds[name], "retained_mib": round(n / MiB, 2),
             "share": round(n / total, 4) if total else 0.0} for name, n in retained.items()]
    return sorted(rows, key=lambda r: -r["retained_mib"])


def trainer_builder(trainer_cls, plans_manager, configuration_manager, n_in: int, n_out: int) -> Callable:
    """``build(deep_supervision)`` exactly as the trainer builds its network for these plans."""
    return lambda deep_supervision: trainer_cls.build_network_architecture(
        plans_manager, configuration_manager, n_in, n_out, deep_supervision)


def estimate_for_plans(trainer_cls, plans_manager, configuration_manager, n_in: int, n_out: int, *,
                       batch: Optional[int] = None, amp: bool = False) -> MemoryEstimate:
    """The training estimate of ``trainer_cls``'s network at the configuration's own patch and batch."""
    cm = configuration_manager
    return estimate_training(trainer_builder(trainer_cls, plans_manager, cm, n_in, n_out), n_in, n_out,
                             list(cm.patch_size), int(batch or cm.batch_size), batch_dice=bool(cm.batch_dice), amp=amp)
