"""blocks.recompute: what the lean forms keep and recompute, and that they compute the same thing."""
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from nnunet_lk.blocks import depthwise
from nnunet_lk.blocks.ops import depthwise_conv, pointwise_conv
from nnunet_lk.blocks.recompute import LeanRegion, lean_applies, recompute_all, recompute_cheap
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

    def __init__(self, channels=8):
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


def test_recompute_cheap_recomputes_grouped_convolutions_and_keeps_dense_outputs():
    unit = Unit().train()
    x = torch.randn(4, 8, 64, 64, requires_grad=True)  # above the size below which everything is recomputed
    plain = _backward_convolutions(unit, x)
    cheap = _backward_convolutions(lambda t: recompute_cheap(unit, t, module=unit), x)
    everything = _backward_convolutions(lambda t: recompute_all(unit, t, module=unit), x)
    assert (plain.dense, plain.grouped) == (0, 0)
    assert (cheap.dense, cheap.grouped) == (0, 1)  # dw1 again (for the norm), not the pointwise conv
    assert (everything.dense, everything.grouped) == (1, 1)  # up to dw2, whose output backward never needs


def test_recompute_cheap_computes_the_same_outputs_gradients_and_statistics_in_float32():
    # float32 on a CPU: the depthwise convs take our fast op inside the recomputation too
    torch.manual_seed(0)
    plain, lean = Unit().train(), Unit().train()
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(4, 8, 64, 64)
    assert depthwise.fast_path_applies(x, plain.dw1.weight, plain.dw1.bias, (2, 2), 8)
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
    assert lean_applies(unit, torch.empty(1, 8, 4, 4, device="meta"))
    assert not lean_applies(unit, torch.empty(1, 8, 4, 4))
    unit.memory_lean = True
    assert lean_applies(unit, torch.empty(1, 8, 4, 4))
    assert not lean_applies(unit.eval(), torch.empty(1, 8, 4, 4))  # evaluation runs the plain forward
    with torch.no_grad():
        assert not lean_applies(unit.train(), torch.empty(1, 8, 4, 4))


@pytest.mark.parametrize("setting", [True, "auto"])
def test_the_option_reaches_every_lean_block_and_wraps_only_outermost_regions(setting):
    net = build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, memory_lean=setting)
    lean = [m for m in net.modules() if getattr(m, "memory_lean", None) is not None and m is not net]
    assert lean and all(m.memory_lean == setting for m in lean)
    wrapped = [m for m in net.modules() if "forward" in vars(m)]
    assert wrapped and all(isinstance(m, LeanRegion) for m in wrapped)
    for m in wrapped:  # no region inside a wrapped one is wrapped again
        assert not any("forward" in vars(inner) for inner in m.modules() if inner is not m)
    plain = build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, memory_lean=False)
    assert not any("forward" in vars(m) for m in plain.modules())


def test_an_unknown_setting_names_the_valid_ones():
    with pytest.raises(NetworkConfigError, match=r"memory_lean='yes'; choose one of auto, True, False"):
        build_backbone("dlkunet_s", dim=2, input_channels=1, num_classes=2, memory_lean="yes")
    with pytest.raises(NetworkConfigError, match="memory_lean=1"):
        apply_memory_lean(nn.Module(), 1)


@pytest.mark.full
def test_a_compiled_lean_network_trains_like_the_eager_plain_one():
    # torch.compile (inductor on this CPU) traces the lean forms' selective checkpoints; on CUDA the trainers
    # compile by default
    torch.manual_seed(0)
    kwargs = dict(dim=2, input_channels=1, num_classes=2, width=8)
    plain = build_backbone("dlkunet_s", memory_lean=False, **kwargs).train()
    lean = build_backbone("dlkunet_s", memory_lean=True, **kwargs).train()
    lean.load_state_dict(plain.state_dict())
    compiled = torch.compile(lean)
    x = torch.randn(2, 1, 64, 64)
    grads = []
    for net, params in ((plain, plain), (compiled, lean)):
        out = net(x)[0]
        out.square().mean().backward()
        grads.append({n: p.grad for n, p in params.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-4, msg=lambda m: f"{n}: {m}")
    for (n, a), b in zip(plain.state_dict().items(), lean.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
