"""LM-Net (docs/architectures.md §3.2-3.3, §5.4): block checksums, the exact official total, neighbourhood attention
against a naive loop, nnU-Net patch shapes, its own block forms, errors (the contract every backbone keeps is in
test_backbone_contract.py)."""
import itertools

import pytest
import torch
import torch.nn as nn

from nnunet_lk.blocks.lmnet import (GlobalFeatureTransformer, LocalFeatureTransformer, MultiLevelSkipFusion,
                                    NeighborhoodAttention, ReparamConv, reparam_conv_kernels)
from nnunet_lk.networks import NetworkConfigError, build_backbone, count_parameters, get_backbone

HIPPOCAMPUS_2D = dict(strides=[[1, 1], [2, 2], [2, 2], [2, 2]], kernel_sizes=[[3, 3]] * 4, patch_size=[56, 40])
KVASIR_2D = dict(strides=[[1, 1]] + [[2, 2]] * 7, kernel_sizes=[[3, 3]] * 8, patch_size=[640, 640])
TINY = dict(width=4, heads=4, gft_heads=4)  # shape tests: the smallest widths the head counts allow


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def official():
    return build_backbone("lmnet", dim=2, input_channels=3, num_classes=2)


# ---------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("cin,e,cout,expected", [(96, 192, 96, 74_736), (12, 24, 12, 2_286), (3, 24, 12, 1_962)])
def test_reparam_conv_checksums(cin, e, cout, expected):
    block = ReparamConv(nn.Conv2d, cin, e, cout)
    formula = cin * e + 3 * e + (25 + 9 + 3 + 3 + 8) * e + e * e // 2 + e + e // 4 + e * cout + cout + cin * cout + cout
    assert n_params(block) == expected == formula
    assert [tuple(b[0].kernel_size) for b in block.mixer.branches] == [(5, 5), (3, 3), (3, 1), (1, 3)]


def test_official_total_and_module_counts():
    net = official()
    assert count_parameters(net, deep_supervision_heads=False) == 3_966_566
    enc = [n_params(m) for m in net.encoder]
    # conv1; down1 + conv2; down2 + conv3; down3 + conv4; down4 (§3.3)
    assert enc == [4_248, 2_616 + 13_176, 10_416 + 42_480, 41_568 + 149_472, 166_080]
    assert n_params(net.bottleneck) == 2_428_608  # GFT
    # skips and LFTs, level 0 first: skip4..skip1, natt4..natt1
    assert [n_params(f) for f in net.skip_fusion.fusions] == [6_540, 33_840, 135_072, 290_784]
    assert [n_params(t) for t in net.skip_fusion.transformers] == [2_892, 10_380, 40_044, 158_124]
    # decoder stages, deepest first: up1..up4 and dconv1..dconv4
    assert [n_params(s.up_conv) for s in net.decoder.stages] == [165_984, 41_520, 10_392, 2_604]
    assert [n_params(s.blocks) for s in net.decoder.stages] == [149_472, 42_480, 13_176, 4_572]
    assert n_params(net.decoder.seg_layers[-1]) == 26
    no_rpb = build_backbone("lmnet", dim=2, input_channels=3, num_classes=2, rel_pos_bias=False)
    assert count_parameters(no_rpb, deep_supervision_heads=False) == 3_965_366


def test_block_structure_and_defaults():
    spec = get_backbone("lmnet")
    assert spec.config == dict(levels=5, width=12, heads=12, gft_heads=12, na_kernel=3, rel_pos_bias=True,
                               checkpoint_attention=True, memory_lean="auto", checkpoint_style="off")  # the last two:
    # every backbone's
    gft = GlobalFeatureTransformer(nn.Conv2d, 372, 192, heads=12)
    assert gft.attention.heads == 12 and gft.mlp[0].out_features == 744
    lft = LocalFeatureTransformer(nn.Conv2d, 96, heads=12)
    assert lft.attention.head_dim == 8 and tuple(lft.attention.rpb.shape) == (12, 5, 5)
    m3 = MultiLevelSkipFusion(nn.Conv2d, 48, lower_channels=24, upper_channels=96, lower_stride=(2, 2))
    assert n_params(m3) == 135_072 and m3.fuse[0].in_channels == 144
    assert reparam_conv_kernels(3, [1, 3, 3]) == [(1, 5, 5), (1, 3, 3), (1, 1, 1), (1, 3, 1), (1, 1, 3)]


# ---------------------------------------------------------------- neighbourhood attention

def naive_neighbourhood_attention(na: NeighborhoodAttention, x: torch.Tensor) -> torch.Tensor:
    """Query-by-query reference of natten's semantics written from the spec (§3.2)."""
    b, *spatial, c = x.shape
    h, d = na.heads, na.head_dim
    q, k, v = na.qkv(x).reshape(b, *spatial, 3, h, d).unbind(-3)  # (B, *S, h, d)
    q = q * d ** -0.5
    out = torch.zeros(b, *spatial, h, d, dtype=x.dtype)
    for pos in itertools.product(*[range(n) for n in spatial]):
        ranges = []
        for i, n, kk in zip(pos, spatial, na.kernel):
            w = min(kk, n)
            start = min(max(i - kk // 2, 0), n - w)
            ranges.append(range(start, start + w))
        keys = list(itertools.product(*ranges))
        logits = []
        for key in keys:
            logit = (q[(slice(None),) + pos] * k[(slice(None),) + key]).sum(-1)  # (B, h)
            if na.rpb is not None:
                rel = tuple(kp - p + kk - 1 for kp, p, kk in zip(key, pos, na.kernel))
                logit = logit + na.rpb[(slice(None),) + rel]
            logits.append(logit)
        attn = torch.stack(logits, -1).softmax(-1)  # (B, h, K)
        out[(slice(None),) + pos] = sum(attn[..., n, None] * v[(slice(None),) + key] for n, key in enumerate(keys))
    return na.proj(out.reshape(b, *spatial, c))


@pytest.mark.parametrize("spatial,kernel,rpb", [
    ((5, 7), 3, True),          # odd sizes, borders on both axes
    ((3, 6), 3, True),          # axis length == kernel: every query sees the whole axis
    ((7, 6), 5, True),          # wider kernel: windows shift inwards by up to 2
    ((2, 5), 3, False),         # axis shorter than the kernel ([ASSUMED] whole axis), no bias
    ((3, 4, 5), 3, True),       # 3D neighbourhoods
    ((3, 4, 5), (1, 3, 3), True),  # anisotropy rule
])
def test_neighbourhood_attention_matches_naive_loop(spatial, kernel, rpb):
    torch.manual_seed(0)
    na = NeighborhoodAttention(len(spatial), 12, heads=3, kernel=kernel, rel_pos_bias=rpb).double()
    if rpb:
        assert tuple(na.rpb.shape) == (3,) + tuple(2 * k - 1 for k in na.kernel)
        with torch.no_grad():
            na.rpb.normal_()  # make the bias matter
    x = torch.randn(2, *spatial, 12, dtype=torch.float64)
    torch.testing.assert_close(na(x), naive_neighbourhood_attention(na, x), rtol=1e-10, atol=1e-10)


def _spy_on_the_sliced_form(monkeypatch) -> list:
    """The shapes of q in every call of LM-Net's sliced attention form from here on."""
    from nnunet_lk.blocks import lmnet
    calls, sliced = [], lmnet.sliced_neighborhood_attention

    def spy(*args):
        calls.append(args[0].shape)
        return sliced(*args)
    monkeypatch.setattr(lmnet, "sliced_neighborhood_attention", spy)
    return calls


def test_cpu_inference_on_large_maps_runs_the_sliced_form(monkeypatch):
    from nnunet_lk.blocks import lmnet
    calls = _spy_on_the_sliced_form(monkeypatch)
    torch.manual_seed(0)
    na = NeighborhoodAttention(3, 12, heads=3, kernel=3).double().eval()
    x = torch.randn(1, 3, 4, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        reference = na(x)  # 60 voxels: below the threshold
    assert not calls
    monkeypatch.setattr(lmnet, "SLICED_MIN_VOXELS", 60)
    with torch.no_grad():
        out = na(x)
    assert len(calls) == 1
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    na(x)  # with gradients: the reference form (training keeps its memory rules)
    assert len(calls) == 1


def test_neighbourhood_attention_border_windows_are_shifted_not_padded():
    """A key only visible from the border window proves the shift: with k=3 on a length-5 axis query 0
    attends to keys {0, 1, 2}, so a huge value at key 2 dominates query 0 (zero padding would not)."""
    na = NeighborhoodAttention(2, 1, heads=1, kernel=3, rel_pos_bias=False).double()
    with torch.no_grad():
        na.qkv.weight.zero_()
        na.qkv.bias.copy_(torch.tensor([1.0, 1.0, 0.0]))  # equal logits everywhere
        na.qkv.weight[2, 0] = 1.0  # value = input
        na.proj.weight.fill_(1.0)
        na.proj.bias.zero_()
    x = torch.zeros(1, 1, 5, 1, dtype=torch.float64)
    x[0, 0, 2, 0] = 9.0
    out = na(x)[0, 0, :, 0]
    torch.testing.assert_close(out, torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0], dtype=torch.float64))
    x2 = torch.zeros_like(x)
    x2[0, 0, 3, 0] = 9.0  # key 3 is outside query 0's window but inside query 4's shifted one
    out2 = na(x2)[0, 0, :, 0]
    torch.testing.assert_close(out2, torch.tensor([0.0, 0.0, 3.0, 3.0, 3.0], dtype=torch.float64))


def test_neighbourhood_attention_checkpointing_gives_same_gradients():
    torch.manual_seed(1)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(1)
        na = NeighborhoodAttention(2, 8, heads=2, kernel=3, checkpoint=use_checkpoint).train()
        x = torch.randn(1, 6, 5, 8, requires_grad=True)
        na(x).square().sum().backward()
        grads.append([x.grad] + [p.grad for p in na.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- shapes on nnU-Net patches

def test_shapes_hippocampus_plans_and_deep_supervision():
    torch.manual_seed(0)
    net = build_backbone("lmnet", dim=2, input_channels=1, num_classes=3, deep_supervision=True, **HIPPOCAMPUS_2D,
                         **TINY)
    assert len(net.encoder) == 4  # depth = min(5, 4 plan stages)
    assert net.deep_supervision_scales == [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]]
    outs = net(torch.randn(2, 1, 56, 40))
    assert [tuple(o.shape) for o in outs] == [(2, 3, 56, 40), (2, 3, 28, 20), (2, 3, 14, 10)]
    net.decoder.deep_supervision = False
    assert net(torch.randn(2, 1, 56, 40)).shape == (2, 3, 56, 40)


def test_native_pyramid_pads_inside_and_crops_back():
    """56x40 is not a multiple of 16: padded to 64x48 inside, every output cropped back."""
    net = build_backbone("lmnet", dim=2, input_channels=1, num_classes=2, deep_supervision=True, patch_size=[56, 40],
                         **TINY)
    assert net.size_multiple == (16, 16)
    outs = net(torch.randn(1, 1, 56, 40))
    assert [tuple(o.shape[2:]) for o in outs] == [(56, 40), (28, 20), (14, 10), (7, 5)]
    net.decoder.deep_supervision = False
    assert net(torch.randn(1, 1, 50, 38)).shape == (1, 2, 50, 38)


def test_shapes_kvasir_640_eval():
    net = build_backbone("lmnet", dim=2, input_channels=3, num_classes=2, **KVASIR_2D, **TINY).eval()
    assert len(net.encoder) == 5 and net.total_stride == (16, 16)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 640, 640)).shape == (1, 2, 640, 640)


def test_anisotropic_2d_strides():
    net = build_backbone("lmnet", dim=2, input_channels=1, num_classes=2, deep_supervision=True,
                         strides=[[1, 1], [2, 2], [2, 1], [2, 1]], kernel_sizes=[[3, 3]] * 4, patch_size=[64, 12],
                         **TINY)
    outs = net(torch.randn(1, 1, 64, 12))
    assert [tuple(o.shape[2:]) for o in outs] == [(64, 12), (32, 6), (16, 6)]


def test_3d_anisotropic_plans():
    torch.manual_seed(0)
    net = build_backbone("lmnet", dim=3, input_channels=1, num_classes=2, deep_supervision=True,
                         strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                         patch_size=[4, 16, 16], **TINY)
    level0 = net.skip_fusion.transformers[0].attention
    assert level0.kernel == (1, 3, 3) and tuple(level0.rpb.shape) == (4, 1, 5, 5)
    assert net.encoder[0][0].mixer.fused_kernel == (1, 5, 5)
    outs = net(torch.randn(2, 1, 4, 16, 16))
    assert [tuple(o.shape) for o in outs] == [(2, 2, 4, 16, 16), (2, 2, 4, 8, 8)]


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("overrides,match", [
    (dict(width=16), "width 16 cannot be split into 12"),
    (dict(width=12, gft_heads=5), "gft_heads=5"),
    (dict(levels=1), "at least 2 levels"),
    (dict(width=1, heads=1, gft_heads=1), "width 1 is too small"),
    (dict(na_kernel=4), "odd kernels"),
])
def test_bad_options_raise(overrides, match):
    with pytest.raises(NetworkConfigError, match=match):
        build_backbone("lmnet", dim=2, input_channels=1, num_classes=2, **overrides)


def test_bad_plans_raise():
    with pytest.raises(NetworkConfigError, match="needs at least 2"):
        build_backbone("lmnet", dim=2, input_channels=1, num_classes=2, strides=[[1, 1]], patch_size=[32, 32])
    with pytest.raises(NetworkConfigError, match="patch_size"):
        build_backbone("lmnet", dim=2, input_channels=1, num_classes=2, strides=[[1, 1]] + [[2, 2]] * 4,
                       patch_size=[8, 64])
    with pytest.raises(NetworkConfigError, match="unknown option"):
        build_backbone("lmnet", dim=2, input_channels=1, num_classes=2, filters=[12, 24])


@pytest.mark.parametrize("dim,symbolic,sliced", [(2, True, True), (3, False, True), (3, True, False)])
def test_onnx_export_form_of_the_attention(monkeypatch, dim, symbolic, sliced):
    """Exported in the sliced form in 2D, and in 3D only at static sizes (the export's patch model): with
    symbolic sizes the 3D sliced graph is too large for torch's ONNX optimiser, so the reference form stays."""
    calls = _spy_on_the_sliced_form(monkeypatch)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)  # what torch.onnx.export sets
    na = NeighborhoodAttention(dim, 12, heads=3, kernel=3).eval()
    assert na.static_export_form == (dim == 3)
    x = torch.randn(1, *([6] * dim), 12)
    shapes = ({axis: torch.export.Dim(f"s{axis}", min=4, max=64) for axis in range(1, dim + 1)},) if symbolic else None
    torch.export.export(na, (x,), dynamic_shapes=shapes)
    assert bool(calls) == sliced
