"""Structural re-parameterisation, one mechanism for every backbone that has it (MS-LKSeg's LD,
LM-Net's ReparamConv): parallel depthwise conv+BN branches with different kernels are summed in
training; for inference each BN is folded into its conv, the smaller kernels are zero-padded to the
largest and everything is summed into one depthwise conv.

The fused kernel lives in non-persistent buffers, so the state dict and nnU-Net's checkpoint format
never change. Fusion is entered on ``.eval()`` (what nnUNetv2_predict and nnU-Net's validation call),
left on ``.train()``, and redone lazily after ``load_state_dict`` in eval mode.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .depthwise import grouped_conv
from .ops import as_tuple, batch_norm_op, conv_dim, same_padding


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BN that follows a conv into the conv's weight and bias."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    conv_bias = bias if bias is not None else torch.zeros_like(std)
    fused_w = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    fused_b = beta + (conv_bias - bn.running_mean) * scale
    return fused_w, fused_b


def pad_kernel_to(weight: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """Zero-pad a conv weight's spatial axes symmetrically to ``kernel`` (all differences even)."""
    pad = []
    for have, want in zip(reversed(weight.shape[2:]), reversed(tuple(kernel))):
        diff = want - have
        if diff < 0 or diff % 2:
            raise ValueError(f"cannot centre a kernel of {tuple(weight.shape[2:])} inside {tuple(kernel)}")
        pad += [diff // 2, diff // 2]
    return F.pad(weight, pad)


class ReparamDepthwise(nn.Module):
    """Σ_b BN_b(DW_{k_b}(x)), re-parameterisable into a single DW conv with the largest kernel.

    ``kernels`` are odd per-axis sizes (an int means the same on every axis), e.g. (21, 3) for the
    RepLK block or ((5,5), (3,3), (3,1), (1,3)) for LM-Net. Every branch keeps the spatial size.
    """

    def __init__(self, conv_op, channels: int, kernels: Sequence, stride=1):
        super().__init__()
        dim = conv_dim(conv_op)
        self.dim = dim
        self.kernels = [as_tuple(k, dim) for k in kernels]
        if any(v % 2 == 0 for k in self.kernels for v in k):
            raise ValueError(f"re-parameterisable branches need odd kernels, got {self.kernels}")
        self.fused_kernel = tuple(max(k[a] for k in self.kernels) for a in range(dim))
        self.stride = as_tuple(stride, dim)
        self.branches = nn.ModuleList()
        for k in self.kernels:
            self.branches.append(nn.Sequential(
                conv_op(channels, channels, kernel_size=k, stride=self.stride, padding=same_padding(k, 1, dim),
                        groups=channels, bias=False),
                batch_norm_op(conv_op)(channels)))
        self.channels = channels
        self.fusion_enabled = True  # False: eval runs the branches (reference path for tests/benchmarks)
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)
        self._register_load_state_dict_pre_hook(self._invalidate_on_load)

    @property
    def is_fused(self) -> bool:
        return self.fused_weight is not None

    @torch.no_grad()
    def fused_parameters(self) -> Tuple[torch.Tensor, torch.Tensor]:
        weight, bias = 0, 0
        for conv, bn in self.branches:
            w, b = fold_batch_norm(conv.weight, conv.bias, bn)
            weight = weight + pad_kernel_to(w, self.fused_kernel)
            bias = bias + b
        return weight, bias

    def fuse(self):
        self.fused_weight, self.fused_bias = (t.detach() for t in self.fused_parameters())

    def unfuse(self):
        self.fused_weight, self.fused_bias = None, None

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.unfuse()
        else:
            self.fuse()
        return self

    def _invalidate_on_load(self, *args, **kwargs):
        self.unfuse()  # weights are about to change; re-fuse lazily on the next eval forward

    def forward(self, x):
        if self.training or not self.fusion_enabled:
            return sum(branch(x) for branch in self.branches)
        if not self.is_fused:
            self.fuse()
        return grouped_conv(x, self.fused_weight, self.fused_bias, stride=self.stride,
                            padding=same_padding(self.fused_kernel, 1, self.dim), groups=self.channels)


@contextmanager
def unfused(network: nn.Module):
    """Within the block, every ReparamDepthwise of ``network`` runs its parallel branches even in eval
    mode: the reference for equivalence tests and the "unfused" side of speed benchmarks."""
    modules = [m for m in network.modules() if isinstance(m, ReparamDepthwise)]
    for m in modules:
        m.fusion_enabled = False
    try:
        yield modules
    finally:
        for m in modules:
            m.fusion_enabled = True
