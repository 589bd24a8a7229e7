"""DLKUNet S/M/L: block checksums, the official totals, one builder for the sizes, its own plans rules (the
contract every backbone keeps is in test_backbone_contract.py)."""
import pytest
import torch
import torch.nn as nn

from nnunet_lk.blocks.dlkunet import DFBUp, EBlock
from nnunet_lk.networks import NetworkConfigError, build_backbone, count_parameters


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("cin,cout,expected", [(1, 96, 27_466), (96, 192, 110_976), (192, 384, 406_272),
                                               (384, 768, 1_549_824), (768, 1536, 6_048_768)])
def test_eblock_checksum(cin, cout, expected):
    block = EBlock(nn.Conv2d, cin, cout)
    assert n_params(block) == expected == 10 * cin + cin * cout + 2 * cout ** 2 + 93 * cout


@pytest.mark.parametrize("cin,expected", [(768, 1_813_248), (384, 464_256), (192, 121_536)])
def test_dfb_checksum(cin, expected):
    assert n_params(DFBUp(nn.Conv2d, cin, cin // 2, (2, 2))) == expected


@pytest.mark.parametrize("name,expected", [("dlkunet_s", 1_131_379), ("dlkunet_m", 4_494_451),
                                           ("dlkunet_l", 17_708_659)])
def test_official_parameter_counts(name, expected):
    net = build_backbone(name, dim=2, input_channels=1, num_classes=9)
    assert count_parameters(net, deep_supervision_heads=False) == expected


def test_variants_are_configs_of_one_builder():
    nets = [build_backbone(n, dim=2, input_channels=1, num_classes=2, width=8) for n in ("dlkunet_s", "dlkunet_m")]
    assert type(nets[0]) is type(nets[1])
    assert [len(n.encoder) for n in nets] == [3, 4]


def test_width_is_configurable():
    net = build_backbone("dlkunet_m", dim=2, input_channels=1, num_classes=9, width=64)
    assert round(count_parameters(net, deep_supervision_heads=False) / 1e6, 3) == 2.046  # C=64 ablation (spec)


def test_2d_forward_odd_sizes_without_padding():
    # pad_input=False keeps the official floor pooling + pad-to-skip, which handles odd sizes.
    net = build_backbone("dlkunet_m", dim=2, input_channels=1, num_classes=3, width=8, pad_input=False).eval()
    for size in [(57, 41), (250, 232), (33, 35)]:
        with torch.no_grad():
            assert net(torch.randn(1, 1, *size)).shape == (1, 3, *size)


def test_3d_anisotropic_plans_strides_and_deep_supervision():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    net = build_backbone("dlkunet_m", dim=3, input_channels=2, num_classes=4, strides=strides,
                         kernel_sizes=kernels, patch_size=[20, 48, 40], deep_supervision=True, width=8)
    assert net.level_strides == [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)]  # M: 4 levels of the plans' 5
    # the anisotropy rule: through-plane kernels of level 0 become 1
    assert net.encoder[0].attention.dilated.kernel_size == (1, 7, 7)
    assert net.encoder[0].attention.dilated.dilation == (1, 3, 3)
    assert net.encoder[1][0].kernel_size == (1, 2, 2)  # pool kernel = stride
    outs = net(torch.randn(2, 2, 20, 48, 40))
    assert [tuple(o.shape) for o in outs] == [(2, 4, 20, 48, 40), (2, 4, 20, 24, 20), (2, 4, 10, 12, 10)]
    assert net.deep_supervision_scales == [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25]]


def test_depth_never_exceeds_plans():
    net = build_backbone("dlkunet_l", dim=2, input_channels=1, num_classes=2, width=8,
                         strides=[[1, 1], [2, 2], [2, 2]], patch_size=[32, 32])
    assert len(net.encoder) == 3 and len(net.decoder.stages) == 2


def test_instance_norm_option():
    net = build_backbone("dlkunet_s", dim=3, input_channels=1, num_classes=2, width=8, norm="instance")
    assert isinstance(net.encoder[0].norm1, nn.InstanceNorm3d) and net.encoder[0].norm1.affine
    with pytest.raises(ValueError, match="batch, instance"):
        build_backbone("dlkunet_s", dim=2, input_channels=1, num_classes=2, norm="group")


def test_unknown_backbone_and_option():
    with pytest.raises(NetworkConfigError, match="dlkunet_m"):
        build_backbone("dlkunet_xl", dim=2, input_channels=1, num_classes=2)
    with pytest.raises(NetworkConfigError, match="valid options"):
        build_backbone("dlkunet_m", dim=2, input_channels=1, num_classes=2, depth=3)


def test_bad_first_stride():
    with pytest.raises(NetworkConfigError, match="strides\\[0\\]"):
        build_backbone("dlkunet_s", dim=2, input_channels=1, num_classes=2, strides=[[2, 2], [2, 2]])


def test_gate_init_identity_is_the_default_and_differs_from_the_official_only_in_the_gate_bias():
    # our named departure (docs/architectures.md §1.10), the default since it won issue 15's comparison:
    # same parameters and keys as the official initialisation, the gate's PW bias + 1
    nets = {}
    for init in ("official", "identity", None):
        torch.manual_seed(0)
        options = {} if init is None else {"gate_init": init}
        nets[init] = build_backbone("dlkunet_m", dim=2, input_channels=1, num_classes=3, width=8, **options)
    official, identity, default = (n.state_dict() for n in nets.values())
    assert list(official) == list(identity) and count_parameters(nets["identity"]) == count_parameters(nets["official"])
    gate_biases = {k for k in official if k.endswith("attention.pointwise.bias")}
    assert len(gate_biases) == 7  # 4 encoder + 3 decoder EBlocks
    for key, value in official.items():
        torch.testing.assert_close(identity[key], value + 1 if key in gate_biases else value, rtol=0, atol=0)
        torch.testing.assert_close(default[key], identity[key], rtol=0, atol=0)
    # what the option is for: the gate passes a block's input on instead of scaling it down ~10x
    torch.manual_seed(1)
    x = torch.relu(torch.randn(4, 16, 32, 32))
    ratios = {}
    for init in ("official", "identity"):
        torch.manual_seed(2)
        block = EBlock(nn.Conv2d, 16, 16, gate_init=init).attention
        with torch.no_grad():
            ratios[init] = float(block(x).std() / x.std())
    assert ratios["official"] < 0.5 and 0.7 < ratios["identity"] < 1.5, ratios
    with pytest.raises(NetworkConfigError, match="gate_init='ones'; choose one of identity, official"):
        build_backbone("dlkunet_m", dim=2, input_channels=1, num_classes=3, gate_init="ones")
