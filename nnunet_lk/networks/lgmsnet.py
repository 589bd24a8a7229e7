"""LGMSNet (Dong et al., ECAI 2025, arXiv 2508.15476) and its 3D form LGMSNet-3D: LMS blocks at high
resolution, GMS blocks at low resolution, CMUNeXt up/fusion decoder (docs/architectures.md §2.2; plans rules
§5.3). One registered name, ``lgmsnet``, for 2D and 3D: the official 3D network (§2.5) has the same
widths, splits and layout as the 2D one and only changes its norms, which follow ``conv_op`` here.

Level roles for S levels: encoder 0..S-3 = LMS levels (LMS at the incoming width, then a PW
projection), S-2 and S-1 = GMS levels. Decoder level S-2 = GMS(2C -> C), level S-3 = fusion_conv +
GMS, levels below = fusion_conv only. S = 5 with widths [16, 32, 64, 128, 128] is the paper's model.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch.nn as nn

from ..blocks import lgms
from ..blocks.ops import as_tuple, conv_dim, max_pool_op
from .registry import register_backbone
from .unet import LKUNet, NetworkConfigError, UNetDecoder, cumulative_strides, resolve_level_strides

PAPER_LEVELS = 5
NATIVE_WIDTHS = (16, 32, 64, 128, 128)
WIDTH_CAP = 128  # the paper never goes wider; deeper plans append 128s (§5.3)
NORM_MODES = ("faithful", "batch", "instance")


def native_widths(levels: int) -> List[int]:
    """The paper's widths, truncated for fewer levels, extended with 128 for more (§5.3)."""
    return list(NATIVE_WIDTHS[:levels]) + [WIDTH_CAP] * max(0, levels - len(NATIVE_WIDTHS))


def resolve_norms(norm: str, dim: int) -> tuple:
    """(conv_norm, branch_norm) for the blocks. ``faithful``: the official choices, BN everywhere in 2D;
    InstanceNorm affine=False in the conv helpers but BN in the GMS conv branch in 3D (§2.5).
    ``batch``: BN everywhere. ``instance``: nnU-Net's affine InstanceNorm everywhere (§5.1 `nnunet`
    mode). GroupNorm (LMS) and LayerNorm (transformer) are kept in every mode."""
    if norm == "faithful":
        return ("batch", "batch") if dim == 2 else ("instance_plain", "batch")
    if norm in ("batch", "instance"):
        return norm, norm
    raise NetworkConfigError(f"lgmsnet: unknown norm {norm!r}; choose one of {', '.join(NORM_MODES)}")


def unfold_size_multiple(level_strides) -> tuple:
    """Per-axis input multiple so every GMS level keeps its 2-wide parity unfold on every axis the
    network downsamples: 2 x the total stride there (32 at the paper's depth); axes the plans never
    downsample are not padded (the unfold then uses patch 1 on them if their size is odd)."""
    total = cumulative_strides(level_strides)[-1]
    return tuple(2 * t if t > 1 else 1 for t in total)


class LGMSEncoderLevel(nn.Sequential):
    """[stem or max-pool] -> LMS block + PW projection, or -> GMS block."""


def build_lgmsnet(conv_op, input_channels: int, num_classes: int, *, strides=None, kernel_sizes=None,
                  patch_size=None, deep_supervision=False, levels: Optional[int] = None,
                  widths: Optional[Sequence[int]] = None, norm: str = "faithful",
                  pad_to_unfold: bool = True) -> LKUNet:
    """Build LGMSNet for 2D or 3D plans.

    ``levels``: None = every stage the plans give (5 without plans), else at most that many.
    ``widths``: None = native widths (§5.3); else one width per level (multiples of 4).
    ``norm``: faithful | batch | instance (see :func:`resolve_norms`).
    ``pad_to_unfold``: pad inside forward to 2 x the total stride per downsampled axis (the paper's
    "divisible by 32"), so the GMS levels always use the sparse 2-wide unfold; False pads to the
    total stride only (odd bottleneck axes then attend densely).
    """
    if not (isinstance(conv_op, type) and issubclass(conv_op, (nn.Conv2d, nn.Conv3d))):
        raise NetworkConfigError(f"lgmsnet: conv_op must be nn.Conv2d or nn.Conv3d, got {conv_op!r}; "
                                 f"LGMSNet exists only as a 2D and a 3D network")
    dim = conv_dim(conv_op)
    if levels is not None and (not isinstance(levels, int) or levels < 2):
        raise NetworkConfigError(f"lgmsnet: levels={levels!r}; need an integer >= 2 (two GMS levels), or None "
                                 f"to follow the plans")
    wanted = levels if levels is not None else (len(strides) if strides is not None else PAPER_LEVELS)
    level_strides = resolve_level_strides("lgmsnet", dim, wanted, strides, patch_size)
    n = len(level_strides)
    if n < 2:
        raise NetworkConfigError(
            f"lgmsnet: the plans give {n} stage(s) but LGMSNet needs at least 2 resolution levels (its two GMS "
            f"levels); use a configuration whose plans have at least 2 stages")
    if widths is None:
        widths = native_widths(n)
    else:
        widths = [int(w) for w in widths]
        if len(widths) < n:
            raise NetworkConfigError(f"lgmsnet: widths={widths} gives {len(widths)} widths but the network has "
                                     f"{n} levels; give one width per level")
        widths = widths[:n]
    bad = [w for w in widths if w <= 0 or w % 4 != 0]
    if bad:
        raise NetworkConfigError(f"lgmsnet: widths {widths} contain {bad}, which are not positive multiples of 4 "
                                 f"(LMS splits into 4 channel groups, GMS splits 3:1); round them up to a "
                                 f"multiple of 4")
    conv_norm, branch_norm = resolve_norms(norm, dim)
    plan_kernels = [as_tuple(k, dim) for k in kernel_sizes[:n]] if kernel_sizes is not None else [None] * n
    n_lms = n - 2  # encoder levels 0..S-3

    def gms(cin, cout, level):
        return lgms.GMSBlock(conv_op, cin, cout, conv_norm=conv_norm, branch_norm=branch_norm,
                             plan_kernel=plan_kernels[level])

    encoder = []
    for i in range(n):
        pk = plan_kernels[i]
        c_in = widths[i - 1] if i > 0 else widths[0]
        if i == 0:
            entry = lgms.ConvNormAct(conv_op, input_channels, widths[0], 3, norm=conv_norm, act=nn.ReLU, bias=True,
                                     plan_kernel=pk)
        else:
            entry = max_pool_op(conv_op)(kernel_size=level_strides[i], stride=level_strides[i])
        if i < n_lms:
            body = [lgms.LMSBlock(conv_op, c_in, norm=conv_norm, plan_kernel=pk),
                    lgms.ConvNormAct(conv_op, c_in, widths[i], 1, norm=conv_norm)]
        else:
            body = [gms(c_in, widths[i], i)]
        encoder.append(LGMSEncoderLevel(entry, *body))

    stages = []
    for level in reversed(range(n - 1)):
        c = widths[level]
        up = lgms.UpConv(conv_op, widths[level + 1], c, norm=conv_norm, plan_kernel=plan_kernels[level])
        if level == n - 2:
            fusion = gms(2 * c, c, level)
        elif level == n - 3:
            fusion = nn.Sequential(lgms.FusionConv(conv_op, 2 * c, c, norm=conv_norm, plan_kernel=plan_kernels[level]),
                                   gms(c, c, level))
        else:
            fusion = lgms.FusionConv(conv_op, 2 * c, c, norm=conv_norm, plan_kernel=plan_kernels[level])
        stages.append(lgms.LGMSDecoderStage(up, fusion))
    decoder = UNetDecoder(stages, [widths[level] for level in reversed(range(n - 1))], conv_op, num_classes,
                          deep_supervision=deep_supervision)
    size_multiple = unfold_size_multiple(level_strides) if pad_to_unfold else None
    return LKUNet(encoder, decoder, level_strides, size_multiple=size_multiple, backbone="lgmsnet")


_PAPER = "LGMSNet, Dong et al., ECAI 2025 (arXiv 2508.15476); official code cq-dong/LGMSNet"
register_backbone(
    "lgmsnet", build_lgmsnet, dims=(2, 3), paper=_PAPER,
    description="LGMSNet: LMS blocks at high resolution, sparse-transformer GMS blocks at the two lowest "
                "levels; widths 16-32-64-128-128 (2,321,393 params at 2D 3->1; LGMSNet-3D 6,193,742 at 1->14)")
