"""LGMSNet's blocks (docs/architectures.md §2.2, 3D differences §2.5, plans rules §5.3), read from the
official code (cq-dong/LGMSNet): the LMS block (four depthwise kernels on four channel groups), the GMS
block (MobileViT-style sparse transformer branch + depthwise conv branch), and CMUNeXt's up_conv and
fusion_conv. Dimension-agnostic: every block takes ``conv_op`` (nn.Conv2d / nn.Conv3d).

Norm roles. The official code has two kinds of "conv + norm" places, and the 3D port changed only one:
``conv_norm`` (stem, LMS reduce/expand, projections, GMS conv1..conv4, up_conv, fusion_conv: BN in 2D,
InstanceNorm affine=False in 3D) and ``branch_norm`` (the GMS depthwise conv branch: BN in 2D and 3D).
The LMS GroupNorm(4) and the transformer LayerNorms never change.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NetworkConfigError
from .ops import anisotropic_kernel, conv_dim, instance_norm_op, linear_interpolation_mode, make_norm, same_padding
from .recompute import LeanRegion

# "instance_plain" is the official 3D code's nn.InstanceNorm3d(c): affine=False, no parameters.
NORM_KINDS = ("batch", "instance", "instance_plain")
LMS_KERNELS = (3, 5, 7, 9)


def lgms_norm(kind: str, conv_op, channels: int) -> nn.Module:
    """``batch`` / ``instance`` (nnU-Net's affine IN) from ops.make_norm, plus ``instance_plain``."""
    if kind == "instance_plain":
        return instance_norm_op(conv_op)(channels)  # torch's defaults: no affine (the official 3D code)
    if kind not in NORM_KINDS:
        raise NetworkConfigError(f"unknown norm kind {kind!r}; choose one of {', '.join(NORM_KINDS)}")
    return make_norm(kind, conv_op, channels)


class ConvNormAct(nn.Sequential):
    """Conv (same padding, stride 1) -> norm -> activation: the official ``conv_nxn_bn`` /
    ``conv_1x1_bn`` helpers (no bias, SiLU) and the stem / up_conv (bias, ReLU)."""

    def __init__(self, conv_op, cin: int, cout: int, kernel=3, *, norm: str, act: type = nn.SiLU,
                 bias: bool = False, groups: int = 1, plan_kernel: Sequence[int] | None = None):
        dim = conv_dim(conv_op)
        k = anisotropic_kernel(kernel, plan_kernel, dim)
        super().__init__(
            conv_op(cin, cout, kernel_size=k, padding=same_padding(k, 1, dim), groups=groups, bias=bias),
            lgms_norm(norm, conv_op, cout),
            act(),
        )


class LMSBlock(LeanRegion, nn.Module):
    """Lightweight multi-scale block (C -> C), §2.2: four channel groups, depthwise kernels 3/5/7/9
    (bias), concat + input -> GN(4) -> GELU, reduce PW C -> C/4 -> norm -> SiLU, expand 3x3
    C/4 -> C -> norm -> SiLU, plus the input again. Params with BN (2D): 2.5 C^2 + 46.5 C."""

    def __init__(self, conv_op, channels: int, *, norm: str = "batch", kernels: Sequence[int] = LMS_KERNELS,
                 plan_kernel: Sequence[int] | None = None):
        super().__init__()
        dim = conv_dim(conv_op)
        n_groups = len(kernels)
        if channels <= 0 or channels % n_groups != 0:
            raise NetworkConfigError(
                f"LMS block: channel count {channels} is not a multiple of {n_groups} (one channel group per "
                f"depthwise kernel {tuple(kernels)} and GroupNorm({n_groups})); use a width that is a multiple of "
                f"{n_groups}, e.g. {max(n_groups, channels + (-channels) % n_groups)}")
        group = channels // n_groups
        self.group_channels = group
        self.branches = nn.ModuleList(
            conv_op(group, group, kernel_size=k, padding=same_padding(k, 1, dim), groups=group, bias=True)
            for k in (anisotropic_kernel(kernel, plan_kernel, dim) for kernel in kernels))
        self.group_norm = nn.GroupNorm(n_groups, channels)
        self.act = nn.GELU()
        self.reduce = ConvNormAct(conv_op, channels, group, 1, norm=norm)
        self.expand = ConvNormAct(conv_op, group, channels, 3, norm=norm, plan_kernel=plan_kernel)

    def forward(self, x):
        parts = torch.split(x, self.group_channels, dim=1)
        y = torch.cat([branch(p) for branch, p in zip(self.branches, parts)], dim=1)
        y = self.act(self.group_norm(y + x))
        return self.expand(self.reduce(y)) + x


def parity_patch(spatial: Sequence[int]) -> tuple:
    """Unfold patch per axis (§5.3): 2 where the feature size is even, else 1 (decided at forward
    time, so odd or anisotropic feature maps still work: that axis just attends densely)."""
    return tuple(2 if s % 2 == 0 else 1 for s in spatial)


def parity_unfold(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """(B, C, *S) -> (B * prod(patch), prod(S) / prod(patch), C): one token sequence per intra-patch
    offset, i.e. each position only sees the positions with the same coordinate parity
    (MobileViT's ``b d (h ph) (w pw) -> b (ph pw) (h w) d``; token order inside a group is irrelevant
    to attention, LN and the FFN)."""
    b, c, *spatial = x.shape
    n = len(spatial)
    split = [b, c]
    for s, p in zip(spatial, patch):
        split += [s // p, p]
    x = x.reshape(split)
    # axes: 0 b, 1 c, then (count_a, patch_a) pairs at 2 + 2a, 3 + 2a
    order = [0] + [3 + 2 * a for a in range(n)] + [2 + 2 * a for a in range(n)] + [1]
    groups = 1
    for p in patch:
        groups *= p
    return x.permute(order).reshape(b * groups, -1, c)


def parity_fold(tokens: torch.Tensor, shape: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`parity_unfold` back to ``shape`` = (B, C, *S)."""
    b, c, *spatial = shape
    n = len(spatial)
    counts = [s // p for s, p in zip(spatial, patch)]
    x = tokens.reshape([b] + list(patch) + counts + [c])
    # current axes: 0 b, 1..n patch_a, n+1..2n count_a, 2n+1 c -> b, c, (count_a, patch_a)...
    order = [0, 2 * n + 1]
    for a in range(n):
        order += [n + 1 + a, 1 + a]
    return x.permute(order).reshape(shape)


class SparseAttention(nn.Module):
    """Pre-norm multi-head self-attention over (groups, tokens, dim); heads x head_dim is fixed
    (4 x 8 = 32 in the official code) regardless of the token dim."""

    def __init__(self, dim: int, heads: int = 4, head_dim: int = 8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x):
        g, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(g, n, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-0.5, as the official code
        return self.proj(out.transpose(1, 2).reshape(g, n, self.heads * self.head_dim))


class FeedForward(nn.Sequential):
    """Pre-norm MLP: LN -> Linear(dim -> hidden) -> SiLU -> Linear(hidden -> dim)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))


class SparseTransformer(nn.Module):
    """GMS transformer branch: parity unfold -> one pre-norm transformer layer -> fold back."""

    def __init__(self, dim: int, mlp_hidden: int, heads: int = 4, head_dim: int = 8):
        super().__init__()
        self.attention = SparseAttention(dim, heads, head_dim)
        self.ffn = FeedForward(dim, mlp_hidden)

    def forward(self, x):
        patch = parity_patch(x.shape[2:])
        tokens = parity_unfold(x, patch)
        tokens = tokens + self.attention(tokens)
        tokens = tokens + self.ffn(tokens)
        return parity_fold(tokens, x.shape, patch)


class DepthwiseConvBranch(nn.Module):
    """GMS conv branch: x + [DW 3x3 (no bias) -> norm -> ReLU -> per-channel scale (DW 1x1, no bias)
    -> norm](x). Norm weights start at 1, biases at 0 (the official explicit init)."""

    def __init__(self, conv_op, channels: int, *, norm: str = "batch", plan_kernel: Sequence[int] | None = None):
        super().__init__()
        dim = conv_dim(conv_op)
        k = anisotropic_kernel(3, plan_kernel, dim)
        self.body = nn.Sequential(
            conv_op(channels, channels, kernel_size=k, padding=same_padding(k, 1, dim), groups=channels, bias=False),
            lgms_norm(norm, conv_op, channels),
            nn.ReLU(inplace=True),
            conv_op(channels, channels, kernel_size=1, groups=channels, bias=False),
            lgms_norm(norm, conv_op, channels),
        )

    def forward(self, x):
        return x + self.body(x)


class GMSBlock(LeanRegion, nn.Module):
    """Global multi-scale block (cin -> cout), §2.2 (official ``MobileViTBlocktem_CT``):
    3x3 cin -> cout, PW cout -> cout; split [t, c] (default t = 3/4 cout) into the sparse transformer
    (MLP hidden ``mlp_hidden``, default 2 * cout) and the depthwise conv branch; concat -> PW -> concat
    with the block input -> 3x3 (cin + cout) -> cout. No additive residual."""

    def __init__(self, conv_op, cin: int, cout: int, *, transformer_channels: Optional[int] = None,
                 mlp_hidden: Optional[int] = None, heads: int = 4, head_dim: int = 8, conv_norm: str = "batch",
                 branch_norm: str = "batch", plan_kernel: Sequence[int] | None = None):
        super().__init__()
        conv_dim(conv_op)
        if transformer_channels is None:
            if cout % 4 != 0:
                raise NetworkConfigError(
                    f"GMS block: width {cout} cannot be split 3:1 into transformer and conv channels; use a "
                    f"multiple of 4, e.g. {cout + (-cout) % 4}")
            transformer_channels = 3 * cout // 4
        if not 0 < transformer_channels < cout:
            raise NetworkConfigError(
                f"GMS block: transformer_channels={transformer_channels} must lie strictly between 0 and the "
                f"block width {cout}")
        self.split = (transformer_channels, cout - transformer_channels)
        mlp_hidden = 2 * cout if mlp_hidden is None else mlp_hidden
        self.conv_in = ConvNormAct(conv_op, cin, cout, 3, norm=conv_norm, plan_kernel=plan_kernel)
        self.mix_in = ConvNormAct(conv_op, cout, cout, 1, norm=conv_norm)
        self.transformer = SparseTransformer(transformer_channels, mlp_hidden, heads, head_dim)
        self.conv_branch = DepthwiseConvBranch(conv_op, self.split[1], norm=branch_norm, plan_kernel=plan_kernel)
        self.mix_out = ConvNormAct(conv_op, cout, cout, 1, norm=conv_norm)
        self.fuse = ConvNormAct(conv_op, cin + cout, cout, 3, norm=conv_norm, plan_kernel=plan_kernel)

    def forward(self, x):
        y = self.mix_in(self.conv_in(x))
        global_part, local_part = torch.split(y, self.split, dim=1)
        y = torch.cat([self.transformer(global_part), self.conv_branch(local_part)], dim=1)
        return self.fuse(torch.cat([self.mix_out(y), x], dim=1))


class UpConv(LeanRegion, nn.Module):
    """CMUNeXt up_conv: (bi/tri)linear upsampling to the skip's size (= x the level stride per axis,
    align_corners False) -> 3x3 conv (bias) -> norm -> ReLU."""

    def __init__(self, conv_op, cin: int, cout: int, *, norm: str = "batch",
                 plan_kernel: Sequence[int] | None = None):
        super().__init__()
        self.mode = linear_interpolation_mode(conv_dim(conv_op))
        self.conv = ConvNormAct(conv_op, cin, cout, 3, norm=norm, act=nn.ReLU, bias=True, plan_kernel=plan_kernel)

    def forward(self, x, size: Sequence[int]):
        return self.conv(F.interpolate(x, size=tuple(size), mode=self.mode, align_corners=False))


class FusionConv(LeanRegion, nn.Sequential):
    """CMUNeXt fusion_conv (cin -> cout): 3x3 groups=2 (bias) -> GELU -> norm -> PW cin -> 4 cout
    -> GELU -> norm -> PW 4 cout -> cout -> GELU -> norm (activation before norm)."""

    def __init__(self, conv_op, cin: int, cout: int, *, norm: str = "batch",
                 plan_kernel: Sequence[int] | None = None):
        dim = conv_dim(conv_op)
        if cin % 2 != 0:
            raise NetworkConfigError(
                f"fusion_conv: input width {cin} is odd but its 3x3 conv has groups=2; use an even width")
        k = anisotropic_kernel(3, plan_kernel, dim)
        super().__init__(
            conv_op(cin, cin, kernel_size=k, padding=same_padding(k, 1, dim), groups=2, bias=True),
            nn.GELU(), lgms_norm(norm, conv_op, cin),
            conv_op(cin, 4 * cout, kernel_size=1, bias=True), nn.GELU(), lgms_norm(norm, conv_op, 4 * cout),
            conv_op(4 * cout, cout, kernel_size=1, bias=True), nn.GELU(), lgms_norm(norm, conv_op, cout),
        )


class LGMSDecoderStage(nn.Module):
    """One decoder level: up_conv to the skip's size, concat [skip, up] (skip first, as the official
    code), then the level's fusion module (GMS, fusion_conv + GMS, or fusion_conv)."""

    def __init__(self, up: UpConv, fusion: nn.Module):
        super().__init__()
        self.up = up
        self.fusion = fusion

    def forward(self, x, skip):
        return self.fusion(torch.cat([skip, self.up(x, skip.shape[2:])], dim=1))


__all__ = ["ConvNormAct", "DepthwiseConvBranch", "FeedForward", "FusionConv", "GMSBlock", "LGMSDecoderStage",
           "LMSBlock", "LMS_KERNELS", "NORM_KINDS", "SparseAttention", "SparseTransformer", "UpConv", "lgms_norm",
           "parity_fold", "parity_patch", "parity_unfold"]
