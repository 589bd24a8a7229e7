"""Activation checkpointing for any backbone built on the U skeleton (MedNeXt's ``checkpoint_style`` is the
precedent): the chosen modules keep only their inputs for backward and run their forward again during
backward. Outputs and gradients are the same as without it; training costs about one more forward.

Styles (the backbone option ``checkpoint_style``, shown by ``nnunet-lk list``):
- ``off``: nothing is recomputed (default);
- ``stages``: every encoder and decoder stage;
- ``blocks``: every module with weights one level inside a stage (its blocks, convolutions, up-sampling; not
  its norms): finer, so that the peak during backward is one block's activations, not one stage's.

Applied by wrapping the modules' ``forward`` on the instance: parameters, buffers and state-dict keys do not
change, so checkpoints load either way. Only in training mode with gradients enabled; evaluation, export and
tracing run the plain forward. BatchNorm statistics are restored after the recomputation, so running means and
variances advance once per step, as without checkpointing.
"""
from __future__ import annotations

import contextlib
import functools
from typing import List

import torch
import torch.nn as nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

CHECKPOINT_STYLES = ("off", "stages", "blocks")


@contextlib.contextmanager
def _norm_statistics_kept(module: nn.Module):
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


def _graph_capture() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


@contextlib.contextmanager
def _recomputation(module: nn.Module, function_modes):
    """The recomputed forward runs under the torch-function modes of the first one (as checkpoint keeps autocast;
    the memory estimate's AMP emulation is such a mode) and leaves BatchNorm's statistics as they were."""
    active = set(map(id, _get_current_function_mode_stack()))
    with contextlib.ExitStack() as stack:
        for mode in function_modes:
            if id(mode) not in active:
                stack.enter_context(mode)
        stack.enter_context(_norm_statistics_kept(module))
        yield


def _checkpointed_forward(module: nn.Module, forward, *args):
    if not (module.training and torch.is_grad_enabled()) or _graph_capture():
        return forward(*args)
    modes = list(_get_current_function_mode_stack())
    contexts = (lambda: (contextlib.nullcontext(), _recomputation(module, modes)))
    return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts)


def checkpoint_targets(net: nn.Module, style: str) -> List[nn.Module]:
    stages = list(net.encoder) + list(net.decoder.stages)
    if style == "stages":
        return stages
    if style == "blocks":
        return [block for stage in stages for block in (_blocks(stage) or [stage])]
    return []


def _blocks(stage: nn.Module) -> List[nn.Module]:
    """A stage's modules that hold weights, norms excepted (a norm alone saves as much as it frees; a
    parameter-free activation may work in place on its input, which a checkpoint must keep unchanged)."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
    return [m for m in stage.children() if not isinstance(m, norms) and any(True for _ in m.parameters())]


def apply_checkpointing(net: nn.Module, style: str) -> nn.Module:
    """Checkpoint ``net``'s stages or blocks (``CHECKPOINT_STYLES``); records the style on the network."""
    if style not in CHECKPOINT_STYLES:
        from ..errors import NetworkConfigError
        raise NetworkConfigError(f"checkpoint_style={style!r}; choose one of {', '.join(CHECKPOINT_STYLES)}")
    for module in checkpoint_targets(net, style):
        module.forward = functools.partial(_checkpointed_forward, module, module.forward)
    net.checkpoint_style = style
    return net
