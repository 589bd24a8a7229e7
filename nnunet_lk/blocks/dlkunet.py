"""DLKUNet's blocks (docs/architectures.md §1.3, read from the official code): depthwise-separable
units, VAN-style large-kernel attention, the EBlock and the DFB up block."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import (anisotropic_dilation, anisotropic_kernel, as_tuple, conv_dim, conv_transpose_op,
                  depthwise_conv, make_norm, pointwise_conv)
from .recompute import LeanForm, lean_applies, recompute_all, recompute_cheap


class DepthwiseSeparableConv(nn.Module):
    """DW k×k (bias) then PW cin→cout (bias); no norm or activation inside."""

    def __init__(self, conv_op, cin: int, cout: int, kernel=3, plan_kernel: Sequence[int] | None = None):
        super().__init__()
        dim = conv_dim(conv_op)
        self.depthwise = depthwise_conv(conv_op, cin, anisotropic_kernel(kernel, plan_kernel, dim))
        self.pointwise = pointwise_conv(conv_op, cin, cout)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


# how the gate's last (pointwise) conv starts: "official" = PyTorch's initialisation, as the official code
# (the gate a then averages ~0 with std ~0.1, so every block scales its input down ~10x at the start);
# "identity" = its bias + 1, so a ≈ 1 and each block first passes its input on. "identity" is the default: it
# won the same-budget comparison of the gate initialisations (docs/architectures.md §1.10)
GATE_INITS = ("identity", "official")
DEFAULT_GATE_INIT = "identity"


class LargeKernelAttention(nn.Module):
    """DW 5, dilated DW 7 (d=3, effective 19), PW, then the Hadamard gate ``x * a``.
    The official code has no residual, norm or activation here (the paper's residual is not in it).
    ``gate_init``: one of ``GATE_INITS`` (same parameters either way)."""

    def __init__(self, conv_op, channels: int, plan_kernel: Sequence[int] | None = None,
                 gate_init: str = DEFAULT_GATE_INIT):
        super().__init__()
        if gate_init not in GATE_INITS:
            raise ValueError(f"gate_init={gate_init!r}; choose one of {', '.join(GATE_INITS)}")
        dim = conv_dim(conv_op)
        self.local = depthwise_conv(conv_op, channels, anisotropic_kernel(5, plan_kernel, dim))
        self.dilated = depthwise_conv(conv_op, channels, anisotropic_kernel(7, plan_kernel, dim),
                                      dilation=anisotropic_dilation(3, plan_kernel, dim))
        self.pointwise = pointwise_conv(conv_op, channels, channels)
        if gate_init == "identity":
            with torch.no_grad():
                self.pointwise.bias.add_(1.0)

    def forward(self, x):
        return x * self.pointwise(self.dilated(self.local(x)))


class EBlock(LeanForm, nn.Module):
    """(DWSep → norm → ReLU) ×2, then large-kernel attention.
    Params with BN: 10·cin + cin·cout + 2·cout² + 93·cout (2D).

    Lean form: three recomputed pieces that each start from a pointwise conv's output (what backward keeps
    anyway), so the depthwise convs, norms and ReLUs are recomputed one piece at a time; the last piece, the gate,
    is recomputed whole (its pointwise conv too: the gate a is one more map of the block's width to keep)."""

    def __init__(self, conv_op, cin: int, cout: int, norm: str = "batch",
                 plan_kernel: Sequence[int] | None = None, gate_init: str = DEFAULT_GATE_INIT):
        super().__init__()
        self.conv1 = DepthwiseSeparableConv(conv_op, cin, cout, plan_kernel=plan_kernel)
        self.norm1 = make_norm(norm, conv_op, cout)
        self.conv2 = DepthwiseSeparableConv(conv_op, cout, cout, plan_kernel=plan_kernel)
        self.norm2 = make_norm(norm, conv_op, cout)
        self.act = nn.ReLU(inplace=True)
        self.attention = LargeKernelAttention(conv_op, cout, plan_kernel=plan_kernel, gate_init=gate_init)

    def forward(self, x):
        if lean_applies(self, x):
            return self.lean_forward(self.conv1, x)
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        return self.attention(x)

    def lean_forward(self, first, *inputs):
        """The block with ``first(*inputs)`` in place of ``conv1(x)``, in the lean form."""
        y = recompute_cheap(first, *inputs, module=self.conv1)
        y = recompute_cheap(self._second, y, module=self.norm1)
        return recompute_all(self._gate, y, module=self.norm2)

    def _second(self, y):
        return self.conv2(self.act(self.norm1(y)))

    def _gate(self, y):
        return self.attention(self.act(self.norm2(y)))


def pad_to_match(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``x`` to ``reference``'s spatial size, diff//2 before and the rest after, per axis
    (the official DFB's alignment step; a no-op on patches divisible by the strides)."""
    diffs = [r - s for r, s in zip(reference.shape[2:], x.shape[2:])]
    if not any(diffs):
        return x
    pad = []
    for d in reversed(diffs):  # F.pad takes the last axis first
        pad += [d // 2, d - d // 2]
    return F.pad(x, pad)


class DFBUp(nn.Module):
    """DFB: transposed conv (kernel = stride = the stage stride), pad to the skip, concat
    [skip, up] (skip first), EBlock(2·cout → cout)."""

    def __init__(self, conv_op, cin: int, cout: int, stride: Sequence[int], norm: str = "batch",
                 plan_kernel: Sequence[int] | None = None, gate_init: str = DEFAULT_GATE_INIT):
        super().__init__()
        dim = conv_dim(conv_op)
        stride = as_tuple(stride, dim)
        self.up = conv_transpose_op(conv_op)(cin, cout, kernel_size=stride, stride=stride, bias=True)
        self.block = EBlock(conv_op, 2 * cout, cout, norm=norm, plan_kernel=plan_kernel, gate_init=gate_init)

    def forward(self, x, skip):
        x = pad_to_match(self.up(x), skip)
        if lean_applies(self.block, x):
            # the concatenation is recomputed too: backward keeps the up-sampled half only
            return self.block.lean_forward(self._first, skip, x)
        return self.block(torch.cat([skip, x], dim=1))

    def _first(self, skip, up):
        return self.block.conv1(torch.cat([skip, up], dim=1))
