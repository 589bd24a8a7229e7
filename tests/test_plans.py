import numpy as np
import pytest

from nnunet_lk.networks import NetworkConfigError
from nnunet_lk.patch_sizes import MIN_STAGES
from nnunet_lk.plans import derive_plans, list_presets, load_preset, validate_configuration


def test_derive_keeps_data_and_changes_one_configuration(hippocampus_plans):
    derived = derive_plans(hippocampus_plans, "2d", "nnUNetPlans_cpu", patch_size=[48, 32], batch_size=16,
                           backbone_opts={"dlkunet_m": {"width": 32}})
    cfg = derived["configurations"]["2d"]
    assert derived["plans_name"] == "nnUNetPlans_cpu"
    assert cfg["patch_size"] == [48, 32] and cfg["batch_size"] == 16
    assert cfg["data_identifier"] == hippocampus_plans["configurations"]["2d"]["data_identifier"]
    assert cfg["nnunet_lk"] == {"dlkunet_m": {"width": 32}}
    assert derived["configurations"]["3d_fullres"] == hippocampus_plans["configurations"]["3d_fullres"]
    assert hippocampus_plans["configurations"]["2d"]["batch_size"] == 81  # the source is untouched


def test_patch_must_fit_the_strides(hippocampus_plans):
    with pytest.raises(NetworkConfigError, match="needs 2 values"):
        derive_plans(hippocampus_plans, "2d", "x", patch_size=[48, 40, 40])


@pytest.mark.parametrize("configuration,patch,below,above", [
    ("2d", [57, 41], [56, 40], [64, 48]),  # 56 40 is the planned patch itself
    ("2d", [50, 40], [48, 40], [56, 40]),
    ("3d_fullres", [25, 33, 25], [24, 32, 24], [28, 36, 28]),
])
def test_unfitting_patch_gets_the_nearest_fitting_patches_on_both_sides(hippocampus_plans, configuration, patch,
                                                                        below, above):
    flag = lambda p: "--patch " + " ".join(map(str, p))  # noqa: E731
    with pytest.raises(NetworkConfigError, match="does not fit") as error:
        derive_plans(hippocampus_plans, configuration, "x", patch_size=patch)
    assert f"{flag(below)} (nearest below) or {flag(above)} (nearest above)" in str(error.value)
    for suggested in (below, above):  # both are accepted as they are
        derived = derive_plans(hippocampus_plans, configuration, "x", patch_size=suggested)
        assert derived["configurations"][configuration]["patch_size"] == suggested


@pytest.mark.parametrize("patch", [[-56, 40], [0, 40], [56, 0]])
def test_non_positive_patch_is_refused(hippocampus_plans, patch):
    with pytest.raises(NetworkConfigError, match=r"must be a positive number of voxels.*--patch 56 40"):
        derive_plans(hippocampus_plans, "2d", "x", patch_size=patch)


@pytest.mark.parametrize("configuration,patch,smallest", [
    ("2d", [8, 8], [16, 16]), ("2d", [12, 12], [16, 16]), ("2d", [4, 6], [16, 24]),
    ("3d_fullres", [8, 8, 8], [16, 16, 16]),
])
def test_too_small_patch_is_refused_with_the_smallest_that_works(hippocampus_plans, configuration, patch, smallest):
    with pytest.raises(NetworkConfigError, match="too small.*NaN loss") as error:
        derive_plans(hippocampus_plans, configuration, "x", patch_size=patch)
    assert f"works is {smallest}: use --patch {' '.join(map(str, smallest))}" in str(error.value)
    derived = derive_plans(hippocampus_plans, configuration, "x", patch_size=smallest)
    assert derived["configurations"][configuration]["architecture"]["arch_kwargs"]["n_stages"] == MIN_STAGES
    # smallest: the same proportions one step smaller are refused
    for smaller in ([s - 1 for s in smallest], [s * 7 // 8 for s in smallest]):
        with pytest.raises(NetworkConfigError):
            derive_plans(hippocampus_plans, configuration, "x", patch_size=smaller)


def test_every_backbone_trains_on_the_smallest_patch(hippocampus_plans):
    # at least two deep-supervision outputs for every backbone, and a finite nnU-Net loss
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_lk.training.trainers import all_trainers
    from tests.helpers.tiny import TINY_OPTIONS
    plans = derive_plans(hippocampus_plans, "2d", "x", patch_size=[16, 16], backbone_opts=TINY_OPTIONS)
    pm = PlansManager(plans)
    trainers = {cls.backbone: cls for cls in all_trainers().values()}
    for backbone, cls in sorted(trainers.items()):
        net = cls.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, True)
        scales = net.deep_supervision_scales
        assert len(scales) >= 2, backbone
        weights = np.array([1 / 2 ** i for i in range(len(scales))])
        weights[-1] = 0  # what nnU-Net's trainer does
        loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False}, {}),
                                      weights / weights.sum())
        torch.manual_seed(0)
        outputs = net(torch.randn(2, 1, 16, 16))
        targets = [torch.randint(0, 3, (2, 1, *o.shape[2:])).float() for o in outputs]
        assert torch.isfinite(loss(outputs, targets)), backbone


@pytest.mark.parametrize("configuration,patch", [("2d", [56, 40]), ("3d_fullres", [40, 56, 40])])
def test_replanning_the_planned_patch_reproduces_nnunets_topology(hippocampus_plans, configuration, patch):
    derived = derive_plans(hippocampus_plans, configuration, "x", patch_size=patch)
    assert derived["configurations"][configuration] == hippocampus_plans["configurations"][configuration]


def test_smaller_patch_gets_fewer_stages_as_nnunet_would_plan(hippocampus_plans):
    # 24x32x24: two pools keep 24 at >= 4 voxels (24/8 = 3 would not); nnU-Net pools all axes together here
    derived = derive_plans(hippocampus_plans, "3d_fullres", "x", patch_size=[24, 32, 24])
    arch = derived["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 3 and arch["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert arch["kernel_sizes"] == [[3, 3, 3]] * 3
    assert arch["features_per_stage"] == [32, 64, 128]
    assert len(arch["n_conv_per_stage"]) == 3 and len(arch["n_conv_per_stage_decoder"]) == 2
    # the network nnU-Net builds from it runs on that patch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_lk.training.trainers import nnUNetTrainerLGMSNet
    import torch
    pm = PlansManager(derived)
    net = nnUNetTrainerLGMSNet.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, True)
    outputs = net(torch.randn(1, 1, 24, 32, 24))
    assert [tuple(o.shape[2:]) for o in outputs] == [(24, 32, 24), (12, 16, 12)]  # one per decoder stage


def test_unknown_backbone_or_option_in_derived_plans(hippocampus_plans):
    with pytest.raises(NetworkConfigError, match="unknown backbone 'dlkunet_q'"):
        derive_plans(hippocampus_plans, "2d", "x", backbone_opts={"dlkunet_q": {"width": 8}})
    with pytest.raises(NetworkConfigError, match="unknown option"):
        derive_plans(hippocampus_plans, "2d", "x", backbone_opts={"dlkunet_m": {"wdth": 8}})


def test_unknown_configuration_and_old_plans(hippocampus_plans):
    with pytest.raises(NetworkConfigError, match="available: 2d, 3d_fullres"):
        validate_configuration(hippocampus_plans, "3d_lowres")
    del hippocampus_plans["configurations"]["2d"]["architecture"]
    with pytest.raises(NetworkConfigError, match="unsupported nnU-Net version"):
        validate_configuration(hippocampus_plans, "2d")
    with pytest.raises(NetworkConfigError, match="not an nnU-Net v2 plans file"):
        validate_configuration({"foo": 1}, "2d")


def test_inherits_from_is_resolved(hippocampus_plans):
    hippocampus_plans["configurations"]["2d_small"] = {"inherits_from": "2d", "batch_size": 4}
    cfg = validate_configuration(hippocampus_plans, "2d_small")
    assert cfg["batch_size"] == 4 and cfg["patch_size"] == [56, 40]


def test_presets_ship_and_apply(hippocampus_plans):
    names = list_presets()
    assert names, "plans/ must ship at least one preset"
    for name in names:
        preset = load_preset(name)
        assert preset.get("description")
    derived = derive_plans(hippocampus_plans, "3d_fullres", "p", preset=load_preset("lite_3d"))
    assert derived["configurations"]["3d_fullres"]["nnunet_lk"]["dlkunet_m"]["norm"] == "instance"
    with pytest.raises(NetworkConfigError, match="unknown plans preset"):
        load_preset("no_such_preset")


def test_plans_use_names_what_a_backbone_takes_and_replaces(hippocampus_plans, hippocampus_dataset_json):
    from nnunet_lk.plans import plans_context
    from nnunet_lk.networks.registry import build_backbone
    from nnunet_lk.plans import plans_use
    config = hippocampus_plans["configurations"]["2d"]
    config["architecture"]["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    config["architecture"]["arch_kwargs"]["n_blocks_per_stage"] = config["architecture"]["arch_kwargs"].pop(
        "n_conv_per_stage")
    _pm, cm, _n_in, _n_out = plans_context(hippocampus_plans, hippocampus_dataset_json, "2d")
    net = build_backbone("lgmsnet", dim=2, input_channels=1, num_classes=3)
    line = plans_use(cm, "lgmsnet", net, "cuda")
    assert line.startswith("nnunet-lk: lgmsnet replaces these plans' ResidualEncoderUNet. It uses their patch_size "
                           "[56, 40], batch_size 81, strides, kernel_sizes")
    assert "n_blocks_per_stage" in line and "features_per_stage" in line and "strides," not in line.split("ignores")[1]
    assert "memory_lean='auto': lean forms on (cuda); checkpoint_style='off'" in line
    assert "lean forms off (cpu)" in plans_use(cm, "lgmsnet", net, "cpu")
