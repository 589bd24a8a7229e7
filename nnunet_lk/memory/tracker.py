"""Counting tensor memory: live storages under a dispatch mode (real, meta or fake tensors alike), the peak of
one step from torch's own memory profiler (CPU), and CUDA's allocator statistics.

- ``LiveStorageTracker`` sees every tensor an aten op returns, counts its storage once and uncounts it when
  the storage is freed (a weak reference's finaliser). Run on the ``meta`` device it costs no compute and no
  memory: that is how the estimate works (``estimate.py``). Views share their base's storage, so they cost
  nothing; in-place ops return an existing storage.
- ``profiled_peak`` measures one real step on the CPU with ``torch.profiler``'s memory events (every
  allocation and free of torch's CPU allocator, in order): an independent measurement to validate the estimate
  against. oneDNN's private scratch buffers are not torch allocations and are not seen by either.
- ``AmpEmulation`` applies CUDA autocast's casting policy at the level of torch functions, above autograd, so
  that a meta-device run saves fp16 tensors for backward where CUDA's autocast would (autocast itself does not
  run on meta tensors).
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

MiB = 2 ** 20


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a parameter and its views count once)."""
    seen, total = {}, 0  # the storages stay referenced here, so no id is reused while counting
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = (storage.device.type, storage.data_ptr() if storage.device.type != "meta" else id(storage))
        if key not in seen:
            seen[key] = storage
            total += storage.nbytes()
    return total


def module_state_bytes(module: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """What stays allocated between steps: parameters, buffers and the optimiser's state."""
    tensors = list(module.parameters()) + list(module.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return storage_bytes(tensors)


class LiveStorageTracker(TorchDispatchMode):
    """Live bytes of the storages created while active, and their peak. ``on_change`` (optional) is called
    with the live count after each op (the per-block profile samples it)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: Dict[int, int] = {}

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._storages:
            return
        n = storage.nbytes()
        self._storages[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._storages.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def measured_peak(run: Callable[[], object], module: torch.nn.Module, optimizer=None, inputs=()) -> int:
    """What a real CPU step holds at its peak: what stays allocated between steps (weights, optimiser state,
    inputs) plus the peak torch's profiler records while ``run`` runs; the quantity ``estimate`` estimates."""
    return module_state_bytes(module, optimizer) + storage_bytes(inputs) + profiled_peak(run)


def profiled_peak(step: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated above the start while ``step`` runs, from torch.profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and str(e.device_type()).lower().endswith(device)]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# CUDA autocast's policy (torch/csrc/autograd/autocast_mode.cpp) for the functions our networks and nnU-Net's
# loss call: these run in float16 ...
_FP16_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                   F.linear, F.scaled_dot_product_attention, torch.matmul, torch.mm, torch.bmm, torch.baddbmm,
                   torch.addmm, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.bmm}
# ... these in float32 ...
_FP32_FUNCTIONS = {F.softmax, F.log_softmax, F.cross_entropy, F.nll_loss, F.layer_norm, F.group_norm,
                   torch.softmax, torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax,
                   torch.exp, torch.log, torch.pow, torch.Tensor.exp, torch.Tensor.log, torch.Tensor.pow,
                   torch.sum, torch.Tensor.sum, torch.prod, torch.cumsum, F.binary_cross_entropy_with_logits}
# ... and these in the widest floating type among their inputs
_PROMOTE_FUNCTIONS = {torch.cat, torch.stack, torch.addcmul, torch.addcdiv}


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


class AmpEmulation(TorchFunctionMode):
    """CUDA autocast (float16) for tensors on any device, as torch functions: casts happen above autograd, so
    what backward saves has the dtype autocast would give it. Only the policy of the functions listed above."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FP16_FUNCTIONS:
            args, kwargs = tree_map(lambda v: _cast(v, torch.float16), (args, kwargs))
        elif func in _FP32_FUNCTIONS:
            args, kwargs = tree_map(lambda v: _cast(v, torch.float32), (args, kwargs))
        elif func in _PROMOTE_FUNCTIONS:
            floats = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if floats and len({t.dtype for t in floats}) > 1:
                wide = torch.float32 if any(t.dtype == torch.float32 for t in floats) else floats[0].dtype
                args, kwargs = tree_map(lambda v: _cast(v, wide), (args, kwargs))
        return func(*args, **kwargs)


class FusedAttention(TorchFunctionMode):
    """On the meta device, scaled-dot-product attention as the fused kernel that CPU and CUDA run (it saves the
    log-sum-exp, not the attention matrix); meta tensors would otherwise take the math path, which materialises
    the whole matrix and overstates attention's memory by orders of magnitude."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args
            options = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), rest), **kwargs)
            if q.device.type == "meta" and options.get("attn_mask") is None and not options.get("dropout_p"):
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, 0.0, bool(options.get("is_causal", False)), scale=options.get("scale"))[0]
        return func(*args, **kwargs)
