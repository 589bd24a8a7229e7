"""MS-LKSeg (docs/architectures.md §4.3-4.7, §5.5): block parameter formulas, block behaviour against
re-derived references, shapes on nnU-Net patches, the LD skips' kernel forms and their fused cache on load
(the contract every backbone keeps, fused == unfused included, is in test_backbone_contract.py)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_lk.blocks.mslkseg import (DynamicConv, MISBlock, MultiSemanticSpatialAttention,
                                   ProgressiveChannelSelfAttention, RepLKBlock)
from nnunet_lk.blocks.reparam import ReparamDepthwise
from nnunet_lk.networks import build_backbone, count_parameters, get_backbone, NetworkConfigError

HIPPO_2D = dict(strides=[[1, 1], [2, 2], [2, 2], [2, 2]], kernel_sizes=[[3, 3]] * 4, patch_size=(56, 40))
HIPPO_3D = dict(strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 4,
                patch_size=(40, 56, 40))
ANISO_3D = dict(strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                patch_size=(8, 24, 20))
SMALL = dict(width=4, dyconv_kernels=2)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- parameter formulas (spec §4.4-4.6)

@pytest.mark.parametrize("channels", [8, 32, 64])
def test_mie_has_11c_params_in_2d_and_13c_in_3d(channels):
    assert n_params(MultiSemanticSpatialAttention(nn.Conv2d, channels)) == 11 * channels
    # 3D: one more profile, so one more GroupNorm(4) (2C)
    assert n_params(MultiSemanticSpatialAttention(nn.Conv3d, channels)) == 13 * channels


@pytest.mark.parametrize("conv_op", [nn.Conv2d, nn.Conv3d])
@pytest.mark.parametrize("channels", [8, 48])
def test_midm_has_5c_params(conv_op, channels):
    assert n_params(ProgressiveChannelSelfAttention(conv_op, channels)) == 5 * channels


@pytest.mark.parametrize("channels", [8, 64])
def test_ld_has_2c2_plus_460c_params_in_training_form(channels):
    block = RepLKBlock(nn.Conv2d, channels)
    assert n_params(block) == 2 * channels ** 2 + 460 * channels
    if channels == 64:
        assert n_params(block) == 37_632  # the spec's worked example


def test_ld_3d_kernel_form_and_anisotropy():
    block = RepLKBlock(nn.Conv3d, 8, large_kernel=7, small_kernel=3)
    assert block.large_kernel.kernels == [(7, 7, 7), (3, 3, 3)]
    assert n_params(block) == 2 * 64 + (2 + 2 + 343 + 2 + 27 + 2 + 2) * 8
    flat = RepLKBlock(nn.Conv3d, 8, large_kernel=7, small_kernel=3, plan_kernel=[1, 3, 3])
    assert flat.large_kernel.kernels == [(1, 7, 7), (1, 3, 3)]
    assert flat.large_kernel.fused_kernel == (1, 7, 7)


def test_dyconv_param_formula_and_k1_is_plain_conv():
    conv = DynamicConv(nn.Conv2d, 8, 16, num_kernels=4)
    hidden = max(8 // 4, 4)
    assert n_params(conv) == 4 * (16 * 8 * 9 + 16) + 8 * hidden + hidden * 4 + 4
    plain = DynamicConv(nn.Conv3d, 4, 8, num_kernels=1)
    assert plain.attention is None and n_params(plain) == 8 * 4 * 27 + 8
    x = torch.randn(2, 4, 5, 6, 7)
    assert torch.allclose(plain(x), F.conv3d(x, plain.weight[0], plain.bias[0], padding=1), atol=1e-6)


def test_network_size_matches_spec_prototype():
    # §4.7: the spec's prototype with these choices (K=4, transposed-conv up, concat, 3->1, 2D) has
    # 5.68 M params at C0=16 and 22.4 M at C0=32
    c16 = count_parameters(build_backbone("mslkseg", dim=2, input_channels=3, num_classes=1, width=16),
                           deep_supervision_heads=False)
    assert c16 == 5_677_733 and round(c16 / 1e4) == 568
    c32 = count_parameters(build_backbone("mslkseg", dim=2, input_channels=3, num_classes=1, width=32),
                           deep_supervision_heads=False)
    assert round(c32 / 1e5) == 224


# ---------------------------------------------------------------- block behaviour

def test_dyconv_mixes_kernels_per_sample():
    torch.manual_seed(0)
    conv = DynamicConv(nn.Conv2d, 3, 5, num_kernels=3, temperature=2.0)
    x = torch.randn(2, 3, 9, 7)
    alpha = torch.softmax(conv.attention(x.mean(dim=(2, 3))) / 2.0, dim=1)
    out = conv(x)
    for b in range(2):
        weight = torch.einsum("k,koihw->oihw", alpha[b], conv.weight)
        bias = alpha[b] @ conv.bias
        assert torch.allclose(out[b:b + 1], F.conv2d(x[b:b + 1], weight, bias, padding=1), atol=1e-5)
    assert torch.allclose(conv(x[1:]), out[1:], atol=1e-5)  # samples do not leak into each other


def test_mie_matches_scsa_smsa_reference_2d():
    torch.manual_seed(1)
    mie = MultiSemanticSpatialAttention(nn.Conv2d, 8)
    for norm in mie.norms:  # non-trivial affine GN so the reference checks which GN is used where
        nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 6, 5)

    def profile_gate(profile, norm):
        parts = [conv(chunk) for conv, chunk in zip(mie.shared_convs, profile.split(2, dim=1))]
        return torch.sigmoid(norm(torch.cat(parts, dim=1)))

    gate_h = profile_gate(x.mean(dim=3), mie.norms[0])  # B×C×H
    gate_w = profile_gate(x.mean(dim=2), mie.norms[1])  # B×C×W
    expected = x * gate_h[:, :, :, None] * gate_w[:, :, None, :]
    assert torch.allclose(mie(x), expected, atol=1e-6)
    assert [c.kernel_size[0] for c in mie.shared_convs] == [3, 5, 7, 9]


def test_mie_3d_flat_axis_uses_centre_tap_only():
    torch.manual_seed(2)
    mie = MultiSemanticSpatialAttention(nn.Conv3d, 4, plan_kernel=[1, 3, 3])
    x = torch.randn(1, 4, 5, 6, 6)
    perm = torch.tensor([3, 0, 4, 1, 2])
    # no context along axis 0: permuting slices permutes the output
    assert torch.allclose(mie(x[:, :, perm]), mie(x)[:, :, perm], atol=1e-6)
    iso = MultiSemanticSpatialAttention(nn.Conv3d, 4)
    iso.load_state_dict(mie.state_dict())
    assert not torch.allclose(iso(x[:, :, perm]), iso(x)[:, :, perm], atol=1e-4)


def test_midm_matches_scsa_pcsa_reference():
    torch.manual_seed(3)
    midm = ProgressiveChannelSelfAttention(nn.Conv2d, 8, window=7, heads=2)
    nn.init.normal_(midm.norm.weight), nn.init.normal_(midm.norm.bias)
    x = torch.randn(2, 8, 15, 10)  # pooled with window (7, 7) -> 2×1
    y = midm.norm(F.avg_pool2d(x, 7, 7))
    q, k, v = (m(y).reshape(2, 2, 4, -1) for m in (midm.query, midm.key, midm.value))
    attn = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # (C/heads)^-0.5 = 1/2
    gate = torch.sigmoid((attn @ v).mean(-1)).reshape(2, 8, 1, 1)
    assert torch.allclose(midm(x), x * gate, atol=1e-6)
    # window guard: maps smaller than the window pool with window = size on that axis
    tiny = torch.randn(1, 8, 3, 2, 4)
    assert ProgressiveChannelSelfAttention(nn.Conv3d, 8)(tiny).shape == tiny.shape


def test_mis_block_order_and_width_change():
    block = MISBlock(nn.Conv2d, 3, 8, dyconv_kernels=2)
    assert [name for name, _ in block.named_children()] == ["dyconv", "mie", "midm"]
    assert block(torch.randn(2, 3, 10, 12)).shape == (2, 8, 10, 12)


# ---------------------------------------------------------------- re-parameterisation


def trained_bn_net(dim, **kwargs):
    torch.manual_seed(4)
    net = build_backbone("mslkseg", dim=dim, input_channels=2, num_classes=3, **kwargs)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.normal_(m.bias, std=0.2)
    net.train()
    shape = kwargs["patch_size"]
    with torch.no_grad():
        for _ in range(3):  # running stats away from (0, 1)
            net(torch.randn(2, 2, *shape) * 2 + 0.5)
    return net


def test_load_state_dict_refuses_with_new_weights_and_ds_on_loads_into_ds_off():
    source = trained_bn_net(2, width=4, dyconv_kernels=2, deep_supervision=True, **HIPPO_2D).eval()
    target = build_backbone("mslkseg", dim=2, input_channels=2, num_classes=3, width=4, dyconv_kernels=2,
                            deep_supervision=False, **HIPPO_2D).eval()
    x = torch.randn(1, 2, 56, 40)
    with torch.no_grad():
        target(x)  # fused with its own initial weights
        target.load_state_dict(source.state_dict(), strict=True)
        assert not any(m.is_fused for m in target.modules() if isinstance(m, ReparamDepthwise))
        source.decoder.deep_supervision = False
        assert torch.allclose(target(x), source(x), atol=1e-6)


# ---------------------------------------------------------------- shapes and deep supervision

def test_2d_hippocampus_patch_and_deep_supervision():
    net = build_backbone("mslkseg", dim=2, input_channels=1, num_classes=3, deep_supervision=True, **SMALL,
                         **HIPPO_2D)
    assert len(net.encoder) == 4  # min(5 paper levels, 4 plan stages)
    with torch.no_grad():
        outs = net(torch.randn(2, 1, 56, 40))
    assert [tuple(o.shape) for o in outs] == [(2, 3, 56, 40), (2, 3, 28, 20), (2, 3, 14, 10)]
    assert net.deep_supervision_scales == [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]]
    net.decoder.deep_supervision = False
    with torch.no_grad():
        assert net(torch.randn(1, 1, 56, 40)).shape == (1, 3, 56, 40)


def test_3d_hippocampus_patch_and_deep_supervision():
    net = build_backbone("mslkseg", dim=3, input_channels=1, num_classes=3, deep_supervision=True, **SMALL,
                         **HIPPO_3D).eval()
    assert net.skip_fusion.blocks[0].large_kernel.fused_kernel == (7, 7, 7)
    with torch.no_grad():
        outs = net(torch.randn(1, 1, 40, 56, 40))
    assert [tuple(o.shape[2:]) for o in outs] == [(40, 56, 40), (20, 28, 20), (10, 14, 10)]


def test_3d_anisotropic_plan():
    net = build_backbone("mslkseg", dim=3, input_channels=1, num_classes=2, deep_supervision=True, **SMALL,
                         **ANISO_3D)
    assert net.level_strides == [(1, 1, 1), (1, 2, 2), (2, 2, 2)]
    level0, level1 = net.encoder[0][0], net.encoder[1][1]
    assert level0.dyconv.conv.kernel == (1, 3, 3) and level1.dyconv.conv.kernel == (3, 3, 3)
    assert level0.mie.centre_only == (True, False, False)
    assert [b.large_kernel.fused_kernel for b in net.skip_fusion.blocks] == [(1, 7, 7), (7, 7, 7)]
    assert isinstance(net.encoder[1][0], nn.MaxPool3d) and net.encoder[1][0].kernel_size == (1, 2, 2)
    assert net.decoder.stages[-1].up.stride == (1, 2, 2)
    with torch.no_grad():
        outs = net(torch.randn(1, 1, 8, 24, 20))
    assert [tuple(o.shape[2:]) for o in outs] == [(8, 24, 20), (8, 12, 10)]
    assert net.deep_supervision_scales == [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5]]


def test_paper_pyramid_and_config_variants():
    spec = get_backbone("mslkseg")
    assert spec.dims == (2, 3) and spec.config["ld_kernel"] == 21 and spec.config["ld_kernel_3d"] == 7
    net = build_backbone("mslkseg", dim=2, input_channels=3, num_classes=2, width=4, dyconv_kernels=1,
                         upsample="interpolate", downsample="avgpool", norm="instance", decoder_conv_bias=True,
                         patch_size=(48, 40))
    assert len(net.encoder) == 5 and isinstance(net.encoder[1][0], nn.AvgPool2d)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 48, 40)).shape == (1, 2, 48, 40)  # padded to 16 inside, cropped back


@pytest.mark.parametrize("overrides, fragment", [
    (dict(width=6), "divisible by 4"),
    (dict(width=8, midm_heads=3), "midm_heads"),
    (dict(ld_small_kernel=23), "ld_kernel"),
    (dict(ld_kernel=20), "odd"),
    (dict(dyconv_kernels=0), "dyconv_kernels"),
    (dict(upsample="pixelshuffle"), "upsample"),
    (dict(norm="group"), "norm"),
    (dict(ld_size=3), "unknown option"),
])
def test_bad_configurations_raise(overrides, fragment):
    with pytest.raises(NetworkConfigError, match=fragment):
        build_backbone("mslkseg", dim=2, input_channels=1, num_classes=2, **overrides)
