"""MS-LKSeg (Li et al., Biomed. Signal Process. Control 2025; docs/architectures.md §4.2-4.8, §5.5), with
structural re-parameterisation of the LD skip blocks at inference.

Topology (Fig. 1a): ``levels`` encoder levels of two MIS blocks (DyConv → MIE → MIDM), the first
of a level changing the width; an LD (RepLK) block on every skip; decoder levels of up-sampling,
concat [LD(skip), up] and (Conv-norm-ReLU) ×2; 1×1 head. Depth = min(levels, plan stages), per-axis
strides and the kernel anisotropy rule from the plans (§5.1).

The paper publishes no code, widths or counts (§4.1), so every open choice is a config key
(registered defaults in brackets; all [ASSUMED] unless marked otherwise):

- ``width`` [32]: C0, level widths C0·2^i (§4.2; 16 or 64 also plausible).
- ``levels`` [5]: paper depth (Fig. 1a, not assumed), capped by the plans' stage count.
- ``norm`` ["batch"]: norm after DyConv, in the decoder convs and LD's pre/PW norms ("instance" =
  nnU-Net's InstanceNorm); LD's re-parameterised branches always use BN (needed for folding).
- ``dyconv_kernels`` [4], ``dyconv_temperature`` [1.0], ``dyconv_reduction`` [4]: DyConv's K,
  softmax temperature and attention hidden width max(cin/reduction, 4) (§4.3).
- ``mie_kernels`` [(3, 5, 7, 9)] (Fig. 2, not assumed), ``mie_gn_groups`` [4] (SCSA default).
- ``midm_window`` [7], ``midm_heads`` [1] (SCSA defaults).
- ``ld_kernel`` [21], ``ld_small_kernel`` [3] (Fig. 3, not assumed), ``ld_dw_ratio`` [1].
- ``ld_kernel_3d`` [7]: the 3D large kernel (int or per-axis), a documented deviation (§5.5). A
  21³ depthwise kernel costs 9,261 MACs per voxel and channel: at Hippocampus 3d_fullres level 0
  (40×56×40, batch 7, C0=32) that is ~186 GMAC for one LD forward, and an im2col-based CPU conv
  would need ~100 GB of scratch. 7³ (343 taps, ~6.9 GMAC there) keeps a kernel well beyond the 3³
  branch and the decoder's 3³ convs, covers 1/6–1/8 of the level-0 field of view, and still fits
  Hippocampus 3d_fullres training in memory on a 24 GB CPU box. The anisotropy rule then sets the
  kernel to 1 on axes where the plans' kernel is 1 (e.g. 1×7×7 for a [1, 3, 3] stage); a per-axis
  value such as (5, 21, 21) gives a large in-plane / small through-plane form.
- ``downsample`` ["maxpool"] | "avgpool": pool with kernel = stride = the level's stride.
- ``upsample`` ["transpose"]: ConvTranspose(kernel = stride); "interpolate": (bi/tri)linear
  up-sampling by the stride + 1×1 conv.
- ``decoder_conv_bias`` [False]: bias in the decoder's 3×3 convs (they are followed by a norm).

Skip fusion is concat [LD(skip), up] (U-Net style); the head is PW(C0 → classes) = the skeleton's
last ``seg_layers`` entry.
"""
from __future__ import annotations

import torch.nn as nn

from ..blocks.mslkseg import LDSkips, MISBlock, MSLKUpStage, RepLKBlock
from ..blocks.ops import NORM_KINDS, as_tuple, avg_pool_op, conv_dim, max_pool_op
from .registry import register_backbone
from .unet import LKUNet, NetworkConfigError, UNetDecoder, resolve_level_strides

DOWNSAMPLE_KINDS = ("maxpool", "avgpool")
UPSAMPLE_KINDS = ("transpose", "interpolate")


def _check_choice(option: str, value, choices):
    if value not in choices:
        raise NetworkConfigError(f"mslkseg: unknown {option} {value!r}; choose one of {', '.join(choices)}")


def build_mslkseg(conv_op, input_channels: int, num_classes: int, *, strides=None, kernel_sizes=None,
                  patch_size=None, deep_supervision=False, levels: int = 5, width: int = 32, norm: str = "batch",
                  dyconv_kernels: int = 4, dyconv_temperature: float = 1.0, dyconv_reduction: int = 4,
                  mie_kernels=(3, 5, 7, 9), mie_gn_groups: int = 4, midm_window=7, midm_heads: int = 1,
                  ld_kernel=21, ld_small_kernel=3, ld_kernel_3d=7, ld_dw_ratio: int = 1,
                  downsample: str = "maxpool", upsample: str = "transpose", decoder_conv_bias: bool = False
                  ) -> LKUNet:
    """Config keys: see the module docstring."""
    dim = conv_dim(conv_op)
    _check_choice("norm", norm, NORM_KINDS)
    _check_choice("downsample", downsample, DOWNSAMPLE_KINDS)
    _check_choice("upsample", upsample, UPSAMPLE_KINDS)
    if width < 1:
        raise NetworkConfigError(f"mslkseg: width must be >= 1, got {width}")
    if levels < 2:
        raise NetworkConfigError(f"mslkseg: levels must be >= 2 (a U needs one skip), got {levels}")
    level_strides = resolve_level_strides("mslkseg", dim, levels, strides, patch_size)
    n = len(level_strides)
    plan_kernels = [as_tuple(k, dim) for k in kernel_sizes[:n]] if kernel_sizes is not None else [None] * n
    widths = [width * 2 ** i for i in range(n)]
    large_kernel = ld_kernel if dim == 2 else ld_kernel_3d
    mis_options = dict(norm=norm, dyconv_kernels=dyconv_kernels, dyconv_temperature=dyconv_temperature,
                       dyconv_reduction=dyconv_reduction, mie_kernels=mie_kernels, mie_gn_groups=mie_gn_groups,
                       midm_window=midm_window, midm_heads=midm_heads)
    pool = max_pool_op(conv_op) if downsample == "maxpool" else avg_pool_op(conv_op)

    encoder = []
    for i in range(n):
        cin = input_channels if i == 0 else widths[i - 1]
        blocks = [] if i == 0 else [pool(kernel_size=level_strides[i], stride=level_strides[i])]
        blocks += [MISBlock(conv_op, cin, widths[i], plan_kernel=plan_kernels[i], **mis_options),
                   MISBlock(conv_op, widths[i], widths[i], plan_kernel=plan_kernels[i], **mis_options)]
        encoder.append(nn.Sequential(*blocks))
    skips = LDSkips([RepLKBlock(conv_op, widths[i], large_kernel=large_kernel, small_kernel=ld_small_kernel,
                                dw_ratio=ld_dw_ratio, norm=norm, plan_kernel=plan_kernels[i])
                     for i in range(n - 1)])
    ups = [MSLKUpStage(conv_op, widths[i + 1], widths[i], level_strides[i + 1], norm=norm, upsample=upsample,
                       conv_bias=decoder_conv_bias, plan_kernel=plan_kernels[i])
           for i in reversed(range(n - 1))]
    decoder = UNetDecoder(ups, [widths[i] for i in reversed(range(n - 1))], conv_op, num_classes,
                          deep_supervision=deep_supervision)
    # channels-last end to end (bench --variants, README): 2D 3-12% faster, 3D eval 6% slower
    return LKUNet(encoder, decoder, level_strides, skip_fusion=skips, backbone="mslkseg",
                  cpu_channels_last=dim == 2)


_PAPER = "MS-LKSeg, Li et al., Biomed. Signal Process. Control 2025, doi 10.1016/j.bspc.2025.108635"
# the paper gives no optimiser or schedule and there is no code: no paper recipe, none invented
register_backbone(
    "mslkseg", build_mslkseg, trainer="MSLKSeg", dims=(2, 3), paper=_PAPER,
    description="MS-LKSeg: MIS (DyConv-MIE-MIDM) x2 encoder, re-parameterised RepLK (LD) skips, conv x2 "
                "decoder; no official code, open choices are config keys ([ASSUMED] defaults)")
