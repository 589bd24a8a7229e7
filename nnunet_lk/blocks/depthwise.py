"""The one grouped / depthwise convolution every backbone runs (``grouped_conv``, ``LKConv2d``, ``LKConv3d``).

Why: on CPU, PyTorch's default path for depthwise convolutions (groups == channels) is slow for large
kernels, dilated kernels and above all in backward: on contiguous (NCHW/NCDHW) tensors the 3D gradients and
the 2D weight gradient from 5x5 up run at 3-7 GFLOP/s (a 3D 7³ forward+backward on 2x32x40x56x40: 3.8 s,
of which 0.05 s forward). oneDNN's channels-last forward kernels are fast, and both halves of a depthwise
backward can be written as *forward* convolutions that run on them:

- grad_input (stride 1) = depthwise conv of grad_output with the spatially flipped kernel, padding
  d·(k−1)−p ("flipped");  any stride: the transposed conv with the same kernel ("transposed");
- grad_weight = ONE depthwise conv over the batch folded into the channels ("folded"): the input viewed as
  (1, N·C, *S) channels-last, grad_output as its (N·C, 1, *S') kernel, conv stride = the dilation,
  dilation = the stride, same padding; the (1, N·C, *K') result cropped to the kernel and summed over N;
- grad_bias = the sum of grad_output;
- before any of these (stride 1): kernel taps that only ever meet the zero padding are cropped
  (``crop_kernel``: a dilated 7x7 on a 7x5 map is a 5x3), and a dilated conv runs as a non-dilated one on
  the dilation's phase grids (``space_to_batch``: oneDNN's dilated depthwise kernels are slow); both in
  ``depthwise_layout.py``.

``grouped_conv`` chooses per call by a static rule (``forward_plan``, ``grad_input_plan``,
``grad_weight_plan``), falling back to torch's own formulation where that is as fast. Results (and input
gradients) come back in the input's memory format: a contiguous network stays contiguous, a
channels-last one channels-last. The conversions are included in every measured ratio.

torch's own ``F.conv2d``/``F.conv3d`` runs, unchanged:
- on CUDA (any non-CPU device), for tensors that are not float32, under CPU autocast, when oneDNN
  (mkldnn) is unavailable or disabled (CPU float16 grouped convs in float32 arithmetic, returned in float16:
  oneDNN's float16 kernels hang on some CPUs);
- for groups == 1, grouped convs that are not depthwise (groups < channels, or a channel multiplier),
  string paddings ('same'/'valid'), 1x1 kernels (a per-channel scale);
- while exporting (ONNX, ``torch.export``), tracing/scripting (``torch.jit``) or compiling
  (``torch.compile``): ONNX gets standard ``Conv`` nodes and inductor a normal convolution; and under a
  Python dispatch mode (``FlopCounterMode``: ``nnunet-lk summary`` counts the convolution as written, not
  a cropped kernel or padded phase grids);
- everywhere when the environment variable ``NNUNET_LK_DEPTHWISE=torch`` is set (escape hatch and
  reference). Default: ``NNUNET_LK_DEPTHWISE=fast``. Read at every call, so it can be flipped at runtime.

Not supported: double backward (create_graph=True through the fast path); set NNUNET_LK_DEPTHWISE=torch.

Measurements behind the rule (docs/depthwise.md §1.1-1.6): each formulation timed against torch's default,
with the thresholds it gave; end to end, forward+backward runs 2-34x faster on the large and dilated
kernels, while 3x3, axial and 1x1 convs keep torch's path.
Results agree with torch's to float32 rounding (max relative error <= 1e-5 over every benchmarked shape).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import settings
# layouts and shape transforms (batch_to_space, space_to_batch: re-exported for tests/test_depthwise.py)
from .depthwise_layout import (BatchToSpace, SpaceToBatch, batch_to_space, crop_kernel, is_channels_last,
                               phases_apply, space_to_batch, to_channels_last)

ENV = settings.DEPTHWISE
MODES = settings.DEPTHWISE_MODES

_CONV = {2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {2: F.conv_transpose2d, 3: F.conv_transpose3d}

IntOrSeq = Union[int, Sequence[int]]


def mode() -> str:
    """``fast`` (default) or ``torch``, from the environment (``settings.depthwise_mode``)."""
    return settings.depthwise_mode()


def _torch_conv(x, weight, bias, stride, padding, dilation, groups):
    conv = F.conv2d if x.dim() == 4 else F.conv3d if x.dim() == 5 else F.conv1d
    if groups > 1 and x.device.type == "cpu" and _cpu_float16(x):
        # oneDNN's float16 grouped kernels never return on some CPUs with AVX512-FP16 once the kernel reaches 15
        # (measured: a 21x21 depthwise conv on 2x4x64x64); computed in float32, returned in float16 as autocast would
        with torch.autocast("cpu", enabled=False):
            out = conv(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding, dilation,
                       groups)
        return out.half()
    return conv(x, weight, bias, stride, padding, dilation, groups)


def _cpu_float16(x: torch.Tensor) -> bool:
    return x.dtype == torch.float16 or (x.is_floating_point() and torch.is_autocast_enabled("cpu")
                                        and torch.get_autocast_dtype("cpu") == torch.float16)


def _tuple(value, dim: int) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dim
    value = tuple(int(v) for v in value)
    return value * dim if len(value) == 1 else value


def _in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return to_channels_last(t) if channels_last else t.contiguous()


# ---- the formulations (public for the tests and benchmarks/depthwise_ops.py) ------------------------------
def forward_channels_last(x, weight, bias, stride, padding, dilation):
    """oneDNN's channels-last depthwise forward; the result is channels-last."""
    return _CONV[x.dim() - 2](to_channels_last(x), weight, bias, stride, padding, dilation, weight.shape[0])


def grad_input_flipped(grad_out, weight, padding, dilation):
    """Stride 1: grad_input = depthwise conv of grad_output with the flipped kernel (channels-last result).
    Needs padding <= d·(k−1) on every axis."""
    dim = grad_out.dim() - 2
    pad = tuple(d * (k - 1) - p for k, p, d in zip(weight.shape[2:], padding, dilation))
    flipped = weight.flip(list(range(2, 2 + dim)))
    return _CONV[dim](to_channels_last(grad_out), flipped, None, 1, pad, dilation, weight.shape[0])


def grad_input_transposed(grad_out, weight, input_shape, stride, padding, dilation):
    """Any stride: grad_input = the transposed depthwise conv of grad_output (channels-last result)."""
    dim = grad_out.dim() - 2
    out_pad = tuple(s - ((o - 1) * st - 2 * p + d * (k - 1) + 1) for s, o, st, p, d, k in
                    zip(input_shape[2:], grad_out.shape[2:], stride, padding, dilation, weight.shape[2:]))
    return _CONV_TRANSPOSE[dim](to_channels_last(grad_out), weight, None, stride, padding, out_pad,
                                weight.shape[0], dilation)


def grad_weight_folded(grad_out, x, kernel, stride, padding, dilation):
    """grad_weight as one depthwise forward conv over the batch folded into the channels (see the module
    docstring). One copy of x (into (*S, N, C) order, i.e. (1, N·C, *S) channels-last) from either
    layout; grad_output is used as an (N·C, 1, *S') kernel."""
    dim = x.dim() - 2
    n, c = x.shape[:2]
    folded = (x.permute(*range(2, 2 + dim), 0, 1).contiguous().reshape(*x.shape[2:], n * c)
              .permute(dim, *range(dim)).unsqueeze(0))
    folded = to_channels_last(folded)  # no copy: only the size-1 batch axis gets its dense stride
    kernel_of_grads = grad_out.reshape(n * c, 1, *grad_out.shape[2:])
    out = _CONV[dim](folded, kernel_of_grads, None, dilation, padding, stride, n * c)
    out = out[(slice(None), slice(None)) + tuple(slice(0, k) for k in kernel)]
    return out.reshape(n, c, *kernel).sum(0).unsqueeze(1)


def torch_backward(grad_out, x, weight, stride, padding, dilation, channels_last: bool, mask):
    """torch's own depthwise backward (``aten.convolution_backward``) in the given layout."""
    if channels_last:
        grad_out, x = to_channels_last(grad_out), to_channels_last(x)
    else:
        grad_out, x = grad_out.contiguous(), x.contiguous()
    dim = x.dim() - 2
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, list(stride), list(padding),
                                               list(dilation), False, [0] * dim, weight.shape[0], list(mask))


# ---- the rule ------------------------------------------------------------------------------------------------
# A static rule from the measurements in docs/depthwise.md §1.2-1.4. ``kernel``: per-axis sizes; ``channels``: C;
# ``batch``: N. "area" = Π(kernel). Contiguous 2D input: torch's own kernels are good for small kernels on
# many channels (converting to channels-last costs more than it saves), poor for large kernels or few
# channels; its weight gradient is poor from 5x5 up.
def forward_plan(channels_last: bool, kernel: Sequence[int], channels: int) -> str:
    """``channels_last`` (oneDNN's channels-last kernel, converting a contiguous input and the result) or
    ``torch`` (F.conv on the input as it is; on a channels-last input that is the same oneDNN kernel).
    Rule (docs/depthwise.md §1.2): channels_last for a contiguous 2D input with area >= 49 or C <= 8;
    never in 3D."""
    if channels_last or len(kernel) == 3:  # 3D: torch's NCDHW forward is as fast (0.87-1.35)
        return "torch"
    return "channels_last" if math.prod(kernel) >= 49 or channels <= 8 else "torch"


def grad_input_plan(channels_last: bool, kernel, channels: int, stride, padding, dilation) -> str:
    """``flipped`` (stride 1), ``transposed``, ``torch`` (torch's own backward in the input's layout) or
    ``torch_cl`` (torch's own backward in channels-last).
    Rule (docs/depthwise.md §1.3): flipped for contiguous 2D area >= 49 or C <= 8, 3D area >= 27,
    channels-last 2D area >= 9, channels-last 3D always; stride > 1 (or padding the flip cannot take):
    transposed, except torch's own for contiguous 2D."""
    area = math.prod(kernel)
    flippable = all(s == 1 for s in stride) and all(p <= d * (k - 1) for k, p, d in zip(kernel, padding, dilation))
    if len(kernel) == 3:
        if not flippable:
            return "transposed"
        return "flipped" if channels_last or area >= 27 else "torch"
    if not flippable:
        return "transposed" if channels_last else "torch"
    if channels_last:
        return "flipped" if area >= 9 else "torch"
    return "flipped" if area >= 49 or channels <= 8 else "torch"


def grad_weight_plan(channels_last: bool, kernel, channels: int, batch: int, stride) -> str:
    """``folded``, ``torch`` or ``torch_cl`` (as in ``grad_input_plan``).
    Rule (docs/depthwise.md §1.4): folded for contiguous 2D area >= 25 or C <= 8, 3D area >= 27
    (channels-last: and N·C >= 32), channels-last 2D area >= 49; 3D stride > 1: torch_cl."""
    area = math.prod(kernel)
    if len(kernel) == 3:
        if any(s > 1 for s in stride):
            return "torch_cl"  # the folded conv would be dilated by the stride: oneDNN's slow 3D path
        if area < 27:  # axial kernels (3x1x1): torch's own is as fast
            return "torch"
        return "folded" if not channels_last or batch * channels >= 32 else "torch"
    if channels_last:
        return "folded" if area >= 49 else "torch"
    return "folded" if area >= 25 or channels <= 8 else "torch"


def plans(x: torch.Tensor, kernel, stride, padding, dilation) -> Tuple[str, str, str]:
    """(forward, grad_input, grad_weight) formulations for this call."""
    channels_last, (batch, channels) = is_channels_last(x), x.shape[:2]
    kernel = tuple(kernel)
    return (forward_plan(channels_last, kernel, channels),
            grad_input_plan(channels_last, kernel, channels, stride, padding, dilation),
            grad_weight_plan(channels_last, kernel, channels, batch, stride))


class DepthwiseConvFunction(torch.autograd.Function):
    """The depthwise conv with the formulations ``plans`` names; ``apply(x, weight, bias, stride, padding,
    dilation, plans)`` with per-axis tuples. Works for any floating dtype (``grouped_conv`` uses it for
    float32 on CPU only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, plans):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, plans)
        ctx.has_bias = bias is not None
        return _forward(x, weight, bias, stride, padding, dilation, plans[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, (_, input_plan, weight_plan) = ctx.conv
        channels_last = is_channels_last(x)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_w = grad_b = None
        torch_x, torch_w = input_plan in ("torch", "torch_cl"), weight_plan in ("torch", "torch_cl")
        if want_x and want_w and torch_x and torch_w and input_plan == weight_plan:  # one call for both
            grad_x, grad_w, _ = torch_backward(grad_out, x, weight, stride, padding, dilation,
                                               channels_last or input_plan == "torch_cl", (True, True, False))
        else:
            if want_x:
                if input_plan == "flipped":
                    grad_x = grad_input_flipped(grad_out, weight, padding, dilation)
                elif input_plan == "transposed":
                    grad_x = grad_input_transposed(grad_out, weight, x.shape, stride, padding, dilation)
                else:
                    grad_x = torch_backward(grad_out, x, weight, stride, padding, dilation,
                                            channels_last or input_plan == "torch_cl", (True, False, False))[0]
            if want_w:
                if weight_plan == "folded":
                    grad_w = grad_weight_folded(grad_out, x, weight.shape[2:], stride, padding, dilation)
                else:
                    grad_w = torch_backward(grad_out, x, weight, stride, padding, dilation,
                                            channels_last or weight_plan == "torch_cl", (False, True, False))[1]
        if grad_x is not None:
            grad_x = _in_layout(grad_x, channels_last) if want_x else None
        if grad_w is not None:
            grad_w = grad_w.reshape(weight.shape) if want_w else None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, *range(2, grad_out.dim())))
        return grad_x, grad_w, grad_b, None, None, None, None


def _forward(x, weight, bias, stride, padding, dilation, plan: str):
    channels_last = is_channels_last(x)
    if plan == "channels_last":
        out = forward_channels_last(x, weight, bias, stride, padding, dilation)
    else:
        out = _CONV[x.dim() - 2](x, weight, bias, stride, padding, dilation, weight.shape[0])
    return _in_layout(out, channels_last)


def _counting_or_faking() -> bool:
    """A dispatch mode is active other than selective checkpointing's (which only keeps or replays outputs)."""
    mode = _get_current_dispatch_mode()
    return mode is not None and type(mode).__name__ not in ("_CachingTorchDispatchMode", "_CachedTorchDispatchMode")


def fast_path_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding,
                      groups: int) -> bool:
    """True where ``grouped_conv`` may run its own formulations (else torch's ``F.conv``)."""
    if torch.compiler.is_compiling():  # first: dynamo / torch.export see nothing but F.conv
        return False
    if groups <= 1 or x.dim() not in (4, 5) or x.device.type != "cpu" or isinstance(padding, str):
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or (bias is not None and bias.dtype != x.dtype):
        return False
    if x.shape[1] != groups or weight.dim() != x.dim() or weight.shape[:2] != (groups, 1) or x.numel() == 0:
        return False
    if mode() != "fast" or torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if _counting_or_faking():  # FlopCounterMode, FakeTensorMode, ...: the plain op (MACs)
        return False
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu"))  # autocast casts inside F.conv: leave it to torch


def grouped_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: IntOrSeq = 1,
                 padding: Union[IntOrSeq, str] = 0, dilation: IntOrSeq = 1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d``/``F.conv3d`` (same arguments, same result to float32 rounding), fast on CPU for
    depthwise convolutions; torch's own path wherever the module docstring says so."""
    if not fast_path_applies(x, weight, bias, padding, groups):
        return _torch_conv(x, weight, bias, stride, padding, dilation, groups)
    dim = x.dim() - 2
    stride, padding, dilation = _tuple(stride, dim), _tuple(padding, dim), _tuple(dilation, dim)
    if min(padding) < 0 or all(k == 1 for k in weight.shape[2:]):  # 1x1: a per-channel scale, torch's path
        return _torch_conv(x, weight, bias, stride, padding, dilation, groups)
    if all(s == 1 for s in stride):
        weight, padding = crop_kernel(weight, x.shape[2:], padding, dilation)
    if phases_apply(weight.shape[2:], stride, padding, dilation):
        inner = tuple(p // d for p, d in zip(padding, dilation))
        channels_last = is_channels_last(x)
        out = grouped_conv(SpaceToBatch.apply(x, dilation), weight, bias, 1, inner, 1, groups)
        return BatchToSpace.apply(out, dilation, tuple(x.shape[2:]), channels_last)
    chosen = plans(x, weight.shape[2:], stride, padding, dilation)
    if chosen == ("torch", "torch", "torch"):
        return _torch_conv(x, weight, bias, stride, padding, dilation, groups)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if not needs_grad:
        return _forward(x, weight, bias, stride, padding, dilation, chosen[0])
    return DepthwiseConvFunction.apply(x, weight, bias, stride, padding, dilation, chosen)


# ---- modules ---------------------------------------------------------------------------------------------------
class LKConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, state-dict keys and ``isinstance``) whose grouped convolutions run
    through ``grouped_conv``."""

    def _conv_forward(self, input, weight, bias):
        if self.groups == 1 or self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        return grouped_conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class LKConv3d(nn.Conv3d):
    """``nn.Conv3d`` counterpart of ``LKConv2d``."""

    def _conv_forward(self, input, weight, bias):
        if self.groups == 1 or self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        return grouped_conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


LK_CONV = {nn.Conv2d: LKConv2d, nn.Conv3d: LKConv3d}


def lk_conv_op(conv_op):
    """``nn.Conv2d``/``nn.Conv3d`` -> ``LKConv2d``/``LKConv3d``; anything else (already ours, or a user's own
    subclass) unchanged."""
    return LK_CONV.get(conv_op, conv_op)


__all__ = ["DepthwiseConvFunction", "ENV", "LKConv2d", "LKConv3d", "LK_CONV", "fast_path_applies", "grouped_conv",
           "is_channels_last", "lk_conv_op", "mode", "plans", "to_channels_last"]
