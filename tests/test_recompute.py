"""blocks.recompute: what the lean forms keep and recompute, and that they compute the same thing."""
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from nnunet_lk.blocks import depthwise
from nnunet_lk.blocks.ops import depthwise_conv, pointwise_conv
from nnunet_lk.blocks.recompute import LeanForm, LeanRegion, lean_applies, recompute_all, recompute_cheap
from nnunet_lk.errors import NetworkConfigError
from nnunet_lk.networks.checkpointing import apply_memory_lean
from nnunet_lk.networks.registry import build_backbone

aten = torch.ops.aten


class ConvCounter(TorchDispatchMode):
    """Counts dense (one group) and grouped convolutions as they run."""

    def __init__(self):
        super().__init__()
        self.dense = self.grouped = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten.convolution.default:
            if args[8] == 1:
                self.dense += 1
            else:
                self.grouped += 1
        return func(*args, **(kwargs or {}))


class Unit(LeanRegion, nn.Module):
    """depthwise → BN → ReLU → pointwise → depthwise: two cheap convs around a dense one."""

    def __init__(self, channels=32):  # the pointwise conv's 32 multiply-accumulates per output: kept
        super().__init__()
        self.dw1 = depthwise_conv(nn.Conv2d, channels, 5)
        self.norm = nn.BatchNorm2d(channels)
        self.pw = pointwise_conv(nn.Conv2d, channels, channels)
        self.dw2 = depthwise_conv(nn.Conv2d, channels, 3)

    def forward(self, x):
        return self.dw2(self.pw(torch.relu(self.norm(self.dw1(x)))))


def _backward_convolutions(run, x):
    out = run(x)
    with ConvCounter() as counter:
        out.square().sum().backward()
    return counter


def test_recompute_cheap_recomputes_grouped_convolutions_and_keeps_dense_outputs(monkeypatch):
    unit = Unit().train()
    x = torch.randn(4, 32, 64, 64, requires_grad=True)
    plain = _backward_convolutions(unit, x)
    cheap = _backward_convolutions(lambda t: recompute_cheap(unit, t, module=unit), x)
    everything = _backward_convolutions(lambda t: recompute_all(unit, t, module=unit), x)
    assert (plain.dense, plain.grouped) == (0, 0)
    assert (cheap.dense, cheap.grouped) == (0, 1)  # dw1 again (for the norm), not the pointwise conv
    assert (everything.dense, everything.grouped) == (1, 1)  # up to dw2, whose output backward never needs
    # a pointwise conv of fewer input channels than MIN_KEPT_REDUCTION is recomputed too
    from nnunet_lk.blocks import recompute
    monkeypatch.setattr(recompute, "MIN_KEPT_REDUCTION", 33)
    narrow = _backward_convolutions(lambda t: recompute_cheap(unit, t, module=unit), x)
    assert (narrow.dense, narrow.grouped) == (1, 1)


def test_recompute_cheap_computes_the_same_outputs_gradients_and_statistics_in_float32():
    # float32 on a CPU: the depthwise convs take our fast op inside the recomputation too
    torch.manual_seed(0)
    plain, lean = Unit().train(), Unit().train()
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(4, 32, 64, 64)
    assert depthwise.fast_path_applies(x, plain.dw1.weight, plain.dw1.bias, (2, 2), 32)
    results = []
    for unit, run in ((plain, plain), (lean, lambda t: recompute_cheap(lean, t, module=lean))):
        xi = x.clone().requires_grad_()
        out = run(xi)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in unit.named_parameters()}))
    (out, gx, grads), (out_l, gx_l, grads_l) = results
    torch.testing.assert_close(out_l, out, rtol=0, atol=0)
    torch.testing.assert_close(gx_l, gx, rtol=1e-5, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads_l[n], grads[n], rtol=1e-5, atol=1e-4, msg=lambda m: f"{n}: {m}")
    for (n, a), b in zip(plain.state_dict().items(), lean.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{n}: {m}")  # statistics advanced once


def test_auto_is_lean_on_an_accelerator_and_plain_on_a_cpu():
    unit = Unit().train()
    unit.memory_lean = "auto"
    x = torch.empty(1, 32, 4, 4)
    assert lean_applies(unit, x.to("meta"))
    assert not lean_applies(unit, x)
    unit.memory_lean = True
    assert lean_applies(unit, x)
    assert not lean_applies(unit.eval(), x)  # evaluation runs the plain forward
    with torch.no_grad():
        assert not lean_applies(unit.train(), x)


def _outermost_regions(module):
    found = []
    for child in module.children():
        found += [child] if isinstance(child, LeanRegion) else _outermost_regions(child)
    return found


@pytest.mark.parametrize("name", ["lgmsnet", "lmnet", "mslkseg"])
def test_the_option_reaches_every_lean_block_and_a_region_inside_another_runs_plainly(name, monkeypatch):
    from nnunet_lk.blocks import recompute
    net = build_backbone(name, dim=2, input_channels=1, num_classes=2, memory_lean=True).train()
    lean = [m for m in net.modules() if isinstance(m, LeanForm)]
    assert lean and all(m.memory_lean is True for m in lean)
    assert not any("forward" in vars(m) for m in net.modules())  # flags only: nothing bound to an instance
    calls = []
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    net(torch.randn(1, 1, 64, 64))
    regions = _outermost_regions(net)
    # one selective checkpoint per outermost region call (blocks with their own forms add their pieces)
    region_calls = [fn for fn in calls if getattr(fn, "__func__", None) is LeanRegion._region_call]
    assert {id(fn.__self__) for fn in region_calls} == {id(m) for m in regions}


def test_a_deep_copy_computes_with_its_own_weights():
    # export copies the network before replacing its norms: the copy's forward must not reach back to the original
    import copy
    net = build_backbone("lmnet", dim=2, input_channels=1, num_classes=2, width=12, levels=3, memory_lean=True,
                         checkpoint_style="stages").train()
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    fresh = build_backbone("lmnet", dim=2, input_channels=1, num_classes=2, width=12, levels=3,
                           memory_lean=False).train()
    fresh.load_state_dict(twin.state_dict())
    for m in [*twin.modules(), *fresh.modules(), *net.modules()]:
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x = torch.randn(2, 1, 32, 32)
    for mode in ("train", "eval"):  # lean and checkpointed in training; plain in evaluation
        expected = getattr(fresh, mode)()(x)[0]
        torch.testing.assert_close(getattr(twin, mode)()(x)[0], expected)
        assert not torch.allclose(getattr(net, mode)()(x)[0], expected)


def test_an_unknown_setting_names_the_valid_ones():
    with pytest.raises(NetworkConfigError, match=r"memory_lean='yes'; choose one of auto, True, False"):
        build_backbone("dlkunet_s", dim=2, input_channels=1, num_classes=2, memory_lean="yes")
    with pytest.raises(NetworkConfigError, match="memory_lean=1"):
        apply_memory_lean(nn.Module(), 1)


COMPILED = {"dlkunet_s": dict(width=8),  # DLKUNet's own lean form (norms inside the recomputed pieces)
            "lmnet": dict(width=12, levels=3)}  # marked outputs, a full recomputation, the streaming attention


@pytest.mark.full
@pytest.mark.parametrize("name", sorted(COMPILED))
def test_a_compiled_lean_network_trains_like_the_eager_plain_one(name):
    # torch.compile (inductor on this CPU) traces the lean forms' checkpoints; on CUDA the trainers compile by
    # default. Dropout off: compiled code draws other random numbers
    torch.manual_seed(0)
    kwargs = dict(dim=2, input_channels=1, num_classes=2, **COMPILED[name])
    plain = build_backbone(name, memory_lean=False, **kwargs).train()
    lean = build_backbone(name, memory_lean=True, **kwargs).train()
    lean.load_state_dict(plain.state_dict())
    for m in [*plain.modules(), *lean.modules()]:
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    compiled = torch.compile(lean)
    x = torch.randn(2, 1, 32, 32)
    grads = []
    for net, params in ((plain, plain), (compiled, lean)):
        out = net(x)[0]
        out.square().mean().backward()
        grads.append({n: p.grad for n, p in params.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")
    for (n, a), b in zip(plain.state_dict().items(), lean.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
