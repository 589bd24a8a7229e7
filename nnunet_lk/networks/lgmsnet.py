"""LGMSNet (Dong et al., ECAI 2025, arXiv 2508.15476) and its 3D form LGMSNet-3D: LMS blocks at high
resolution, GMS blocks at low resolution, CMUNeXt up/fusion decoder (docs/architectures.md §2.2; plans rules
§5.3). One registered name, ``lgmsnet``, for 2D and 3D: the official 3D network (§2.5) has the same
widths, splits and layout as the 2D one and only changes its norms, which follow ``conv_op`` here.

Level roles for S levels: encoder 0..S-3 = LMS levels (LMS at the incoming width, then a PW
projection), S-2 and S-1 = GMS levels. Decoder level S-2 = GMS(2C -> C), level S-3 = fusion_conv +
GMS, levels below = fusion_conv only. S = 5 with widths [16, 32, 64, 128, 128] is the paper's model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch.nn as nn

from ..blocks import lgmsnet as lgms
from ..blocks.ops import as_tuple, conv_dim, max_pool_op
from .registry import Recipe, register_backbone
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


def resolve_lgmsnet_levels(dim: int, levels: Optional[int], strides, patch_size) -> list:
    """Per-level strides: ``levels`` (None: every stage of the plans, 5 without plans), at least 2 (the two
    GMS levels)."""
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
    return level_strides


def resolve_widths(widths: Optional[Sequence[int]], levels: int) -> List[int]:
    """One width per level: the native ones (§5.3) or the first ``levels`` given, each a multiple of 4."""
    if widths is None:
        widths = native_widths(levels)
    else:
        widths = [int(w) for w in widths]
        if len(widths) < levels:
            raise NetworkConfigError(f"lgmsnet: widths={widths} gives {len(widths)} widths but the network has "
                                     f"{levels} levels; give one width per level")
        widths = widths[:levels]
    bad = [w for w in widths if w <= 0 or w % 4 != 0]
    if bad:
        raise NetworkConfigError(f"lgmsnet: widths {widths} contain {bad}, which are not positive multiples of 4 "
                                 f"(LMS splits into 4 channel groups, GMS splits 3:1); round them up to a "
                                 f"multiple of 4")
    return widths


@dataclass(frozen=True)
class LGMSParts:
    """What every block of one network shares: the conv type, the two norms and the plans' kernel per level."""
    conv_op: type
    conv_norm: str
    branch_norm: str
    plan_kernels: list

    def gms(self, cin: int, cout: int, level: int) -> nn.Module:
        return lgms.GMSBlock(self.conv_op, cin, cout, conv_norm=self.conv_norm, branch_norm=self.branch_norm,
                             plan_kernel=self.plan_kernels[level])

    def fusion_conv(self, cin: int, cout: int, level: int) -> nn.Module:
        return lgms.FusionConv(self.conv_op, cin, cout, norm=self.conv_norm, plan_kernel=self.plan_kernels[level])


def build_encoder(parts: LGMSParts, input_channels: int, widths: Sequence[int], level_strides) -> list:
    """Levels 0..S-3: LMS block at the incoming width + PW projection; S-2 and S-1: GMS block."""
    conv_op, conv_norm, n = parts.conv_op, parts.conv_norm, len(widths)
    encoder = []
    for i in range(n):
        pk = parts.plan_kernels[i]
        c_in = widths[i - 1] if i > 0 else widths[0]
        if i == 0:
            entry = lgms.ConvNormAct(conv_op, input_channels, widths[0], 3, norm=conv_norm, act=nn.ReLU, bias=True,
                                     plan_kernel=pk)
        else:
            entry = max_pool_op(conv_op)(kernel_size=level_strides[i], stride=level_strides[i])
        if i < n - 2:
            body = [lgms.LMSBlock(conv_op, c_in, norm=conv_norm, plan_kernel=pk),
                    lgms.ConvNormAct(conv_op, c_in, widths[i], 1, norm=conv_norm)]
        else:
            body = [parts.gms(c_in, widths[i], i)]
        encoder.append(LGMSEncoderLevel(entry, *body))
    return encoder


def build_decoder(parts: LGMSParts, widths: Sequence[int], num_classes: int, deep_supervision: bool) -> UNetDecoder:
    """Level S-2: GMS(2C -> C); S-3: fusion_conv + GMS; below: fusion_conv only; each after an UpConv."""
    n = len(widths)
    stages = []
    for level in reversed(range(n - 1)):
        c = widths[level]
        up = lgms.UpConv(parts.conv_op, widths[level + 1], c, norm=parts.conv_norm,
                         plan_kernel=parts.plan_kernels[level])
        if level == n - 2:
            fusion = parts.gms(2 * c, c, level)
        elif level == n - 3:
            fusion = nn.Sequential(parts.fusion_conv(2 * c, c, level), parts.gms(c, c, level))
        else:
            fusion = parts.fusion_conv(2 * c, c, level)
        stages.append(lgms.LGMSDecoderStage(up, fusion))
    return UNetDecoder(stages, [widths[level] for level in reversed(range(n - 1))], parts.conv_op, num_classes,
                       deep_supervision=deep_supervision)


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
    level_strides = resolve_lgmsnet_levels(dim, levels, strides, patch_size)
    n = len(level_strides)
    widths = resolve_widths(widths, n)
    conv_norm, branch_norm = resolve_norms(norm, dim)
    plan_kernels = [as_tuple(k, dim) for k in kernel_sizes[:n]] if kernel_sizes is not None else [None] * n
    parts = LGMSParts(conv_op, conv_norm, branch_norm, plan_kernels)
    encoder = build_encoder(parts, input_channels, widths, level_strides)
    decoder = build_decoder(parts, widths, num_classes, deep_supervision)
    size_multiple = unfold_size_multiple(level_strides) if pad_to_unfold else None
    # channels-last end to end (bench --variants, README): 2D eval 5-11% faster, 3D eval 10% slower
    return LKUNet(encoder, decoder, level_strides, size_multiple=size_multiple, backbone="lgmsnet",
                  cpu_channels_last=dim == 2)


_PAPER = "LGMSNet, Dong et al., ECAI 2025 (arXiv 2508.15476); official code cq-dong/LGMSNet"
# docs/architectures.md §6.2-6.3
PAPER_RECIPES = {
    # SGD momentum 0.9, wd 1e-4, lr 0.02, poly 0.9 (official 2D code, paper lr 0.02)
    2: Recipe("sgd", 0.02, 1e-4, "poly", momentum=0.9,
              source="LGMSNet official 2D code: SGD momentum 0.9, wd 1e-4, lr 0.02, poly 0.9"),
    # AdamW lr 1e-3, wd 1e-5, linear warm-up 50 of 5000 epochs, then cosine (official 3D script)
    3: Recipe("adamw", 1e-3, 1e-5, "cosine", warmup=50 / 5000,
              source="LGMSNet official 3D script: AdamW lr 1e-3, wd 1e-5, warm-up 50 of 5000 epochs + cosine"),
}
register_backbone(
    "lgmsnet", build_lgmsnet, trainer="LGMSNet", dims=(2, 3), paper=_PAPER, paper_recipes=PAPER_RECIPES,
    description="LGMSNet: LMS blocks at high resolution, sparse-transformer GMS blocks at the two lowest "
                "levels; widths 16-32-64-128-128 (2,321,393 params at 2D 3->1; LGMSNet-3D 6,193,742 at 1->14)")
