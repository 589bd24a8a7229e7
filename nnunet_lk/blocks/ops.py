"""Dimension-agnostic layer factories: every block takes ``conv_op`` (nn.Conv2d or nn.Conv3d, or a subclass
such as the networks' ``LKConv2d``/``LKConv3d``) and asks this module for the matching pooling, norm and
transposed-conv classes."""
from __future__ import annotations

from typing import Sequence, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .depthwise import LKConv2d, LKConv3d
from .depthwise_layout import channels_last_format

IntOrSeq = Union[int, Sequence[int]]

_DIM_OF = ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3))
_CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVG_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}
_ADAPTIVE_AVG_POOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_CONV = {2: LKConv2d, 3: LKConv3d}  # grouped convs through nnunet_lk.blocks.depthwise.grouped_conv

NORM_KINDS = ("batch", "instance")


def conv_dim(conv_op: Type[nn.Module]) -> int:
    """Spatial dimensionality (2 or 3) of a conv class (nn.Conv2d/nn.Conv3d or a subclass)."""
    dim = next((d for cls, d in _DIM_OF if isinstance(conv_op, type) and issubclass(conv_op, cls)), None)
    if dim not in (2, 3):
        raise ValueError(f"conv_op must be torch.nn.Conv2d or torch.nn.Conv3d, got {conv_op!r}")
    return dim


def conv_for_dim(dim: int) -> Type[nn.Module]:
    """The networks' conv class: ``LKConv2d``/``LKConv3d`` (nn.Conv2d/nn.Conv3d subclasses whose grouped
    convolutions run through ``grouped_conv``)."""
    if dim not in _CONV:
        raise ValueError(f"only 2D and 3D networks are supported, got dim={dim}")
    return _CONV[dim]


def set_conv_weight_layout(module: nn.Module, channels_last: bool) -> None:
    """Every conv and transposed-conv weight of ``module`` to channels-last (or back to contiguous), in place:
    the same Parameter objects, so an optimiser built before keeps working, and state dicts are unchanged."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.weight.dim() in (4, 5):
            layout = channels_last_format(m.weight.dim() - 2) if channels_last else torch.contiguous_format
            m.weight.data = m.weight.data.contiguous(memory_format=layout)


def linear_interpolation_mode(dim: int) -> str:
    """``F.interpolate``'s linear mode for a 2D (bilinear) or 3D (trilinear) map."""
    if dim not in (2, 3):
        raise ValueError(f"only 2D and 3D maps are interpolated, got dim={dim}")
    return "bilinear" if dim == 2 else "trilinear"


def conv_transpose_op(conv_op) -> Type[nn.Module]:
    return _CONV_TRANSPOSE[conv_dim(conv_op)]


def max_pool_op(conv_op) -> Type[nn.Module]:
    return _MAX_POOL[conv_dim(conv_op)]


def avg_pool_op(conv_op) -> Type[nn.Module]:
    return _AVG_POOL[conv_dim(conv_op)]


def adaptive_avg_pool_op(conv_op) -> Type[nn.Module]:
    return _ADAPTIVE_AVG_POOL[conv_dim(conv_op)]


def batch_norm_op(conv_op) -> Type[nn.Module]:
    return _BATCH_NORM[conv_dim(conv_op)]


def instance_norm_op(conv_op) -> Type[nn.Module]:
    return _INSTANCE_NORM[conv_dim(conv_op)]


def avg_pool_fn(dim: int):
    """``F.avg_pool2d`` / ``F.avg_pool3d`` (the functional form, for windows computed per input)."""
    return {2: F.avg_pool2d, 3: F.avg_pool3d}[dim]


def make_norm(kind: str, conv_op, channels: int) -> nn.Module:
    """``batch``: the papers' BatchNorm. ``instance``: nnU-Net's InstanceNorm (affine, eps 1e-5),
    the better fit for the tiny batches of 3D training."""
    dim = conv_dim(conv_op)
    if kind == "batch":
        return _BATCH_NORM[dim](channels)
    if kind == "instance":
        return _INSTANCE_NORM[dim](channels, eps=1e-5, affine=True)
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORM_KINDS)}")


def as_tuple(value: IntOrSeq, dim: int) -> tuple:
    """Broadcast an int to ``dim`` axes, or check a per-axis sequence has ``dim`` entries."""
    if isinstance(value, int):
        return (value,) * dim
    value = tuple(int(v) for v in value)
    if len(value) != dim:
        raise ValueError(f"expected {dim} per-axis values, got {list(value)}")
    return value


def same_padding(kernel: IntOrSeq, dilation: IntOrSeq, dim: int) -> tuple:
    """Padding that keeps the spatial size for odd kernels at stride 1."""
    k, d = as_tuple(kernel, dim), as_tuple(dilation, dim)
    return tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))


def anisotropic_kernel(kernel: IntOrSeq, plan_kernel: Sequence[int] | None, dim: int) -> tuple:
    """The kernel anisotropy rule: on axes where nnU-Net planned a kernel of 1 (very coarse
    through-plane spacing) every spatial kernel of that stage becomes 1 as well."""
    k = as_tuple(kernel, dim)
    if plan_kernel is None:
        return k
    pk = as_tuple(plan_kernel, dim)
    return tuple(1 if p == 1 else ki for ki, p in zip(k, pk))


def anisotropic_dilation(dilation: IntOrSeq, plan_kernel: Sequence[int] | None, dim: int) -> tuple:
    d = as_tuple(dilation, dim)
    if plan_kernel is None:
        return d
    pk = as_tuple(plan_kernel, dim)
    return tuple(1 if p == 1 else di for di, p in zip(d, pk))


def depthwise_conv(conv_op, channels: int, kernel: IntOrSeq, dilation: IntOrSeq = 1, bias: bool = True,
                   stride: IntOrSeq = 1) -> nn.Module:
    dim = conv_dim(conv_op)
    return conv_op(channels, channels, kernel_size=as_tuple(kernel, dim), stride=as_tuple(stride, dim),
                   padding=same_padding(kernel, dilation, dim), dilation=as_tuple(dilation, dim),
                   groups=channels, bias=bias)


def pointwise_conv(conv_op, cin: int, cout: int, bias: bool = True) -> nn.Module:
    return conv_op(cin, cout, kernel_size=1, bias=bias)


def adaptive_avg_pool(x, size: Sequence[int]):
    """``F.adaptive_avg_pool{2,3}d(x, size)`` as one averaging matrix per spatial axis (the bins are boxes,
    so the average is separable). Same bins as torch (start = floor(i·L/n), end = ceil((i+1)·L/n)); unlike
    torch's 3D op it exports to ONNX with dynamic spatial axes."""
    for axis, n in enumerate(size, start=2):
        length = x.shape[axis]
        i = torch.arange(n, device=x.device)
        start = (i * length) // n
        end = ((i + 1) * length + n - 1) // n
        j = torch.arange(length, device=x.device)
        inside = ((j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])).to(x.dtype)
        weights = inside / inside.sum(dim=1, keepdim=True)  # (n, length)
        x = torch.matmul(x.movedim(axis, -1), weights.t()).movedim(-1, axis)
    return x


class AxiswiseGroupNorm(nn.Module):
    """GroupNorm (InstanceNorm: one group per channel) with its mean and variance reduced one spatial axis
    at a time: the same function, for export. onnxruntime's InstanceNormalization (what both norms export
    to) sums each instance in one float32 pass, so its error grows with the voxel count (~100x torch's on a
    96³ map, tests/test_ops.py); short per-axis sums keep it near torch's level."""

    def __init__(self, num_groups: int, weight, bias, eps: float):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = weight
        self.bias = bias

    @classmethod
    def replacing(cls, norm: nn.Module) -> "AxiswiseGroupNorm":
        if isinstance(norm, nn.GroupNorm):
            return cls(norm.num_groups, norm.weight, norm.bias, norm.eps)
        return cls(norm.num_features, norm.weight, norm.bias, norm.eps)

    def forward(self, x):
        n, c = x.shape[:2]
        ones = (1,) * (x.dim() - 2)

        def group_mean(t):  # over each group's voxels (axis by axis) and channels; one value per channel
            for axis in range(t.dim() - 1, 1, -1):
                t = t.mean(axis, keepdim=True)
            if self.num_groups == c:
                return t
            per_group = t.reshape(n, self.num_groups, c // self.num_groups).mean(2, keepdim=True)
            return per_group.expand(n, self.num_groups, c // self.num_groups).reshape(n, c, *ones)

        centered = x - group_mean(x)
        y = centered * torch.rsqrt(group_mean(centered * centered) + self.eps)
        if self.weight is not None:
            y = y * self.weight.reshape(1, c, *ones) + self.bias.reshape(1, c, *ones)
        return y


def with_axiswise_norms(network: nn.Module) -> nn.Module:
    """``network`` with every GroupNorm and every InstanceNorm that normalises by the input's own statistics
    replaced in place by an ``AxiswiseGroupNorm`` sharing its parameters (the export form)."""
    for name, child in network.named_children():
        instance = isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats
        if instance or isinstance(child, nn.GroupNorm):
            setattr(network, name, AxiswiseGroupNorm.replacing(child))
        else:
            with_axiswise_norms(child)
    return network
