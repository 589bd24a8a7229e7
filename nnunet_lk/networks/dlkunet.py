"""DLKUNet (Zhu et al., Int. J. Imaging Syst. Technol. 2025): EBlock encoder levels with MaxPool,
DFB decoder levels, 1×1 head. S/M/L = 3/4/5 levels at C = 96 (docs/architectures.md §1.2)."""
from __future__ import annotations

import torch.nn as nn

from ..blocks.dlkunet import DEFAULT_GATE_INIT, GATE_INITS, DFBUp, EBlock
from ..blocks.ops import as_tuple, conv_dim, max_pool_op
from ..errors import NetworkConfigError
from .registry import Recipe, register_backbone
from .unet import LKUNet, UNetDecoder, resolve_level_strides


class _DownLevel(nn.Sequential):
    """MaxPool with kernel = stride = the level's stride, then an EBlock."""


def build_dlkunet(conv_op, input_channels: int, num_classes: int, *, strides=None, kernel_sizes=None,
                  patch_size=None, deep_supervision=False, levels: int, width: int = 96, norm: str = "batch",
                  pad_input: bool = True, gate_init: str = DEFAULT_GATE_INIT) -> LKUNet:
    """``pad_input=False`` keeps the official behaviour for sizes not divisible by the strides (floor
    pooling + the DFB's pad-to-skip); the default pads to the total stride inside ``forward`` so
    deep-supervision outputs line up with nnU-Net's targets for any patch. ``gate_init``: how the
    large-kernel attention's gate starts (``blocks.dlkunet.GATE_INITS``): "identity", the default, is our departure
    from the official initialisation, which "official" keeps (docs/architectures.md §1.10)."""
    if gate_init not in GATE_INITS:
        raise NetworkConfigError(f"dlkunet: gate_init={gate_init!r}; choose one of {', '.join(GATE_INITS)} "
                                 f"(\"official\": the paper's code's initialisation)")
    dim = conv_dim(conv_op)
    name = f"dlkunet({levels} levels)"
    level_strides = resolve_level_strides(name, dim, levels, strides, patch_size)
    n = len(level_strides)
    plan_kernels = [as_tuple(k, dim) for k in kernel_sizes[:n]] if kernel_sizes is not None else [None] * n
    widths = [width * 2 ** i for i in range(n)]

    encoder = [EBlock(conv_op, input_channels, widths[0], norm=norm, plan_kernel=plan_kernels[0], gate_init=gate_init)]
    for i in range(1, n):
        stride = level_strides[i]
        encoder.append(_DownLevel(max_pool_op(conv_op)(kernel_size=stride, stride=stride),
                                  EBlock(conv_op, widths[i - 1], widths[i], norm=norm, plan_kernel=plan_kernels[i],
                                         gate_init=gate_init)))
    ups = [DFBUp(conv_op, widths[i + 1], widths[i], level_strides[i + 1], norm=norm, plan_kernel=plan_kernels[i],
                 gate_init=gate_init)
           for i in reversed(range(n - 1))]
    decoder = UNetDecoder(ups, [widths[i] for i in reversed(range(n - 1))], conv_op, num_classes,
                          deep_supervision=deep_supervision)
    # contiguous: channels-last end to end measured no faster (bench --variants, README)
    return LKUNet(encoder, decoder, level_strides, size_multiple=None if pad_input else (1,) * dim,
                  backbone="dlkunet")


_PAPER = "DLKUNet, Zhu et al., Int. J. Imaging Syst. Technol. 35(1) e70035, 2025"
# Adam, wd 1e-5, lr 1e-3 (paper §4.3); StepLR(20 epochs, 0.9) over 400 epochs in the official code (the paper's
# "reduce by 90% every 20 epochs" is the code's x0.9): a step every 20/400 of training. The paper trains 2D only;
# the same recipe in 3D (docs/architectures.md §6.1).
PAPER_RECIPE = Recipe("adam", 1e-3, 1e-5, "step", step_every=20 / 400, gamma=0.9,
                      source="DLKUNet paper §4.3 (Adam, wd 1e-5, lr 1e-3); official code StepLR(20, 0.9), 400 epochs")
_RECIPES = {2: PAPER_RECIPE, 3: PAPER_RECIPE}
register_backbone("dlkunet_s", build_dlkunet, trainer="DLKUNetS", levels=3, paper=_PAPER, paper_recipes=_RECIPES,
                  description="DLKUNet-S: 3 levels, C=96 (1,131,379 params at 2D 1->9)")
register_backbone("dlkunet_m", build_dlkunet, trainer="DLKUNetM", levels=4, paper=_PAPER, paper_recipes=_RECIPES,
                  description="DLKUNet-M: 4 levels, C=96 (4,494,451 params at 2D 1->9)")
register_backbone("dlkunet_l", build_dlkunet, trainer="DLKUNetL", levels=5, paper=_PAPER, paper_recipes=_RECIPES,
                  description="DLKUNet-L: 5 levels, C=96 (17,708,659 params at 2D 1->9)")
