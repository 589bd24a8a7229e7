"""nnunet_lk.blocks.depthwise: the one grouped/depthwise convolution of every backbone."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_lk.blocks import depthwise as dw
from nnunet_lk.blocks.depthwise import LKConv2d, LKConv3d, grouped_conv
from nnunet_lk.errors import UsageError
from nnunet_lk.networks import build_backbone, get_backbone, list_backbones

TINY = {"dlkunet_s": dict(width=8), "dlkunet_m": dict(width=8), "dlkunet_l": dict(width=8),
        "lgmsnet": dict(widths=[8] * 6), "lmnet": dict(width=4, heads=4, gft_heads=4),
        "mslkseg": dict(width=4, dyconv_kernels=2)}
PATCH = {2: (32, 32), 3: (16, 32, 32)}


@pytest.fixture(autouse=True)
def _fast_mode(monkeypatch):
    monkeypatch.setenv(dw.ENV, "fast")


def _conv(x, *args):
    return (F.conv2d if x.dim() == 4 else F.conv3d)(x, *args)


def _rel(a, ref):
    return float((a - ref).abs().max() / ref.abs().max()) if not a.requires_grad else _rel(a.detach(), ref.detach())


# (input shape, kernel, stride, padding, dilation, groups): depthwise unless groups says otherwise
CASES = [
    ((2, 6, 17, 13), (7, 7), 1, 3, 1, 6),
    ((2, 6, 17, 13), (7, 7), 1, 9, 3, 6),          # DLKUNet's LKA: 7x7, dilation 3
    ((2, 6, 17, 13), (1, 7), 1, (0, 3), 1, 6),     # per-axis kernel
    ((2, 6, 17, 13), (5, 5), 2, 2, 1, 6),          # stride 2, odd sizes
    ((2, 6, 17, 13), (3, 3), (2, 1), 0, 1, 6),     # per-axis stride, no padding
    ((3, 8, 11, 9), (21, 21), 1, 10, 1, 8),        # kernel larger than the map
    ((2, 6, 17, 13), (1, 1), 1, 0, 1, 6),
    ((2, 6, 17, 13), (3, 3), 1, 1, 1, 2),          # grouped, not depthwise: torch's path
    ((2, 4, 7, 9, 5), (3, 3, 3), 1, 1, 1, 4),
    ((2, 4, 7, 9, 5), (1, 3, 3), 1, (0, 1, 1), 1, 4),
    ((2, 4, 7, 9, 5), (5, 5, 5), 2, 2, 1, 4),
    ((2, 4, 7, 9, 5), (3, 3, 3), 1, 2, 2, 4),
    ((2, 4, 7, 9, 5), (3, 3, 3), 1, 1, 1, 2),
    ((2, 4, 7, 9, 5), (3, 7, 7), 1, (1, 9, 9), (1, 3, 3), 4),  # 3D dilated: the phase grids
    ((2, 4, 5, 7, 5), (7, 7, 7), 1, 9, 3, 4),      # ... on a map smaller than the kernel's reach
    ((2, 6, 7, 5), (7, 7), 1, 9, 3, 6),            # 2D: taps that only meet padding are cropped
]


@pytest.mark.parametrize("case", CASES, ids=[f"{len(c[0]) - 2}D-k{c[1]}-s{c[2]}-d{c[4]}-g{c[5]}" for c in CASES])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_equals_conv_and_keeps_the_memory_format(case, bias, channels_last):
    shape, kernel, stride, padding, dilation, groups = case
    torch.manual_seed(0)
    x = torch.randn(shape)
    if channels_last:
        x = dw.to_channels_last(x)
    c = shape[1]
    w = torch.randn(c, c // groups, *kernel)
    b = torch.randn(c) if bias else None
    ref = _conv(x, w, b, stride, padding, dilation, groups)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = grouped_conv(x, w.requires_grad_(grad), b, stride, padding, dilation, groups)
        assert out.shape == ref.shape
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
        assert dw.is_channels_last(out) == channels_last
        assert out.is_contiguous() != channels_last


@pytest.mark.timeout(60)
def test_cpu_float16_large_kernel_returns_in_float16_and_matches_float32():
    # oneDNN's float16 depthwise kernels hang on some AVX512-FP16 CPUs from kernel 15 on (a 21x21: never returned):
    # explicit float16 tensors and CPU float16 autocast both finish, in float16, close to the float32 result
    x, w, b = torch.randn(2, 4, 64, 64), torch.randn(4, 1, 21, 21) / 21, torch.randn(4)
    reference = F.conv2d(x, w, b, 1, 10, 1, 4)
    half = dw.grouped_conv(x.half(), w.half(), b.half(), 1, 10, 1, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        autocast = dw.grouped_conv(x, w, b, 1, 10, 1, 4)
    for out in (half, autocast):
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=1e-2)


def test_fast_path_covers_depthwise_only():
    x, w = torch.randn(2, 6, 8, 8), torch.randn(6, 1, 3, 3)
    assert dw.fast_path_applies(x, w, None, 1, 6)
    assert not dw.fast_path_applies(x, torch.randn(6, 3, 3, 3), None, 1, 2)   # grouped, not depthwise
    assert not dw.fast_path_applies(x, torch.randn(6, 6, 3, 3), None, 1, 1)
    assert not dw.fast_path_applies(x.double(), w.double(), None, 1, 6)
    assert not dw.fast_path_applies(x, w, None, "same", 6)


# ---- gradients: every formulation, float64 gradcheck ------------------------------------------------------
GRAD_CASES = [  # shape, kernel, stride, padding, dilation
    ((2, 3, 7, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 3, 7, 6), (3, 3), (1, 1), (2, 2), (2, 2)),
    ((2, 3, 7, 6), (1, 3), (1, 1), (0, 1), (1, 1)),
    ((2, 3, 7, 6), (3, 3), (2, 2), (1, 1), (1, 1)),
    ((2, 3, 7, 6), (3, 3), (2, 1), (0, 2), (1, 1)),
    ((2, 2, 5, 4, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
    ((2, 2, 5, 4, 5), (1, 3, 3), (1, 1, 1), (0, 1, 1), (1, 1, 1)),
    ((2, 2, 5, 4, 5), (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)),
    ((2, 2, 5, 4, 5), (3, 3, 3), (1, 1, 1), (2, 2, 2), (2, 2, 2)),
]
PLANS = [("channels_last", "flipped", "folded"), ("torch", "transposed", "torch"),
         ("channels_last", "torch_cl", "torch_cl"), ("torch", "torch", "folded"), ("torch", "torch", "torch")]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[f"{len(c[0]) - 2}D-k{c[1]}-s{c[2]}-d{c[4]}" for c in GRAD_CASES])
@pytest.mark.parametrize("plans", PLANS, ids=["-".join(p) for p in PLANS])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_every_formulation(case, plans, channels_last, monkeypatch):
    shape, kernel, stride, padding, dilation = case
    forward, grad_input, grad_weight = plans
    if grad_input == "flipped" and any(s > 1 for s in stride):
        grad_input = "transposed"  # the flipped kernel is the stride-1 formulation
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = dw.to_channels_last(x)
    x.requires_grad_()
    w = torch.randn(shape[1], 1, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    calls = []
    original = dw.DepthwiseConvFunction.backward

    def counted(ctx, g):
        calls.append(1)
        return original(ctx, g)

    monkeypatch.setattr(dw.DepthwiseConvFunction, "backward", staticmethod(counted))

    def fn(x, w, b):  # the autograd Function itself (grouped_conv runs it for float32 only)
        return dw.DepthwiseConvFunction.apply(x, w, b, stride, padding, dilation, (forward, grad_input, grad_weight))

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7)
    assert calls
    out = fn(x, w, b)
    assert torch.allclose(out, _conv(x, w, b, stride, padding, dilation, shape[1]))
    assert dw.is_channels_last(out) == channels_last
    grad_x, = torch.autograd.grad(out.sum(), x)
    assert dw.is_channels_last(grad_x) == channels_last


@pytest.mark.parametrize("shape,kernel,padding,dilation", [
    ((2, 16, 24, 32, 24), (7, 7, 7), 3, 1),
    ((8, 32, 56, 40), (21, 21), 10, 1),
    ((4, 24, 40, 32), (7, 7), 9, 3),
    ((2, 8, 10, 14, 10), (7, 7, 7), 9, 3),   # phase grids
    ((8, 16, 7, 5), (7, 7), 9, 3),           # cropped kernel
])
def test_float32_gradients_match_autograd_on_realistic_shapes(shape, kernel, padding, dilation):
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(shape)
    w = (torch.randn(c, 1, *kernel) * 0.1).requires_grad_()
    b = torch.randn(c).requires_grad_()
    # the reference: torch's autograd of F.conv (on channels-last input: its fast oneDNN path, same maths)
    x_ref = dw.to_channels_last(x).requires_grad_()
    ref = _conv(x_ref, w, b, 1, padding, dilation, c)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x_ref, w, b), g)
    for channels_last in (False, True):
        x_ours = (dw.to_channels_last(x) if channels_last else x.clone()).requires_grad_()
        out = grouped_conv(x_ours, w, b, 1, padding, dilation, c)
        grads = torch.autograd.grad(out, (x_ours, w, b), dw.to_channels_last(g) if channels_last else g.contiguous())
        assert _rel(out, ref) <= 1e-5
        for name, got, want in zip(("input", "weight", "bias"), grads, ref_grads):
            assert _rel(got, want) <= 1e-4, (name, channels_last)
        assert dw.is_channels_last(grads[0]) == channels_last


def test_crop_kernel_and_phase_grids():
    w = torch.randn(4, 1, 7, 7, 7)
    cropped, padding = dw.crop_kernel(w, (5, 7, 16), (9, 9, 9), (3, 3, 3))
    assert cropped.shape[2:] == (3, 5, 7) and padding == (3, 6, 9)
    assert torch.equal(cropped, w[:, :, 2:5, 1:6, :])
    assert dw.crop_kernel(w, (5, 7, 16), (0, 9, 9), (3, 3, 3))[0].shape[2:] == (7, 5, 7)  # not 'same': kept
    assert dw.phases_apply((7, 7, 7), (1, 1, 1), (9, 9, 9), (3, 3, 3))
    assert dw.phases_apply((7, 7), (1, 1), (9, 9), (3, 3))
    assert not dw.phases_apply((7, 7), (1, 1), (3, 3), (3, 3))  # not 'same'
    assert not dw.phases_apply((7, 7, 7), (2, 2, 2), (9, 9, 9), (3, 3, 3))
    x = torch.randn(2, 3, 7, 8, 5)
    for d in ((3, 3, 3), (1, 2, 3)):
        phases = dw.space_to_batch(x, d)
        assert dw.is_channels_last(phases) and phases.shape[0] == 2 * d[0] * d[1] * d[2]
        for channels_last in (False, True):
            back = dw.batch_to_space(phases, d, x.shape[2:], channels_last)
            assert torch.equal(back, x) and dw.is_channels_last(back) == channels_last
    # phase (r0, r1, r2) of sample n holds the voxels r + d·m
    phases = dw.space_to_batch(x, (1, 2, 3))
    assert torch.equal(phases[(1 * 3 + 2) * 2 + 1, :, :, :4, :1], x[1, :, :, 1::2, 2::3])


# ---- the escape hatch ------------------------------------------------------------------------------------------
def test_env_switch_routes_to_torch(monkeypatch):
    used = {"function": 0, "forward": 0, "conv2d": 0}
    apply, forward, conv2d = dw.DepthwiseConvFunction.apply, dw._forward, F.conv2d

    def count(key, fn):
        def wrapped(*a, **k):
            used[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(dw.DepthwiseConvFunction, "apply", count("function", apply))
    monkeypatch.setattr(dw, "_forward", count("forward", forward))
    monkeypatch.setattr(F, "conv2d", count("conv2d", conv2d))
    conv = LKConv2d(4, 4, 9, padding=4, groups=4)
    x = torch.randn(2, 4, 32, 32)
    assert dw.plans(x, (9, 9), (1, 1), (4, 4), (1, 1)) == ("channels_last", "flipped", "folded")
    monkeypatch.setenv(dw.ENV, "torch")
    conv(x).sum().backward()
    with torch.no_grad():
        conv(x)
    assert used == {"function": 0, "forward": 0, "conv2d": 2}
    monkeypatch.setenv(dw.ENV, "fast")
    conv(x).sum().backward()
    with torch.no_grad():
        conv(x)
    assert used["function"] == 1 and used["forward"] == 2
    monkeypatch.setenv(dw.ENV, "slow")
    with pytest.raises(ValueError, match=dw.ENV):
        conv(x)


def test_a_bad_env_value_is_a_usage_error_naming_the_variable_value_and_choices(monkeypatch):
    monkeypatch.setenv(dw.ENV, "Slow")
    with pytest.raises(UsageError) as raised:
        dw.mode()
    message = str(raised.value)
    assert isinstance(raised.value, ValueError)  # callers catching ValueError still do
    assert "NNUNET_LK_DEPTHWISE='Slow'" in message
    assert "'fast'" in message and "'torch'" in message
    monkeypatch.setenv(dw.ENV, " Torch ")
    assert dw.mode() == "torch"
    monkeypatch.setenv(dw.ENV, "")
    assert dw.mode() == "fast"


def test_modules_keep_nn_conv_parameters_and_keys():
    for lk, plain, kernel in ((LKConv2d, nn.Conv2d, (1, 7)), (LKConv3d, nn.Conv3d, (3, 3, 3))):
        torch.manual_seed(0)
        ours = lk(6, 6, kernel, padding=tuple(k // 2 for k in kernel), groups=6)
        torch.manual_seed(0)
        ref = plain(6, 6, kernel, padding=tuple(k // 2 for k in kernel), groups=6)
        assert isinstance(ours, plain)
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(2, 6, *(7,) * len(kernel))
        assert torch.allclose(ours(x), ref(x), atol=1e-5)
        dense = lk(6, 4, 3, padding=1)  # groups == 1: torch's own path
        assert torch.equal(dense(x), dense._conv_forward(x, dense.weight, dense.bias))


def test_flop_counter_sees_the_plain_convolution():
    from nnunet_lk.analysis import count_macs
    net = nn.Sequential(LKConv2d(8, 8, 7, padding=9, dilation=3, groups=8), LKConv2d(8, 8, 21, padding=10, groups=8))
    macs = count_macs(net, (1, 8, 10, 7))  # phase grids and a cropped kernel in eager mode
    assert macs == 8 * 10 * 7 * (49 + 441)


# ---- every backbone ------------------------------------------------------------------------------------------
def _plain_build(name, dim):
    """The backbone with plain nn.Conv2d/nn.Conv3d (the builder called directly), as before LKConv."""
    from nnunet_lk.networks.registry import SKELETON_OPTIONS
    spec = get_backbone(name)
    options = {k: v for k, v in {**spec.config, **TINY[name]}.items() if k not in SKELETON_OPTIONS}  # not the builder's
    return spec.builder(nn.Conv2d if dim == 2 else nn.Conv3d, 1, 2, strides=None, kernel_sizes=None,
                        patch_size=PATCH[dim], deep_supervision=False, **options)


@pytest.mark.parametrize("name,dim", [(n, d) for n in sorted(TINY) for d in (2, 3)])
def test_every_depthwise_conv_of_every_backbone_is_ours(name, dim):
    assert name in list_backbones() and dim in get_backbone(name).dims
    torch.manual_seed(0)
    net = build_backbone(name, dim=dim, input_channels=1, num_classes=2, patch_size=PATCH[dim], **TINY[name])
    plain = _plain_build(name, dim)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    depthwise = [m for m in convs if m.groups == m.in_channels > 1]
    assert depthwise and all(isinstance(m, (LKConv2d, LKConv3d)) for m in depthwise)
    assert not [m for m in plain.modules() if isinstance(m, (LKConv2d, LKConv3d))]
    # same parameters and state-dict keys as the plain build: checkpoints load unchanged
    ours_sd, plain_sd = net.state_dict(), plain.state_dict()
    assert list(ours_sd) == list(plain_sd)
    assert all(ours_sd[k].shape == plain_sd[k].shape for k in ours_sd)
    plain.load_state_dict(ours_sd, strict=True)
    x = torch.randn(2, 1, *PATCH[dim])
    with torch.no_grad():
        out = net.eval()(x)
        ref = plain.eval()(x)
    out, ref = (o[0] if isinstance(o, (list, tuple)) else o for o in (out, ref))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_reparam_fused_and_dynamic_conv_use_grouped_conv(monkeypatch):
    from nnunet_lk.blocks import mslkseg, reparam
    used = []
    original = dw.grouped_conv

    def spy(*a, **k):
        used.append(k.get("groups", a[6] if len(a) > 6 else 1))
        return original(*a, **k)

    monkeypatch.setattr(reparam, "grouped_conv", spy)
    monkeypatch.setattr(mslkseg, "grouped_conv", spy)
    block = reparam.ReparamDepthwise(LKConv2d, 4, (5, 3)).eval()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        fused = block(x)
        with reparam.unfused(block):
            unfused = block(x)
    assert torch.allclose(fused, unfused, atol=1e-5) and used == [4]
    mslkseg.DynamicConv(LKConv2d, 4, 6, num_kernels=2)(x)
    assert used == [4, 2]


# ---- export ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_has_standard_conv_nodes(dynamo):
    onnx = pytest.importorskip("onnx")
    import warnings
    net = nn.Sequential(LKConv2d(3, 3, 7, padding=9, dilation=3, groups=3), nn.ReLU(),
                        LKConv2d(3, 4, 1), LKConv2d(4, 4, (1, 5), padding=(0, 2), groups=4)).eval()
    x = torch.randn(1, 3, 16, 16)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(net, (x,), dynamo=True, verbose=False)
            model = program.model_proto
        else:
            torch.onnx.export(net, (x,), buffer, dynamo=False)
            model = onnx.load_from_string(buffer.getvalue())
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    convs = [op for op in ops if "conv" in op[1].lower()]
    assert convs == [("", "Conv")] * 3, ops
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops
