"""LM-Net's blocks (docs/architectures.md §3.2, read from the official code Asunatan/LM-Net; nnU-Net
generalisation §5.4): the re-parameterisable inverted block (ReparamConv), the strided-conv
downsampling, the pyramid pooling + Global Feature Transformer bottleneck, the multi-level skip
fusion (M2/M3 skips), the Local Feature Transformer (neighbourhood attention) and the additive
decoder stage.

Everything is dimension-agnostic (``conv_op`` = Conv2d/Conv3d). The official model is 2D; the 3D
form uses 3D neighbourhood windows, a 5³ + 3³ + three axial-3 re-parameterised depthwise core and
the plans' per-axis strides, with the kernel anisotropy rule (§5.1) applied to every spatial kernel.

Neighbourhood attention is implemented in pure PyTorch (the official code needs the CUDA-only
``natten``), with natten's semantics (``blocks.neighborhood``).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..errors import NetworkConfigError
from .ops import (adaptive_avg_pool, anisotropic_kernel, as_tuple, batch_norm_op, conv_dim, linear_interpolation_mode,
                  pointwise_conv, same_padding)
from .neighborhood import neighborhood_attention, sliced_neighborhood_attention, streaming_neighborhood_attention
from .recompute import LeanForm, LeanRegion, keep_marked_outputs, kept, lean_applies, recompute_all, recompute_cheap
from .reparam import ReparamDepthwise


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------

def conv_same(conv_op, cin: int, cout: int, kernel=3, plan_kernel: Sequence[int] | None = None) -> nn.Module:
    """A size-keeping conv with bias (LM-Net's plain 3×3 convs), anisotropy rule applied."""
    dim = conv_dim(conv_op)
    k = anisotropic_kernel(kernel, plan_kernel, dim)
    return conv_op(cin, cout, kernel_size=k, padding=same_padding(k, 1, dim), bias=True)


def strided_conv(conv_op, cin: int, cout: int, stride, plan_kernel: Sequence[int] | None = None) -> nn.Module:
    """LM-Net's downsampling: Conv(3, stride, padding 1, bias), no norm/act. Per axis: kernel 3 where
    the plans stride, the plan's kernel (3 or 1) elsewhere (§5.1); output = input / stride exactly
    when the input is divisible by the stride."""
    dim = conv_dim(conv_op)
    stride = as_tuple(stride, dim)
    k = anisotropic_kernel(3, plan_kernel, dim)
    k = tuple(3 if s > 1 else ki for s, ki in zip(stride, k))
    return conv_op(cin, cout, kernel_size=k, stride=stride, padding=same_padding(k, 1, dim), bias=True)


def upsample_like(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The official ``Upsample(scale_factor=2, bilinear, align_corners=True)``; with align_corners
    the sampling grid only depends on the in/out sizes, so asking for the target size is identical
    and also covers per-axis strides such as (1, 2, 2)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode=linear_interpolation_mode(x.dim() - 2), align_corners=True)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, *S, C): channels as the last axis for LayerNorm/Linear (a view, not a memory format)."""
    return x.movedim(1, -1)


def from_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, *S, C) -> (B, C, *S), contiguous."""
    return x.movedim(-1, 1).contiguous()


def reparam_conv_kernels(dim: int, plan_kernel: Sequence[int] | None = None, large: int = 5, small: int = 3) -> list:
    """Depthwise branch kernels of ReparamConv: large^d, small^d and one axial ``small`` branch per
    axis. 2D: (5,5), (3,3), (3,1), (1,3) (the official order: large, square, vertical, horizontal)."""
    kernels = [as_tuple(large, dim), as_tuple(small, dim)]
    for axis in range(dim):
        kernels.append(tuple(small if a == axis else 1 for a in range(dim)))
    return [anisotropic_kernel(k, plan_kernel, dim) for k in kernels]


# --------------------------------------------------------------------------------------------------
# ReparamConv
# --------------------------------------------------------------------------------------------------

class SqueezeExcitation(nn.Module):
    """Global average pool -> PW(C -> C/4) -> ReLU -> PW(C/4 -> C) -> Hardsigmoid -> scale.
    Convs kaiming-normal initialised as in the official SE."""

    def __init__(self, conv_op, channels: int, reduction: int = 4):
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise NetworkConfigError(f"squeeze-excitation on {channels} channels with reduction {reduction} "
                                f"leaves no hidden channel; use at least {reduction} channels")
        self.reduce = pointwise_conv(conv_op, channels, hidden)
        self.expand = pointwise_conv(conv_op, hidden, channels)
        for conv in (self.reduce, self.expand):
            nn.init.kaiming_normal_(conv.weight)

    def forward(self, x):
        s = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
        s = F.hardsigmoid(self.expand(F.relu(self.reduce(s))))
        return x * s


class ReparamConv(LeanForm, nn.Module):
    """LM-Net's lightweight multi-branch module, (cin, e, cout):
    expand PW(bias)+BN+Hardswish -> Σ of depthwise 5×5 / 3×3 / 3×1 / 1×3 (each + BN, re-parameterised
    into one 5×5 depthwise conv in eval mode by :class:`ReparamDepthwise`) -> GELU -> SE -> PW(bias),
    plus a PW(bias) projection shortcut of the input (always, even when cin == cout).
    Params (2D): cin·e + 3e + 48e + e²/2 + 1.25e + e·cout + cout + cin·cout + cout.

    Lean form: backward keeps the input and the expansion's output (its norm's input) and recomputes the rest of
    the main path; neither projection's output is kept (backward needs neither)."""

    def __init__(self, conv_op, cin: int, expand: int, cout: int, plan_kernel: Sequence[int] | None = None):
        super().__init__()
        dim = conv_dim(conv_op)
        self.expand = nn.Sequential(pointwise_conv(conv_op, cin, expand), batch_norm_op(conv_op)(expand),
                                    nn.Hardswish())
        self.mixer = ReparamDepthwise(conv_op, expand, reparam_conv_kernels(dim, plan_kernel))
        self.act = nn.GELU()
        self.se = SqueezeExcitation(conv_op, expand)
        self.project = pointwise_conv(conv_op, expand, cout)
        self.shortcut = pointwise_conv(conv_op, cin, cout)

    def forward(self, x):
        if lean_applies(self, x):
            return recompute_cheap(self._main, x, module=self, policy=keep_marked_outputs) + self.shortcut(x)
        return self._main(x) + self.shortcut(x)

    def _main(self, x):
        pointwise, norm, act = self.expand
        with kept():
            y = pointwise(x)
        return self.project(self.se(self.act(self.mixer(act(norm(y))))))


def reparam_conv_pair(conv_op, cin: int, width: int, plan_kernel=None) -> nn.Sequential:
    """The two ReparamConvs of every LM-Net conv level: RC(cin, 2w, w), RC(w, 2w, w)."""
    return nn.Sequential(ReparamConv(conv_op, cin, 2 * width, width, plan_kernel),
                         ReparamConv(conv_op, width, 2 * width, width, plan_kernel))


# --------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------

class TransformerMlp(nn.Sequential):
    """Linear(C -> hC) -> GELU -> Dropout 0.1 -> Linear(hC -> C) -> Dropout 0.1 (official Mlp)."""

    def __init__(self, channels: int, hidden: int, dropout: float = 0.1):
        super().__init__(nn.Linear(channels, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, channels), nn.Dropout(dropout))


SLICED_MIN_VOXELS = 8192


class NeighborhoodAttention(LeanForm, nn.Module):
    """natten's NeighborhoodAttention{2,3}D on channels-last input (B, *spatial, C): qkv Linear(C -> 3C),
    scaled q, k^d neighbourhood with relative-position bias (heads × (2k-1)^d, trunc-normal 0.02),
    softmax, proj Linear(C -> C); no dropout.

    ``checkpoint``: in training, recompute the attention core in backward instead of storing its
    k^d gathered keys and values and k^d logits and weights per head (only q, k, v are kept).
    Lean form: the streaming core (``blocks.neighborhood``), whose memory does not grow with the window. Exported
    (ONNX) in the sliced form, slices, pads and elementwise ops on maps the size of q, no gathers of activations:
    in 2D always, in 3D only at static sizes (the export's patch model); with symbolic sizes the 3D sliced graph
    (27 offsets per attention) kept torch's ONNX optimiser busy for over 20 minutes, so the general 3D model keeps
    the reference form. CPU inference on large maps runs the sliced form eagerly."""

    export_sliced = True  # False: export the reference form everywhere (benchmarks compare the two)

    def __init__(self, dim: int, channels: int, heads: int, kernel=3, rel_pos_bias: bool = True,
                 checkpoint: bool = True):
        super().__init__()
        if channels % heads:
            raise NetworkConfigError(f"neighbourhood attention: {channels} channels cannot be split into {heads} "
                                f"heads; choose a head count that divides every skip width")
        self.dim = dim
        self.heads = heads
        self.head_dim = channels // heads
        self.scale = self.head_dim ** -0.5
        self.kernel = as_tuple(kernel, dim)
        if any(kk < 1 or kk % 2 == 0 for kk in self.kernel):
            raise NetworkConfigError(f"neighbourhood attention needs odd kernels, got {self.kernel}; use na_kernel=3 "
                                f"(official) or another odd size")
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros((heads,) + tuple(2 * kk - 1 for kk in self.kernel)))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.checkpoint = checkpoint

    def _sliced_inference(self, x) -> bool:
        """Inference on a CPU map of at least ``SLICED_MIN_VOXELS``: there the sliced form is faster than the
        reference (the attention alone, 1 thread: 40x56x40 2.7x, 20x28x20 1.35x, 256x256 1.8x); on smaller maps its
        per-offset op overhead dominates (10x14x10: 0.73x). CUDA is not measured, so it keeps the reference."""
        return (not torch.is_grad_enabled() and x.device.type == "cpu"
                and math.prod(x.shape[1:-1]) >= SLICED_MIN_VOXELS)

    @property
    def static_export_form(self) -> bool:
        """An export at static sizes differs from (and runs faster than) one at symbolic sizes."""
        return self.export_sliced and self.dim == 3

    def _sliced_export(self, spatial) -> bool:
        """ONNX export in the sliced form: in 2D always; in 3D only at static sizes, where the graph folds to a
        few hundred nodes per attention (with symbolic sizes torch's ONNX optimiser ran for over 20 minutes)."""
        return self.export_sliced and (self.dim == 2 or not any(isinstance(s, torch.SymInt) for s in spatial))

    def forward(self, x):
        spatial = x.shape[1:-1]
        if len(spatial) != self.dim:
            raise ValueError(f"expected a channels-last {self.dim}D map, got shape {tuple(x.shape)}")
        b = x.shape[0]
        qkv = self.qkv(x).reshape(b, *spatial, 3, self.heads, self.head_dim)
        qkv = qkv.permute(self.dim + 1, 0, self.dim + 2, self.dim + 3, *range(1, self.dim + 1))
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # (B, heads, d, *S)
        if self._sliced_export(spatial) if torch.onnx.is_in_onnx_export() else self._sliced_inference(x):
            out = sliced_neighborhood_attention(q, k, v, self.kernel, self.rpb)
        elif lean_applies(self, x):
            out = streaming_neighborhood_attention(q, k, v, self.kernel, self.rpb)
        elif self.checkpoint and self.training and torch.is_grad_enabled():
            out = activation_checkpoint(neighborhood_attention, q, k, v, self.kernel, self.rpb, use_reentrant=False)
        else:
            out = neighborhood_attention(q, k, v, self.kernel, self.rpb)
        out = out.permute(0, *range(3, self.dim + 3), 1, 2).reshape(b, *spatial, self.heads * self.head_dim)
        return self.proj(out)


class LocalFeatureTransformer(LeanRegion, nn.Module):
    """LFT (official ``NeighborhoodTransformer``), C -> C: embed conv 3 (bias) -> channels-last e;
    a = e + NA(LN(e)); out = a + MLP(LN(a)) (hidden 2C, dropout 0.1)."""

    def __init__(self, conv_op, channels: int, heads: int = 12, kernel=3, plan_kernel: Sequence[int] | None = None,
                 rel_pos_bias: bool = True, checkpoint: bool = True):
        super().__init__()
        dim = conv_dim(conv_op)
        self.embed = conv_same(conv_op, channels, channels, 3, plan_kernel)
        self.norm1 = nn.LayerNorm(channels)
        self.attention = NeighborhoodAttention(dim, channels, heads, anisotropic_kernel(kernel, plan_kernel, dim),
                                               rel_pos_bias=rel_pos_bias, checkpoint=checkpoint)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = TransformerMlp(channels, 2 * channels)

    def forward(self, x):
        e = to_tokens(self.embed(x))
        a = e + self.attention(self.norm1(e))
        return from_tokens(a + self.mlp(self.norm2(a)))


class GlobalSelfAttention(nn.Module):
    """Multi-head self-attention over all tokens (B, N, C) via ``scaled_dot_product_attention``;
    qkv Linear(C -> 3C, bias), proj Linear(C -> C); trunc-normal(0.02) weights, zero biases."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise NetworkConfigError(f"global attention: {channels} bottleneck channels cannot be split into "
                                f"{heads} heads; set gft_heads to a divisor of {channels}")
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        for lin in (self.qkv, self.proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class GlobalFeatureTransformer(nn.Module):
    """GFT on the pyramid-pooled bottleneck: embed conv 3 (C -> C, bias) -> tokens e;
    x = e + MHSA(LN(e)); x = x + MLP(LN(x)) (hidden 2C, dropout 0.1); back to a map; PW(C -> cout)."""

    def __init__(self, conv_op, channels: int, out_channels: int, heads: int = 12,
                 plan_kernel: Sequence[int] | None = None):
        super().__init__()
        self.embed = conv_same(conv_op, channels, channels, 3, plan_kernel)
        self.norm1 = nn.LayerNorm(channels)
        self.attention = GlobalSelfAttention(channels, heads)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = TransformerMlp(channels, 2 * channels)
        self.out = pointwise_conv(conv_op, channels, out_channels)

    def forward(self, x):
        e = self.embed(x)
        spatial = e.shape[2:]
        tokens = e.flatten(2).transpose(1, 2)
        a = tokens + self.attention(self.norm1(tokens))
        a = a + self.mlp(self.norm2(a))
        return self.out(a.transpose(1, 2).reshape(e.shape[0], e.shape[1], *spatial))


class PyramidPoolBottleneck(nn.Module):
    """PyramidPool (adaptive-average-pool every conv level to the deepest map's size, concat with it:
    Σ widths channels, no parameters) followed by the GFT. Called with the full encoder feature list."""

    def __init__(self, gft: GlobalFeatureTransformer):
        super().__init__()
        self.gft = gft

    @staticmethod
    def pyramid_pool(features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[-1].shape[2:]
        return torch.cat([adaptive_avg_pool(f, size) for f in features[:-1]] + [features[-1]], dim=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.gft(self.pyramid_pool(features))


# --------------------------------------------------------------------------------------------------
# skips and decoder
# --------------------------------------------------------------------------------------------------

class MultiLevelSkipFusion(LeanRegion, nn.Module):
    """M2Skip / M3Skip generalised: fuse the neighbouring levels {i-1, i, i+1} into level i's width and
    resolution. lower (finer) level: conv 3 with the stride between the levels; same level: conv 3;
    upper (coarser) level: bilinear/trilinear up (align_corners=True) then conv 3. Concat in that order
    -> conv 3 (n·C -> C, bias) -> BN -> GELU. Only the fuse conv has norm/act.
    M3Skip = lower+same+upper, the official "bottom" M2Skip = lower+same, the "top" one = same+upper."""

    def __init__(self, conv_op, channels: int, lower_channels: Optional[int] = None,
                 upper_channels: Optional[int] = None, lower_stride=None, plan_kernel=None):
        super().__init__()
        self.lower = (strided_conv(conv_op, lower_channels, channels, lower_stride, plan_kernel)
                      if lower_channels is not None else None)
        self.same = conv_same(conv_op, channels, channels, 3, plan_kernel)
        self.upper = (conv_same(conv_op, upper_channels, channels, 3, plan_kernel)
                      if upper_channels is not None else None)
        n_inputs = 1 + (self.lower is not None) + (self.upper is not None)
        self.fuse = nn.Sequential(conv_same(conv_op, n_inputs * channels, channels, 3, plan_kernel),
                                  batch_norm_op(conv_op)(channels), nn.GELU())

    def forward(self, lower: Optional[torch.Tensor], same: torch.Tensor, upper: Optional[torch.Tensor]):
        parts = []
        if self.lower is not None:
            parts.append(self.lower(lower))
        parts.append(self.same(same))
        if self.upper is not None:
            parts.append(self.upper(upsample_like(upper, same.shape[2:])))
        return self.fuse(torch.cat(parts, dim=1))


class LMNetSkipPathway(nn.Module):
    """Skip for every conv level i: LFT(MultiLevelSkipFusion(x_{i-1}, x_i, x_{i+1})), neighbours
    limited to the conv levels (the strided-conv-only deepest level is not a skip source)."""

    def __init__(self, fusions: Sequence[MultiLevelSkipFusion], transformers: Sequence[LocalFeatureTransformer]):
        super().__init__()
        if len(fusions) != len(transformers):
            raise ValueError("one local feature transformer per fused skip is required")
        self.fusions = nn.ModuleList(fusions)
        self.transformers = nn.ModuleList(transformers)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        n = len(self.fusions)
        skips = []
        for i, (fusion, lft) in enumerate(zip(self.fusions, self.transformers)):
            lower = features[i - 1] if i > 0 else None
            upper = features[i + 1] if i + 1 < n else None
            skips.append(lft(fusion(lower, features[i], upper)))
        return skips


class AdditiveUpStage(LeanForm, nn.Module):
    """Decoder stage: up (interpolate to the skip's size, align_corners=True, then conv 3 cin -> cout,
    bias, no norm/act) + skip (addition), then RC(cout, 2cout, cout) ×2.
    Lean form: the interpolation is recomputed in backward (the conv keeps the low-resolution input instead)."""

    def __init__(self, conv_op, cin: int, cout: int, plan_kernel=None):
        super().__init__()
        self.up_conv = conv_same(conv_op, cin, cout, 3, plan_kernel)
        self.blocks = reparam_conv_pair(conv_op, cout, cout, plan_kernel)

    def forward(self, x, skip):
        if lean_applies(self, x):
            return self.blocks(recompute_all(self._up, x, tuple(skip.shape[2:]), module=self.up_conv) + skip)
        return self.blocks(self._up(x, skip.shape[2:]) + skip)

    def _up(self, x, size):
        return self.up_conv(upsample_like(x, size))
