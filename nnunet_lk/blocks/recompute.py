"""Recomputation for memory: what a block keeps for backward, and what it computes again.

``recompute_cheap(fn, *inputs, module=m)`` runs ``fn`` so that backward finds the outputs of its dense operations
(convolutions with one group, matrix products, attention; at least ``MIN_KEPT_REDUCTION`` multiply-accumulates per
output element) kept as usual, and recomputes everything else from the inputs: depthwise and grouped convolutions,
narrow projections, norms, activations, element-wise products, concatenations. Those are a small share of the
compute and most of a light network's activation memory. Outputs and gradients are the
same as running ``fn`` plainly (torch's selective activation checkpointing; tests/test_recompute.py).

``recompute_all(fn, *inputs, module=m)`` keeps only the inputs and recomputes the whole of ``fn`` (plain
activation checkpointing).

Either way BatchNorm's running statistics advance once per step, as without recomputation: the recomputed forward
restores them. Recomputation runs only in training mode with gradients enabled; evaluation, export and tracing run
``fn`` plainly.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch
import torch.nn as nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
_CONVOLUTIONS = {_aten.convolution.default, _aten._convolution.default, _aten.convolution_overrideable.default}
_PRODUCTS = {_aten.mm.default, _aten.bmm.default, _aten.addmm.default, _aten.baddbmm.default,
             _aten._scaled_dot_product_flash_attention_for_cpu.default,
             _aten._scaled_dot_product_flash_attention.default,
             _aten._scaled_dot_product_efficient_attention.default,
             _aten._scaled_dot_product_cudnn_attention.default}
# an output kept for backward saves recomputing its multiply-accumulates: ``reduction`` of them per element. Below
# this many it costs about what the element-wise work around it costs, and is recomputed too (LM-Net's narrow token
# projections: 12 channels in)
MIN_KEPT_REDUCTION = 32


def _reduction(op, args) -> int:
    """Multiply-accumulates per output element of a dense convolution or a product (0 for anything else, grouped
    convolutions included: depthwise convs are what the lean forms recompute)."""
    if op in _CONVOLUTIONS:
        if int(args[8]) != 1:  # groups
            return 0
        weight, stride, transposed = args[1], args[3], bool(args[6])
        per_tap = weight.shape[0] if transposed else weight.shape[1]  # transposed: (cin, cout/groups, *k)
        taps = math.prod(weight.shape[2:]) // (math.prod(stride) if transposed else 1)
        return int(per_tap * max(taps, 1))
    if op in _PRODUCTS:
        if op in (_aten.addmm.default, _aten.baddbmm.default):
            return int(args[1].shape[-1])
        if op in (_aten.mm.default, _aten.bmm.default):
            return int(args[0].shape[-1])
        return 1 << 30  # attention: a reduction over the whole sequence
    return 0


def keep_dense_outputs(_ctx, op, *args, **kwargs):
    """The selective-checkpointing policy: keep the outputs of dense convolutions and products that do at least
    ``MIN_KEPT_REDUCTION`` multiply-accumulates per element, recompute the rest (a kept output must not be changed
    in place afterwards)."""
    keep = _reduction(op, args) >= MIN_KEPT_REDUCTION
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


class _Marks(threading.local):
    depth = 0


_marks = _Marks()


@contextlib.contextmanager
def kept():
    """Inside a ``recompute_cheap(..., policy=keep_marked_outputs)`` region: the outputs of the operations run in
    this block are kept for backward, and nothing else is (a block that knows which outputs backward needs)."""
    _marks.depth += 1
    try:
        yield
    finally:
        _marks.depth -= 1


def keep_marked_outputs(_ctx, op, *args, **kwargs):
    """The policy for blocks that mark what to keep with ``kept()``."""
    return CheckpointPolicy.MUST_SAVE if _marks.depth else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def norm_statistics_kept(module: nn.Module):
    """Undo what a recomputed forward does to BatchNorm's running statistics."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    with torch.no_grad():
        saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
                 for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for b, s in zip((x for x in (m.running_mean, m.running_var, m.num_batches_tracked) if x is not None),
                                buffers):
                    b.copy_(s)


def graph_capture() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def recomputation_applies(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled() and not graph_capture()


@contextlib.contextmanager
def _recomputation(module: nn.Module, function_modes, inner=contextlib.nullcontext()):
    """The recomputed forward runs under the torch-function modes of the first one (as checkpoint keeps autocast;
    the memory estimate's AMP emulation is such a mode) and leaves BatchNorm's statistics as they were."""
    active = set(map(id, _get_current_function_mode_stack()))
    with contextlib.ExitStack() as stack:
        for mode in function_modes:
            if id(mode) not in active:
                stack.enter_context(mode)
        stack.enter_context(norm_statistics_kept(module))  # before ``inner``: its clones are not recomputed ops
        stack.enter_context(inner)
        yield


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ``memory_lean``: True, False, or "auto": lean on an accelerator (where memory is short and a compiled graph
# recomputes at no extra dispatch cost), plain on a CPU (where memory is ample and eager recomputation costs
# 1.2-1.4x per training step, benchmarks/results/lean_time.md); the meta device, the estimate's, counts as one
MEMORY_LEAN = ("auto", True, False)


class LeanForm:
    """A block with a memory-lean form: the same outputs and gradients from less memory kept for backward
    (the backbones' ``memory_lean`` option sets ``memory_lean`` on every such block)."""
    memory_lean = False


def lean_on(setting, device_type: str) -> bool:
    """Whether the ``memory_lean`` setting means lean forms on a device of this type."""
    return setting is True or (setting == "auto" and device_type != "cpu")


def lean_applies(module: nn.Module, *inputs) -> bool:
    """Whether ``module`` (a ``LeanForm``) runs its lean form on ``inputs`` now."""
    setting = getattr(module, "memory_lean", False)
    if setting is False or not recomputation_applies(module):
        return False
    return setting is True or any(lean_on(setting, t.device.type) for t in inputs if isinstance(t, torch.Tensor))


class _RegionDepth(threading.local):
    depth = 0


_regions = _RegionDepth()


class LeanRegion(LeanForm):
    """A block whose lean form is its whole call under ``recompute_cheap``. A region inside another runs plainly:
    the outer one recomputes it (in its first forward and in its recomputation alike, so both save the same)."""

    def __call__(self, *inputs, **kwargs):
        if kwargs or _regions.depth or not lean_applies(self, *inputs):
            return super().__call__(*inputs, **kwargs)
        return _selective(self._region_call, *inputs, module=self)

    def _region_call(self, *inputs):
        _regions.depth += 1
        try:
            return super().__call__(*inputs)
        finally:
            _regions.depth -= 1


def recompute_all(fn, *inputs, module: nn.Module):
    """``fn(*inputs)`` keeping only its inputs for backward (``module``: whose norms ``fn`` runs)."""
    if not recomputation_applies(module):
        return fn(*inputs)
    if _compiling():  # a functional graph: statistics advance once anyway
        return checkpoint(fn, *inputs, use_reentrant=False)
    modes = list(_get_current_function_mode_stack())
    contexts = (lambda: (contextlib.nullcontext(), _recomputation(module, modes)))
    return checkpoint(fn, *inputs, use_reentrant=False, context_fn=contexts)


def recompute_cheap(fn, *inputs, module: nn.Module, policy=keep_dense_outputs):
    """``fn(*inputs)`` keeping its inputs and the outputs ``policy`` chooses (by default: its dense ones) for backward,
    recomputing the rest."""
    if not recomputation_applies(module):
        return fn(*inputs)
    return _selective(fn, *inputs, module=module, policy=policy)


def _selective(fn, *inputs, module: nn.Module, policy=keep_dense_outputs):
    if _compiling():
        # compiled, the partitioner applies the policy to a functional graph (statistics advance once anyway), where
        # no block marks its operations: the dense outputs are kept
        return checkpoint(fn, *inputs, use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts, keep_dense_outputs))
    modes = list(_get_current_function_mode_stack())

    def contexts():
        keep, recompute = create_selective_checkpoint_contexts(policy)
        return keep, _recomputation(module, modes, recompute)
    return checkpoint(fn, *inputs, use_reentrant=False, context_fn=contexts)
