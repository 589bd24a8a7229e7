"""MS-LKSeg's blocks (docs/architectures.md §4.3-4.6, §5.5): DyConv, MIE, MIDM, the MIS encoder block
and the LD skip block.

MS-LKSeg has no public code (§4.1): MIE and MIDM follow SCSA's SMSA/PCSA and LD follows RepLKNet's
RepLK block, as the paper's figures do. Every choice the figures leave open is marked [ASSUMED] and
is a constructor argument, exposed as a config key by ``nnunet_lk.networks.mslkseg``.

All blocks are dimension-agnostic (``conv_op`` = nn.Conv2d / nn.Conv3d) and follow the kernel
anisotropy rule (§5.1) through ``plan_kernel``: on axes where nnU-Net planned a kernel of 1, every
spatial kernel of the block (DyConv, MIE's 1D profile convs, LD's large and small kernels) is 1.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NetworkConfigError
from .depthwise import grouped_conv
from .ops import (anisotropic_kernel, as_tuple, avg_pool_fn, conv_dim, conv_transpose_op, linear_interpolation_mode,
                  make_norm, same_padding)
from .recompute import LeanRegion
from .reparam import ReparamDepthwise



def _check_divisible(block: str, what: str, channels: int, divisor: int, option: str):
    if divisor < 1 or channels % divisor:
        raise NetworkConfigError(
            f"{block}: {what} needs a channel count divisible by {divisor}, got {channels} channels; "
            f"choose a width that is a multiple of {divisor} or change '{option}'.")


class DynamicConv(nn.Module):
    """Dynamic convolution (Chen et al., CVPR 2020; §4.3 [ASSUMED]): K parallel kernels (and biases)
    mixed per sample by ``softmax(FC(ReLU(FC(GAP(x)))) / T)``, applied as one grouped conv over the
    batch. ``num_kernels=1`` is a plain conv (no attention branch).

    [ASSUMED] hidden width max(cin // reduction, min_hidden); first FC without bias, second with
    (as in the reference DyConv code); each of the K kernels gets PyTorch's default conv init.
    ``temperature`` is a plain attribute, so a trainer can anneal it (Chen et al.: 30 -> 1).
    Params: K·(cout·cin·Πk + cout) + cin·hidden + hidden·K + K (the last three only when K > 1).
    """

    def __init__(self, conv_op, cin: int, cout: int, kernel=3, num_kernels: int = 4, temperature: float = 1.0,
                 reduction: int = 4, min_hidden: int = 4, plan_kernel: Sequence[int] | None = None):
        super().__init__()
        if num_kernels < 1:
            raise NetworkConfigError(f"DyConv: dyconv_kernels must be >= 1, got {num_kernels}")
        if temperature <= 0:
            raise NetworkConfigError(f"DyConv: dyconv_temperature must be > 0, got {temperature}")
        dim = conv_dim(conv_op)
        self.dim = dim
        self.kernel = anisotropic_kernel(kernel, plan_kernel, dim)
        self.padding = same_padding(self.kernel, 1, dim)
        self.cin, self.cout, self.num_kernels = cin, cout, num_kernels
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.empty(num_kernels, cout, cin, *self.kernel))
        self.bias = nn.Parameter(torch.empty(num_kernels, cout))
        fan_in = cin * math.prod(self.kernel)
        bound = 1 / math.sqrt(fan_in)
        for k in range(num_kernels):  # each kernel initialised like an ordinary conv
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
        nn.init.uniform_(self.bias, -bound, bound)
        if num_kernels > 1:
            hidden = max(cin // reduction, min_hidden)
            # not in place: the lean form keeps the Linear's output for backward
            self.attention = nn.Sequential(nn.Linear(cin, hidden, bias=False), nn.ReLU(),
                                           nn.Linear(hidden, num_kernels))
        else:
            self.attention = None

    def kernel_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample mixing weights (B × K), softmax over the K kernels."""
        pooled = x.mean(dim=tuple(range(2, x.dim())))
        return torch.softmax(self.attention(pooled) / self.temperature, dim=1)

    def forward(self, x):
        if self.attention is None:
            return grouped_conv(x, self.weight[0], self.bias[0], padding=self.padding)
        batch = x.shape[0]
        alpha = self.kernel_weights(x)
        weight = (alpha @ self.weight.flatten(1)).reshape(batch * self.cout, self.cin, *self.kernel)
        bias = (alpha @ self.bias).reshape(batch * self.cout)
        # one grouped conv: the batch becomes the groups, so each sample meets its own kernel
        out = grouped_conv(x.reshape(1, batch * self.cin, *x.shape[2:]), weight, bias, padding=self.padding,
                           groups=batch)
        return out.reshape(batch, self.cout, *out.shape[2:])


class DyConvBlock(nn.Sequential):
    """DyConv → norm → ReLU (§4.3)."""

    def __init__(self, conv_op, cin: int, cout: int, norm: str = "batch", num_kernels: int = 4,
                 temperature: float = 1.0, reduction: int = 4, plan_kernel: Sequence[int] | None = None):
        super().__init__()
        self.conv = DynamicConv(conv_op, cin, cout, num_kernels=num_kernels, temperature=temperature,
                                reduction=reduction, plan_kernel=plan_kernel)
        self.norm = make_norm(norm, conv_op, cout)
        self.act = nn.ReLU(inplace=True)


class MultiSemanticSpatialAttention(nn.Module):
    """MIE = SCSA's SMSA with Fig. 2's DCM (§4.4), generalised to any number of spatial axes (§5.5).

    For each spatial axis a profile (mean over the other spatial axes, C × n_axis) goes through the
    SAME multi-kernel depthwise 1D convs (channels split into len(kernels) groups, group j uses
    kernel k_j), then its own GroupNorm and a sigmoid; the gates of all axes multiply onto x.
    On axes where the plans' kernel is 1 the shared convs use only their centre tap there.
    Params: Σ_j (k_j + 1)·C/len(kernels) + 2C per axis = 11C in 2D, 13C in 3D with (3, 5, 7, 9).
    """

    def __init__(self, conv_op, channels: int, kernels: Sequence[int] = (3, 5, 7, 9), gn_groups: int = 4,
                 plan_kernel: Sequence[int] | None = None):
        super().__init__()
        dim = conv_dim(conv_op)
        kernels = tuple(int(k) for k in kernels)
        if not kernels or any(k < 1 or k % 2 == 0 for k in kernels):
            raise NetworkConfigError(f"MIE: mie_kernels must be odd positive sizes, got {list(kernels)}")
        _check_divisible("MIE", f"{len(kernels)} shared 1D conv groups", channels, len(kernels), "mie_kernels")
        _check_divisible("MIE", f"GroupNorm({gn_groups})", channels, gn_groups, "mie_gn_groups")
        self.dim = dim
        self.group_channels = channels // len(kernels)
        self.shared_convs = nn.ModuleList(
            nn.Conv1d(self.group_channels, self.group_channels, k, padding=k // 2, groups=self.group_channels)
            for k in kernels)
        self.norms = nn.ModuleList(nn.GroupNorm(gn_groups, channels) for _ in range(dim))
        # axes where the plans' kernel is 1: no context mixing along that axis' profile
        self.centre_only = tuple(k == 1 for k in anisotropic_kernel(3, plan_kernel, dim))

    def _shared_multi_kernel_conv(self, profile: torch.Tensor, centre_only: bool) -> torch.Tensor:
        parts = []
        for conv, chunk in zip(self.shared_convs, profile.split(self.group_channels, dim=1)):
            weight, padding = conv.weight, conv.padding[0]
            if centre_only:
                weight, padding = weight[..., padding:padding + 1], 0
            parts.append(F.conv1d(chunk, weight, conv.bias, padding=padding, groups=self.group_channels))
        return torch.cat(parts, dim=1)

    def forward(self, x):
        spatial = tuple(range(2, x.dim()))
        out = x
        for axis, norm in enumerate(self.norms):
            profile = x.mean(dim=tuple(a for a in spatial if a != axis + 2))  # B × C × n_axis
            gate = torch.sigmoid(norm(self._shared_multi_kernel_conv(profile, self.centre_only[axis])))
            shape = [x.shape[0], x.shape[1]] + [1] * self.dim
            shape[axis + 2] = x.shape[axis + 2]
            out = out * gate.reshape(shape)
        return out


class ProgressiveChannelSelfAttention(nn.Module):
    """MIDM = SCSA's PCSA (§4.5): average-pool (window = stride = min(window, size) per axis),
    GroupNorm(1), per-channel 1×1 q/k/v (no bias), channel self-attention per head
    (softmax(q kᵀ · d^-0.5), d = C/heads), mean over the pooled positions, sigmoid gate on x.
    Params: 3C + 2C = 5C."""

    def __init__(self, conv_op, channels: int, window=7, heads: int = 1):
        super().__init__()
        dim = conv_dim(conv_op)
        _check_divisible("MIDM", f"{heads} attention heads", channels, heads, "midm_heads")
        self.dim = dim
        self.window = as_tuple(window, dim)
        if any(w < 1 for w in self.window):
            raise NetworkConfigError(f"MIDM: midm_window must be >= 1, got {list(self.window)}")
        self.heads = heads
        self.norm = nn.GroupNorm(1, channels)
        self.query = conv_op(channels, channels, 1, groups=channels, bias=False)
        self.key = conv_op(channels, channels, 1, groups=channels, bias=False)
        self.value = conv_op(channels, channels, 1, groups=channels, bias=False)
        self.scale = (channels // heads) ** -0.5

    def forward(self, x):
        window = tuple(min(w, s) for w, s in zip(self.window, x.shape[2:]))  # guard for small maps
        y = self.norm(avg_pool_fn(self.dim)(x, window, stride=window))
        batch, channels = y.shape[:2]
        q, k, v = (proj(y).reshape(batch, self.heads, channels // self.heads, -1)
                   for proj in (self.query, self.key, self.value))
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        context = (attn @ v).mean(dim=-1).reshape(batch, channels, *([1] * self.dim))
        return x * torch.sigmoid(context)


class MISBlock(LeanRegion, nn.Sequential):
    """MIS = DyConv → MIE → MIDM, sequential, no residual (Fig. 1a, §4.2). DyConv changes the width."""

    def __init__(self, conv_op, cin: int, cout: int, norm: str = "batch", dyconv_kernels: int = 4,
                 dyconv_temperature: float = 1.0, dyconv_reduction: int = 4, mie_kernels=(3, 5, 7, 9),
                 mie_gn_groups: int = 4, midm_window=7, midm_heads: int = 1,
                 plan_kernel: Sequence[int] | None = None):
        super().__init__()
        self.dyconv = DyConvBlock(conv_op, cin, cout, norm=norm, num_kernels=dyconv_kernels,
                                  temperature=dyconv_temperature, reduction=dyconv_reduction,
                                  plan_kernel=plan_kernel)
        self.mie = MultiSemanticSpatialAttention(conv_op, cout, kernels=mie_kernels, gn_groups=mie_gn_groups,
                                                 plan_kernel=plan_kernel)
        self.midm = ProgressiveChannelSelfAttention(conv_op, cout, window=midm_window, heads=midm_heads)


class RepLKBlock(LeanRegion, nn.Module):
    """LD = RepLKNet's RepLK block (§4.6): x + BN(PW(ReLU(ReDW(ReLU(BN(PW(BN(x)))))))), where ReDW is
    DW(large)+BN ∥ DW(small)+BN, fused into one DW(large) at inference by ``ReparamDepthwise``.

    ``norm`` sets the pre-norm and the two PW norms; the re-parameterised branches always use BN
    (folding needs it). ``dw_ratio`` [ASSUMED 1]: depthwise width = dw_ratio·C.
    Params (training form, dw_ratio 1, kernels 21/3): 2C² + 460C.
    """

    def __init__(self, conv_op, channels: int, large_kernel=21, small_kernel=3, dw_ratio: int = 1,
                 norm: str = "batch", plan_kernel: Sequence[int] | None = None):
        super().__init__()
        dim = conv_dim(conv_op)
        if dw_ratio < 1:
            raise NetworkConfigError(f"LD: ld_dw_ratio must be >= 1, got {dw_ratio}")
        large = anisotropic_kernel(large_kernel, plan_kernel, dim)
        small = anisotropic_kernel(small_kernel, plan_kernel, dim)
        if any(v < 1 or v % 2 == 0 for v in large + small) or any(s > l for s, l in zip(small, large)):
            raise NetworkConfigError(
                f"LD: kernels must be odd and the small kernel {list(small)} no larger than the large kernel "
                f"{list(large)} on any axis (it is zero-padded into it); fix 'ld_kernel'/'ld_kernel_3d'/"
                f"'ld_small_kernel'.")
        dw = channels * dw_ratio
        self.pre_norm = make_norm(norm, conv_op, channels)
        self.pw1 = conv_op(channels, dw, 1, bias=False)
        self.pw1_norm = make_norm(norm, conv_op, dw)
        self.pw1_act = nn.ReLU(inplace=True)
        self.large_kernel = ReparamDepthwise(conv_op, dw, (large, small))
        self.lk_act = nn.ReLU(inplace=True)
        self.pw2 = conv_op(dw, channels, 1, bias=False)
        self.pw2_norm = make_norm(norm, conv_op, channels)

    def forward(self, x):
        y = self.pw1_act(self.pw1_norm(self.pw1(self.pre_norm(x))))
        y = self.lk_act(self.large_kernel(y))
        return x + self.pw2_norm(self.pw2(y))


# ---- the U around them: decoder stage and skip fusion --------------------------------------------------
class ConvNormReLU(LeanRegion, nn.Sequential):
    def __init__(self, conv_op, cin: int, cout: int, norm: str, bias: bool, plan_kernel=None):
        dim = conv_dim(conv_op)
        kernel = anisotropic_kernel(3, plan_kernel, dim)
        super().__init__(conv_op(cin, cout, kernel, padding=same_padding(kernel, 1, dim), bias=bias),
                         make_norm(norm, conv_op, cout), nn.ReLU(inplace=True))


class MSLKUpStage(nn.Module):
    """Up-sample by the stride (cin → cout), concat [skip, up], (Conv3-norm-ReLU) ×2 (2·cout → cout)."""

    def __init__(self, conv_op, cin: int, cout: int, stride: Sequence[int], norm: str = "batch",
                 upsample: str = "transpose", conv_bias: bool = False, plan_kernel=None):
        super().__init__()
        dim = conv_dim(conv_op)
        stride = as_tuple(stride, dim)
        if upsample == "transpose":
            self.up = conv_transpose_op(conv_op)(cin, cout, kernel_size=stride, stride=stride)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=tuple(float(s) for s in stride),
                                                mode=linear_interpolation_mode(dim)),
                                    conv_op(cin, cout, 1))
        self.conv1 = ConvNormReLU(conv_op, 2 * cout, cout, norm, conv_bias, plan_kernel)
        self.conv2 = ConvNormReLU(conv_op, cout, cout, norm, conv_bias, plan_kernel)

    def forward(self, x, skip):
        return self.conv2(self.conv1(torch.cat([skip, self.up(x)], dim=1)))


class LDSkips(nn.Module):
    """An LD block on each skip (levels 0..L-2); the deepest level goes to the decoder untouched."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, features):
        return [ld(f) for ld, f in zip(self.blocks, features[:-1])]
