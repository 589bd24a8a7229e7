"""The contract every registered backbone keeps with nnU-Net, checked once for all of them (timm-style: one
suite parametrised over the registry). A new backbone gets these checks by registering; the per-backbone
files keep only what is specific to each (block checksums, the official totals, its own blocks).

Every backbone × every dimensionality it declares, built with the tiny test options on nnU-Net-like plans:
4 stages, 2D Hippocampus strides, 3D anisotropic strides (first stage planned 1×3×3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from nnunet_lk.blocks.reparam import ReparamDepthwise, unfused
from nnunet_lk.networks import NetworkConfigError, build_backbone, get_backbone, list_backbones
from tests.helpers.modelfolder import randomise_norm_statistics
from tests.helpers.tiny import TINY_OPTIONS

PLANS = {
    2: dict(strides=[[1, 1], [2, 2], [2, 2], [2, 2]], kernel_sizes=[[3, 3]] * 4, patch_size=(56, 40)),
    3: dict(strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
            kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], patch_size=(8, 24, 20)),
}
ODD_PATCH = {2: (57, 41), 3: (9, 26, 21)}  # no axis a multiple of the total stride
TOO_SMALL_PATCH = {2: (2, 40), 3: (8, 2, 20)}  # one axis below every total stride (DLKUNet-S: 4)
CASES = [pytest.param(name, dim, id=f"{name}-{dim}d") for name in list_backbones() for dim in get_backbone(name).dims]


def _net(name, dim, deep_supervision=False, seed=0, **plans):
    torch.manual_seed(seed)
    return build_backbone(name, dim=dim, input_channels=2, num_classes=3, deep_supervision=deep_supervision,
                          **{**PLANS[dim], **plans}, **TINY_OPTIONS[name])


def _input(dim, patch=None, batch=2, seed=1):
    return torch.randn(batch, 2, *(patch or PLANS[dim]["patch_size"]), generator=torch.Generator().manual_seed(seed))


def _nnunet_deep_supervision_scales(strides):
    """nnUNetTrainer._get_deep_supervision_scales: 1 / cumprod(strides), all but the coarsest."""
    return [list(s) for s in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1]


@pytest.mark.parametrize("name,dim", CASES)
def test_deep_supervision_outputs_are_nnunets_targets(name, dim):
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    net = _net(name, dim, deep_supervision=True).train()
    levels = len(net.level_strides)
    assert [list(s) for s in net.level_strides] == PLANS[dim]["strides"][:levels]  # the plans' strides, in order
    scales = net.deep_supervision_scales
    assert scales == _nnunet_deep_supervision_scales(net.level_strides)
    assert scales == _nnunet_deep_supervision_scales(PLANS[dim]["strides"])[:levels - 1]
    for patch in (PLANS[dim]["patch_size"], ODD_PATCH[dim]):
        outputs = net(_input(dim, patch))
        # what nnU-Net's data pipeline makes of a segmentation of this patch, highest resolution first
        targets = DownsampleSegForDSTransform(scales)(segmentation=torch.zeros(1, *patch))["segmentation"]
        assert len(outputs) == len(targets) == levels - 1
        assert [tuple(o.shape[2:]) for o in outputs] == [tuple(t.shape[1:]) for t in targets]
        assert all(o.shape[:2] == (2, 3) for o in outputs)


@pytest.mark.parametrize("name,dim", CASES)
def test_deep_supervision_on_state_dict_loads_strictly_into_off(name, dim):
    # training saves with deep supervision on; nnUNetv2_predict builds it off and loads strictly
    trained = randomise_norm_statistics(_net(name, dim, deep_supervision=True, seed=0)).eval()
    inference = _net(name, dim, deep_supervision=False, seed=1).eval()
    assert list(trained.state_dict()) == list(inference.state_dict())
    inference.load_state_dict(trained.state_dict(), strict=True)
    x = _input(dim)
    with torch.no_grad():
        torch.testing.assert_close(inference(x), trained(x)[0])


@pytest.mark.parametrize("name,dim", CASES)
def test_every_parameter_receives_a_gradient(name, dim):
    net = _net(name, dim, deep_supervision=True).train()
    outputs = net(_input(dim))
    sum(o.square().mean() for o in outputs).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("name,dim", CASES)
def test_odd_and_anisotropic_patches_keep_their_shape(name, dim):
    odd = ODD_PATCH[dim]
    net = _net(name, dim, patch_size=odd).eval()
    with torch.no_grad():
        assert net(_input(dim, odd, batch=1)).shape == (1, 3, *odd)
    if dim == 3:  # the anisotropy rule: kernels of the stage planned 1×3×3 are flat through-plane
        first_stage = [m for m in net.encoder[0].modules() if isinstance(m, nn.Conv3d)]
        assert first_stage and all(m.kernel_size[0] == 1 for m in first_stage if m.groups > 1)


@pytest.mark.parametrize("name,dim", CASES)
def test_too_small_patch_is_a_clear_error(name, dim):
    with pytest.raises(NetworkConfigError, match=r"too small[\s\S]*Increase 'patch_size'"):
        _net(name, dim, patch_size=TOO_SMALL_PATCH[dim])


@pytest.mark.parametrize("name,dim", CASES)
def test_eval_output_is_deterministic(name, dim):
    net = randomise_norm_statistics(_net(name, dim)).eval()
    x = _input(dim)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


def _forward(net, x):
    torch.manual_seed(3)  # the same dropout masks for both layouts
    return net(x)


def _loss_and_gradients(net, x):
    x = x.clone().requires_grad_(True)
    out = _forward(net, x)
    sum(o.square().mean() for o in out).backward()
    return out, x.grad, {n: p.grad for n, p in net.named_parameters()}


@pytest.mark.parametrize("name,dim", CASES)
def test_channels_last_entry_computes_the_same_network(name, dim):
    # the CPU channels-last entry changes layouts only: the same eval outputs (float32, our fast op), the same
    # training outputs and gradients (float64: in float32, batch statistics amplify summation-order rounding to
    # ~1e-4 in outputs and ~1e-2 relative in some gradients, in either layout) and the same state dict;
    # switching it off restores contiguous weights
    nets = {cl: _net(name, dim, deep_supervision=True).train() for cl in (False, True)}
    # the shipped choice, measured per backbone (README, "Depthwise convolutions at CPU speed")
    assert nets[False].cpu_channels_last == (name == "lmnet" or (name in ("lgmsnet", "mslkseg") and dim == 2))
    for cl, net in nets.items():
        net.cpu_channels_last = cl
        net.eval()
    with torch.no_grad():
        for a, b in zip(_forward(nets[False], _input(dim)), _forward(nets[True], _input(dim))):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    out, x_grad, grads = _loss_and_gradients(nets[False].double().train(), _input(dim).double())
    out_cl, x_grad_cl, grads_cl = _loss_and_gradients(nets[True].double().train(), _input(dim).double())
    for a, b in zip(out, out_cl):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x_grad_cl, x_grad, rtol=1e-9, atol=1e-12)
    for n, g in grads.items():
        torch.testing.assert_close(grads_cl[n], g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    convs = [m for m in nets[True].modules() if isinstance(m, nn.modules.conv._ConvNd) and m.weight.dim() > 3]
    fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
    assert convs and all(m.weight.is_contiguous(memory_format=fmt) for m in convs)
    nets[False].load_state_dict(nets[True].state_dict(), strict=True)
    nets[True].cpu_channels_last = False
    nets[True](_input(dim).double())
    assert all(m.weight.is_contiguous() for m in convs)


def _reparameterising(name, dim):
    return any(isinstance(m, ReparamDepthwise) for m in _net(name, dim).modules())


REPARAM_CASES = [p for p in CASES if _reparameterising(*p.values)]


def test_the_reparameterising_backbones_are_found():
    assert {p.values[0] for p in REPARAM_CASES} == {"lmnet", "mslkseg"}


@pytest.mark.parametrize("name,dim", REPARAM_CASES)
def test_fused_equals_unfused(name, dim):
    net = _net(name, dim).train()
    with torch.no_grad():  # BatchNorm statistics and affine parameters of a trained network
        for _ in range(3):
            net(_input(dim, seed=7) * 2 + 0.5)
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    keys = list(net.state_dict())
    net.eval()
    x = _input(dim)
    with torch.no_grad():
        fused = net(x)
        blocks = [m for m in net.modules() if isinstance(m, ReparamDepthwise)]
        assert blocks and all(m.is_fused for m in blocks)
        with unfused(net):
            reference = net(x)
    assert (fused - reference).abs().max().item() < 1e-4
    assert not torch.equal(fused, reference)  # two different computations really ran
    assert list(net.state_dict()) == keys  # the fused kernels never reach the state dict


MEMORY_OPTIONS = {"lean": {"memory_lean": True}, "stages": {"memory_lean": True, "checkpoint_style": "stages"},
                  "blocks": {"memory_lean": True, "checkpoint_style": "blocks"},
                  "stages, not lean": {"memory_lean": False, "checkpoint_style": "stages"}}


@pytest.mark.parametrize("name,dim", CASES)
@pytest.mark.parametrize("memory", ["lean", *(pytest.param(m, marks=pytest.mark.full)  # the others: -m full
                                              for m in ("stages", "blocks", "stages, not lean"))])
def test_memory_options_compute_the_same_network(name, dim, memory):
    # the lean block forms (shipped, on a GPU) and activation checkpointing against the plain network: same weights,
    # state-dict keys, training outputs, gradients and BatchNorm statistics after a step; they keep less for
    # backward, so the step's estimated peak memory is lower
    from nnunet_lk.memory.estimate import estimate_training
    options = MEMORY_OPTIONS[memory]
    plain = _net(name, dim, deep_supervision=True, memory_lean=False).double().train()
    lean = _net(name, dim, deep_supervision=True, **options).double().train()
    assert lean.checkpoint_style == options.get("checkpoint_style", "off") and plain.checkpoint_style == "off"
    assert lean.memory_lean is options["memory_lean"] and plain.memory_lean is False
    lean.load_state_dict(plain.state_dict(), strict=True)
    out, x_grad, grads = _loss_and_gradients(plain, _input(dim).double())
    out_c, x_grad_c, grads_c = _loss_and_gradients(lean, _input(dim).double())
    for a, b in zip(out, out_c):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x_grad_c, x_grad, rtol=1e-9, atol=1e-12)
    for n, g in grads.items():
        torch.testing.assert_close(grads_c[n], g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    for (n, a), b in zip(plain.state_dict().items(), lean.state_dict().values()):
        # BN statistics advanced once (a second update would move them by the momentum, not by rounding)
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    with torch.no_grad():  # evaluation runs the plain forward
        torch.testing.assert_close(lean.eval()(_input(dim).double())[0], plain.eval()(_input(dim).double())[0])
    estimates = {key: estimate_training(lambda ds, o=o: _net(name, dim, deep_supervision=ds, **o), 2, 3,
                                        PLANS[dim]["patch_size"], 4).total
                 for key, o in (("plain", {"memory_lean": False}), (memory, options))}
    assert estimates[memory] < estimates["plain"]


def test_options_have_one_source_the_builders_signature():
    import inspect

    from nnunet_lk.networks.registry import SKELETON_OPTIONS, builder_options, register_backbone
    for name in list_backbones():
        spec = get_backbone(name)
        signature = {k: v for k, v in builder_options(spec.builder).items() if v is not inspect.Parameter.empty}
        # defaults come from the signature alone, and the skeleton's options every backbone shares
        assert spec.config == {**signature, **SKELETON_OPTIONS, **spec.size}
        assert all(signature.get(k) != v for k, v in spec.size.items())  # a size stores only what it changes
    assert {n: get_backbone(n).size for n in ("dlkunet_s", "dlkunet_m", "dlkunet_l")} == \
        {"dlkunet_s": {"levels": 3}, "dlkunet_m": {"levels": 4}, "dlkunet_l": {"levels": 5}}
    builder = get_backbone("lmnet").builder
    with pytest.raises(ValueError, match=r"no option\(s\) \['depth'\]"):
        register_backbone("lmnet_bad", builder, trainer="LMNetBad", depth=3)
    with pytest.raises(ValueError, match=r"\['levels'\] have no default"):
        register_backbone("dlkunet_bad", get_backbone("dlkunet_s").builder, trainer="DLKUNetBad")
    with pytest.raises(ValueError, match="trainer suffix 'LMNet' must be a Python name no other backbone uses"):
        register_backbone("lmnet_again", builder, trainer="LMNet")
    with pytest.raises(ValueError, match=r"paper recipes for \[3\]D, but the backbone is built for \[2\]D"):
        register_backbone("lmnet_2d", builder, trainer="LMNet2D", dims=(2,),
                          paper_recipes={3: get_backbone("lmnet").paper_recipes[3]})
    assert "lmnet_bad" not in list_backbones() and "lmnet_2d" not in list_backbones()


def test_every_backbone_has_its_trainers_from_its_registration_alone():
    """The registry is the whole description: each backbone's plain trainer (by its spec's name) and its
    paper-recipe variants exactly where its spec gives paper recipes."""
    from nnunet_lk.training.trainers import all_trainers
    trainers = all_trainers()
    for name in list_backbones():
        spec = get_backbone(name)
        assert trainers[spec.trainer_name].backbone == name
        assert (f"{spec.trainer_name}_PaperRecipe" in trainers) == bool(spec.paper_recipes)
        assert spec.family == name.split("_")[0]
    assert {get_backbone(n).trainer_name for n in list_backbones()} == {
        "nnUNetTrainerDLKUNetS", "nnUNetTrainerDLKUNetM", "nnUNetTrainerDLKUNetL", "nnUNetTrainerLGMSNet",
        "nnUNetTrainerMSLKSeg", "nnUNetTrainerLMNet"}


def test_unknown_option_names_the_valid_ones_with_defaults_in_builds_and_plans(hippocampus_plans):
    from nnunet_lk.plans import derive_plans
    with pytest.raises(NetworkConfigError, match=r"unknown option\(s\) \['depth'\].*levels=3, width=96"):
        build_backbone("dlkunet_s", dim=2, input_channels=1, num_classes=2, depth=3)
    with pytest.raises(NetworkConfigError, match=r"unknown option\(s\) \['depth'\].*levels=5, width=12"):
        derive_plans(hippocampus_plans, "2d", "x", backbone_opts={"lmnet": {"depth": 3}})
