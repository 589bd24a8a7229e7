"""LGMSNet / LGMSNet-3D (docs/architectures.md §2.2-2.5, §5.3): block checksums, the official totals, forward
shapes on nnU-Net patches (with padding inside forward), its sparse attention, errors (the contract every
backbone keeps is in test_backbone_contract.py)."""
import pytest
import torch
import torch.nn as nn

from nnunet_lk.blocks.lgmsnet import (DepthwiseConvBranch, FusionConv, GMSBlock, LMSBlock, SparseAttention,
                                   SparseTransformer, UpConv, parity_fold, parity_patch, parity_unfold)
from nnunet_lk.networks import NetworkConfigError, build_backbone, count_parameters, get_backbone
from nnunet_lk.networks.lgmsnet import build_lgmsnet, native_widths

HIPPO_2D = dict(strides=[[1, 1], [2, 2], [2, 2], [2, 2]], kernel_sizes=[[3, 3]] * 4, patch_size=[56, 40])
HIPPO_3D = dict(strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 4,
                patch_size=[40, 56, 40])
ANISO_3D = dict(strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], patch_size=[6, 20, 12])
SMALL = dict(widths=[8, 8, 8, 8, 8, 8])  # shape-only tests


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- block checksums (§2.2, §2.3, §2.5)

@pytest.mark.parametrize("c,expected", [(16, 1384), (32, 4048), (64, 13216)])
def test_lms_checksum_2d(c, expected):
    assert expected == 2.5 * c * c + 46.5 * c
    assert n_params(LMSBlock(nn.Conv2d, c, norm="batch")) == expected


def test_lms_3d_kernels_and_norms():
    block = LMSBlock(nn.Conv3d, 16, norm="instance_plain")
    assert [b.kernel_size for b in block.branches] == [(3, 3, 3), (5, 5, 5), (7, 7, 7), (9, 9, 9)]
    # enc1 of LGMSNet-3D minus its 16->16 projection: DW 3^3..9^3 + GN(4) + PW 16->4 + 3^3 4->16, IN has no params
    assert n_params(block) == 6992 - 256
    assert isinstance(block.group_norm, nn.GroupNorm) and block.group_norm.num_groups == 4


def test_gms_part_checksums_2d():
    block = GMSBlock(nn.Conv2d, 64, 128)
    parts = {"conv_in": 73984, "mix_in": 16640, "conv_branch": 448, "transformer": 62272, "mix_out": 16640,
             "fuse": 221440}
    assert {k: n_params(getattr(block, k)) for k in parts} == parts
    assert n_params(block) == 391424
    assert block.split == (96, 32)
    assert block.transformer.ffn[1].out_features == 256  # MLP hidden = 2 x block width
    attention = block.transformer.attention
    assert (attention.heads, attention.head_dim, attention.qkv.out_features) == (4, 8, 96)


def test_gms_3d_norm_mix():
    block = GMSBlock(nn.Conv3d, 64, 128, conv_norm="instance_plain", branch_norm="batch")
    assert n_params(block) == 980800  # LGMSNet-3D encoder4
    assert isinstance(block.conv_in[1], nn.InstanceNorm3d) and not block.conv_in[1].affine
    assert isinstance(block.conv_branch.body[1], nn.BatchNorm3d)


def test_up_and_fusion_checksums():
    assert n_params(UpConv(nn.Conv2d, 128, 128)) == 147840
    assert n_params(FusionConv(nn.Conv2d, 128, 64)) == 124224
    assert n_params(FusionConv(nn.Conv2d, 32, 16)) == 8016
    assert n_params(UpConv(nn.Conv3d, 128, 128, norm="instance_plain")) == 442496
    assert n_params(FusionConv(nn.Conv3d, 32, 16, norm="instance_plain")) == 17008


def test_official_per_module_2d():
    net = build_backbone("lgmsnet", dim=2, input_channels=3, num_classes=1)
    # stem + encoder1 share our level 0
    assert [n_params(m) for m in net.encoder] == [480 + 1672, 1960, 6224, 391424, 538880]
    assert [n_params(s.up) for s in net.decoder.stages] == [147840, 73920, 18528, 4656]
    assert [n_params(s.fusion) for s in net.decoder.stages] == [833792, 262592, 31392, 8016]
    assert n_params(net.decoder.seg_layers[-1]) == 17


def test_official_total_2d():
    net = build_backbone("lgmsnet", dim=2, input_channels=3, num_classes=1, patch_size=[256, 256])
    assert count_parameters(net, deep_supervision_heads=False) == 2_321_393


def test_official_total_3d_and_modules():
    # LGMSNet-3D at 1 -> 14 (96^3); counted without a forward pass (a full 96^3 forward is too slow here)
    net = build_backbone("lgmsnet", dim=3, input_channels=1, num_classes=14, patch_size=[96, 96, 96])
    assert count_parameters(net, deep_supervision_heads=False) == 6_193_742
    assert [n_params(m) for m in net.encoder] == [448 + 6992, 7248, 19104, 980800, 1423168]
    assert [n_params(s.up) for s in net.decoder.stages] == [442496, 221248, 55328, 13840]
    assert [n_params(s.fusion) for s in net.decoder.stages] == [2307904, 630112, 67808, 17008]
    assert n_params(net.decoder.seg_layers[-1]) == 238
    assert net.size_multiple == (32, 32, 32)


# ---------------------------------------------------------------- sparse (parity) attention

def test_parity_unfold_groups_by_parity_and_round_trips():
    h, w = 6, 4
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).float()[None]
    patch = parity_patch((h, w))
    tokens = parity_unfold(coords, patch)
    assert tokens.shape == (4, h * w // 4, 2)
    for group in tokens:  # every token of a group has the same (row mod 2, col mod 2)
        assert len({(int(r) % 2, int(c) % 2) for r, c in group}) == 1
    assert torch.equal(parity_fold(tokens, coords.shape, patch), coords)
    x = torch.randn(2, 3, 4, 5, 6)
    p = parity_patch(x.shape[2:])
    assert p == (2, 1, 2)
    assert torch.equal(parity_fold(parity_unfold(x, p), x.shape, p), x)


def test_sparse_transformer_only_mixes_same_parity():
    torch.manual_seed(0)
    block = SparseTransformer(8, 16).eval()
    for size, same in [((6, 4), lambda i, j: i % 2 == 0 and j % 2 == 0),
                       ((5, 4), lambda i, j: j % 2 == 0)]:  # odd axis: dense there (patch 1)
        x = torch.randn(1, 8, *size)
        x2 = x.clone()
        x2[:, :, 0, 0] += torch.randn(8)  # not a constant shift: LayerNorm would cancel it
        with torch.no_grad():
            changed = (block(x2) - block(x)).abs().sum(1)[0] > 1e-6
        expected = torch.tensor([[same(i, j) for j in range(size[1])] for i in range(size[0])])
        assert torch.equal(changed, expected)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = SparseAttention(12, heads=4, head_dim=8)
    x = torch.randn(3, 10, 12)
    q, k, v = attn.qkv(attn.norm(x)).chunk(3, dim=-1)
    split = lambda t: t.reshape(3, 10, 4, 8).transpose(1, 2)
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) * 8 ** -0.5, dim=-1)
    expected = attn.proj((weights @ split(v)).transpose(1, 2).reshape(3, 10, 32))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_gms_and_conv_branch_run_on_odd_sizes():
    block = GMSBlock(nn.Conv3d, 8, 8).eval()
    assert block(torch.randn(1, 8, 5, 7, 6)).shape == (1, 8, 5, 7, 6)
    branch = DepthwiseConvBranch(nn.Conv2d, 4)
    for bn in (branch.body[1], branch.body[4]):
        assert torch.equal(bn.weight.detach(), torch.ones(4)) and torch.equal(bn.bias.detach(), torch.zeros(4))


# ---------------------------------------------------------------- forward shapes on nnU-Net patches

def test_forward_256_2d_official():
    net = build_backbone("lgmsnet", dim=2, input_channels=3, num_classes=1).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 256, 256)).shape == (1, 1, 256, 256)


def test_hippocampus_2d_plan_pads_and_crops():
    net = build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=3, **HIPPO_2D).eval()
    assert len(net.encoder) == 4 and net.size_multiple == (16, 16)  # 2 x total stride 8
    seen = []
    for module in net.modules():
        if isinstance(module, SparseTransformer):
            module.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape[2:])))
    with torch.no_grad():
        assert net(torch.randn(2, 1, 56, 40)).shape == (2, 3, 56, 40)
    # padded 64x48: every GMS level keeps the 2x2 parity unfold (even sizes)
    assert seen and all(s % 2 == 0 for shape in seen for s in shape)


def test_hippocampus_3d_plan_official_widths():
    net = build_backbone("lgmsnet", dim=3, input_channels=1, num_classes=3, **HIPPO_3D).eval()
    assert net.size_multiple == (16, 16, 16)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 40, 56, 40)).shape == (1, 3, 40, 56, 40)


def test_anisotropic_3d_plan():
    net = build_backbone("lgmsnet", dim=3, input_channels=2, num_classes=2, **ANISO_3D, **SMALL).eval()
    assert net.level_strides == [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert net.size_multiple == (8, 16, 16)
    # kernel anisotropy rule: level 0 planned [1,3,3] -> its LMS kernels are 1 x k x k
    lms = net.encoder[0][1]
    assert [b.kernel_size for b in lms.branches] == [(1, 3, 3), (1, 5, 5), (1, 7, 7), (1, 9, 9)]
    pools = [net.encoder[i][0] for i in range(1, 4)]
    assert [tuple(p.kernel_size) for p in pools] == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    with torch.no_grad():
        assert net(torch.randn(1, 2, 6, 20, 12)).shape == (1, 2, 6, 20, 12)
        # not padded to the unfold: odd bottleneck axes fall back to patch 1
        lean = build_backbone("lgmsnet", dim=3, input_channels=2, num_classes=2, pad_to_unfold=False,
                              **ANISO_3D, **SMALL).eval()
        assert lean.size_multiple == (4, 8, 8)
        assert lean(torch.randn(1, 2, 4, 24, 8)).shape == (1, 2, 4, 24, 8)


def test_depth_follows_plans():
    six = dict(strides=[[1, 1]] + [[2, 2]] * 5, patch_size=[64, 64])
    net = build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, **six)
    assert native_widths(6) == [16, 32, 64, 128, 128, 128]
    kinds = [type(level[-1]).__name__ for level in net.encoder]
    assert kinds == ["ConvNormAct"] * 4 + ["GMSBlock"] * 2  # LMS levels end in their projection
    assert isinstance(net.decoder.stages[0].fusion, GMSBlock)
    assert isinstance(net.decoder.stages[1].fusion[1], GMSBlock)
    assert all(isinstance(s.fusion, FusionConv) for s in net.decoder.stages[2:])
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, 40, 24)).shape == (1, 2, 40, 24)
    three = build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, levels=3, **HIPPO_2D)
    assert len(three.encoder) == 3 and [type(level[-1]).__name__ for level in three.encoder] == \
        ["ConvNormAct", "GMSBlock", "GMSBlock"]
    two = build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, levels=2, widths=[8, 8])
    with torch.no_grad():
        assert two.eval()(torch.randn(1, 1, 10, 6)).shape == (1, 2, 10, 6)


def test_norm_modes():
    inst = build_backbone("lgmsnet", dim=3, input_channels=1, num_classes=2, norm="instance", **SMALL)
    norms = [m for m in inst.modules() if isinstance(m, (nn.BatchNorm3d, nn.InstanceNorm3d))]
    assert norms and all(isinstance(m, nn.InstanceNorm3d) and m.affine for m in norms)
    batch2d = build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, **SMALL)
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in batch2d.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in inst.modules())  # LMS GN(4) kept in every mode


# ---------------------------------------------------------------- deep supervision / loading

def test_strict_load_ds_on_into_ds_off():
    torch.manual_seed(0)
    kwargs = dict(dim=2, input_channels=1, num_classes=3, **HIPPO_2D, **SMALL)
    on = build_backbone("lgmsnet", deep_supervision=True, **kwargs).eval()
    off = build_backbone("lgmsnet", deep_supervision=False, **kwargs).eval()
    off.load_state_dict(on.state_dict(), strict=True)
    x = torch.randn(1, 1, 56, 40)
    with torch.no_grad():
        torch.testing.assert_close(off(x), on(x)[0])
    assert count_parameters(on, deep_supervision_heads=True) > count_parameters(on, deep_supervision_heads=False)


# ---------------------------------------------------------------- errors

def test_errors():
    with pytest.raises(NetworkConfigError, match="18.*multiple of 4"):
        LMSBlock(nn.Conv2d, 18)
    with pytest.raises(NetworkConfigError, match="18"):
        build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, widths=[16, 18, 64, 128, 128])
    with pytest.raises(NetworkConfigError, match="3 widths"):
        build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, widths=[16, 32, 64])
    with pytest.raises(NetworkConfigError, match="Conv1d"):
        build_lgmsnet(nn.Conv1d, 1, 2)
    with pytest.raises(ValueError, match="Conv2d or torch.nn.Conv3d"):
        build_backbone("lgmsnet", conv_op=nn.Conv1d, input_channels=1, num_classes=2)
    with pytest.raises(ValueError, match="Conv2d or torch.nn.Conv3d"):
        LMSBlock(nn.Conv1d, 16)
    with pytest.raises(NetworkConfigError, match="levels=1"):
        build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, levels=1)
    with pytest.raises(NetworkConfigError, match="at least 2"):
        build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, strides=[[1, 1]])
    with pytest.raises(NetworkConfigError, match="'group'"):
        build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, norm="group")
    with pytest.raises(NetworkConfigError, match="too small"):
        build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, strides=HIPPO_2D["strides"],
                       patch_size=[4, 40])
    with pytest.raises(NetworkConfigError, match="odd"):
        FusionConv(nn.Conv2d, 15, 8)
    with pytest.raises(NetworkConfigError, match="30"):
        GMSBlock(nn.Conv2d, 16, 30)
    with pytest.raises(NetworkConfigError, match="unknown option"):
        build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=2, depth=3)


def test_registration():
    spec = get_backbone("lgmsnet")
    assert spec.dims == (2, 3)
    assert spec.config == dict(levels=None, widths=None, norm="faithful", pad_to_unfold=True, memory_lean="auto",
                               checkpoint_style="off")
