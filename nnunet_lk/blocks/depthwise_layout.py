"""Memory layouts and the shape transforms the depthwise op (``depthwise.grouped_conv``) applies before its
formulations: channels-last with a dense batch stride, kernel taps cropped where they only meet padding, and
a dilated conv's phase grids. Differentiable torch ops (the phase grids through their own autograd functions,
whose gradients come back in the input's layout)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


# ---- layouts ----------------------------------------------------------------------------------------------
def channels_last_format(dim: int) -> torch.memory_format:
    """``torch.channels_last`` for 2D maps (NCHW), ``torch.channels_last_3d`` for 3D ones (NCDHW)."""
    if dim not in _CHANNELS_LAST:
        raise ValueError(f"only 2D and 3D maps have a channels-last format, got dim={dim}")
    return _CHANNELS_LAST[dim]


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """Channels-last with a dense stride on a size-1 batch axis too (oneDNN takes any other stride there for
    a strided layout and runs its slow reference kernel, ~10x slower)."""
    t = t.contiguous(memory_format=channels_last_format(t.dim() - 2))
    if t.shape[0] == 1 and t.stride(0) != t.numel():
        t = t.as_strided(t.shape, (t.numel(), *t.stride()[1:]))
    return t


def is_channels_last(t: torch.Tensor) -> bool:
    """Stored channels-last and not also plain contiguous (the ambiguous C == 1 or one-voxel case counts as
    contiguous)."""
    return t.is_contiguous(memory_format=channels_last_format(t.dim() - 2)) and not t.is_contiguous()


# ---- shape transforms before the formulations ---------------------------------------------------------------
def crop_kernel(weight, spatial, padding, dilation):
    """Stride 1: on axes with 'same' padding (odd k, p = d·(k−1)/2) drop the kernel taps that only ever meet
    the zero padding (a map shorter than the kernel's reach, e.g. a dilated 7x7 on a 7x5 bottleneck).
    The same result with fewer FLOPs; the dropped taps get a zero gradient. Returns (weight, padding)."""
    kernel = weight.shape[2:]
    crop = [max(0, (k - 1) // 2 - (n - 1) // d) if k % 2 and p == d * (k - 1) // 2 else 0
            for k, n, p, d in zip(kernel, spatial, padding, dilation)]
    if not any(crop):
        return weight, padding
    weight = weight[(slice(None), slice(None)) + tuple(slice(c, k - c) for c, k in zip(crop, kernel))]
    return weight, tuple(p - c * d for p, c, d in zip(padding, crop, dilation))


def phases_apply(kernel, stride, padding, dilation) -> bool:
    """A dilated conv (stride 1, 'same' padding on the dilated axes) runs as a non-dilated one on the
    dilation's phase grids: oneDNN's dilated depthwise kernels are slow (in 3D, and in 2D when the padding
    exceeds the kernel, as with 7x7 dilation 3)."""
    return (any(d > 1 for d in dilation) and all(s == 1 for s in stride)
            and all(d == 1 or (k % 2 and p == d * (k - 1) // 2) for k, p, d in zip(kernel, padding, dilation)))


def space_to_batch(x: torch.Tensor, dilation: Sequence[int]) -> torch.Tensor:
    """(N, C, *S) -> (Πd·N, C, *⌈S/d⌉), channels-last, in one copy: sample n's phase (r_1, ..., r_k) (the
    voxels at r + d·m) becomes batch entry (r, n); the end is zero-padded to a multiple of d."""
    dim, (n, c) = x.dim() - 2, x.shape[:2]
    pad = []
    for size, d in zip(reversed(x.shape[2:]), reversed(dilation)):
        pad += [0, (-size) % d]
    if any(pad):
        x = F.pad(x, pad)
    reduced = [size // d for size, d in zip(x.shape[2:], dilation)]
    split = x.reshape(n, c, *[v for q, d in zip(reduced, dilation) for v in (q, d)])
    order = [3 + 2 * i for i in range(dim)] + [0] + [2 + 2 * i for i in range(dim)] + [1]
    phases = split.permute(order).contiguous().reshape(math.prod(dilation) * n, *reduced, c)
    return to_channels_last(phases.permute(0, dim + 1, *range(1, dim + 1)))


def batch_to_space(y: torch.Tensor, dilation: Sequence[int], spatial: Sequence[int], channels_last: bool):
    """Inverse of ``space_to_batch`` (cropped to ``spatial``), in the requested layout, in one copy."""
    dim, c = y.dim() - 2, y.shape[1]
    reduced = y.shape[2:]
    n = y.shape[0] // math.prod(dilation)
    t = y.permute(0, *range(2, 2 + dim), 1).reshape(*dilation, n, *reduced, c)
    interleaved = sum([[dim + 1 + i, i] for i in range(dim)], [])
    full = [q * d for q, d in zip(reduced, dilation)]
    crop = tuple(slice(0, size) for size in spatial)
    if channels_last:
        out = t.permute(dim, *interleaved, 2 * dim + 1).reshape(n, *full, c)[(slice(None),) + crop]
        return to_channels_last(out.permute(0, dim + 1, *range(1, dim + 1)))
    out = t.permute(dim, 2 * dim + 1, *interleaved).reshape(n, c, *full)
    return out[(slice(None), slice(None)) + crop].contiguous()


class SpaceToBatch(torch.autograd.Function):
    """``space_to_batch`` whose backward (``batch_to_space``) returns the gradient in the input's layout."""

    @staticmethod
    def forward(ctx, x, dilation):
        ctx.meta = (dilation, tuple(x.shape[2:]), is_channels_last(x))
        return space_to_batch(x, dilation)

    @staticmethod
    def backward(ctx, grad):
        dilation, spatial, channels_last = ctx.meta
        return batch_to_space(grad, dilation, spatial, channels_last), None


class BatchToSpace(torch.autograd.Function):
    """``batch_to_space`` whose backward is ``space_to_batch``."""

    @staticmethod
    def forward(ctx, y, dilation, spatial, channels_last):
        ctx.dilation = dilation
        return batch_to_space(y, dilation, spatial, channels_last)

    @staticmethod
    def backward(ctx, grad):
        return space_to_batch(grad, ctx.dilation), None, None, None
