"""Memory options every backbone built on the U skeleton has (``SKELETON_OPTIONS`` in the registry, shown by
``nnunet-lk list``). Both keep outputs, gradients, BatchNorm statistics and state dicts as they are; both act only
in training mode with gradients enabled (evaluation, export and tracing run the plain forward).

``memory_lean`` (``blocks.recompute.MEMORY_LEAN``; default "auto": on a GPU, not on a CPU): the backbone's blocks
take their lean forms: backward keeps the outputs of dense convolutions and products and recomputes the cheap
operations between them, block by block.

``checkpoint_style`` (MedNeXt's option is the precedent): the chosen modules keep only their inputs and run their
forward again during backward, about one more forward per step:
- ``off``: nothing more is recomputed (default);
- ``stages``: every encoder and decoder stage;
- ``blocks``: every module with weights one level inside a stage (its blocks, convolutions, up-sampling; not
  its norms): finer, so that the peak during backward is one block's activations, not one stage's.

Applied by setting flags, and for checkpointing by a ``forward`` bound to the instance (a deep copy binds it to the
copy): parameters, buffers and state-dict keys do not change, so checkpoints load either way.
"""
from __future__ import annotations

import types
from typing import List

import torch.nn as nn

from ..blocks.recompute import MEMORY_LEAN, LeanForm, recompute_all

CHECKPOINT_STYLES = ("off", "stages", "blocks")


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


def _checkpointed_forward(self: nn.Module, *inputs):
    return recompute_all(type(self).forward.__get__(self), *inputs, module=self)


def apply_memory_lean(net: nn.Module, setting) -> nn.Module:
    """Every block with a lean form takes it when ``setting`` (``MEMORY_LEAN``) says so."""
    if not any(setting is v or (isinstance(v, str) and setting == v) for v in MEMORY_LEAN):
        from ..errors import NetworkConfigError
        raise NetworkConfigError(f"memory_lean={setting!r}; choose one of {', '.join(map(str, MEMORY_LEAN))} "
                                 f"(auto: lean on a GPU, plain on a CPU)")
    for module in net.modules():
        if isinstance(module, LeanForm):
            module.memory_lean = setting
    net.memory_lean = setting
    return net


def apply_checkpointing(net: nn.Module, style: str) -> nn.Module:
    """Checkpoint ``net``'s stages or blocks (``CHECKPOINT_STYLES``); records the style on the network."""
    if style not in CHECKPOINT_STYLES:
        from ..errors import NetworkConfigError
        raise NetworkConfigError(f"checkpoint_style={style!r}; choose one of {', '.join(CHECKPOINT_STYLES)}")
    for module in checkpoint_targets(net, style):
        module.forward = types.MethodType(_checkpointed_forward, module)
    net.checkpoint_style = style
    return net
