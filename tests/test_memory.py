"""nnunet_lk.memory: the live-storage count, the shape-only estimate against torch's memory profiler on real
CPU steps (every backbone and stock nnU-Net on nnU-Net's Hippocampus 2d plans), planning for a memory target
and the warning a trainer gives before CUDA would run out of memory."""
from __future__ import annotations

import json

import pytest
import torch

from nnunet_lk import settings
from nnunet_lk.nnunet_io import resolve_trainer
from nnunet_lk.plans import plans_context
from nnunet_lk.cli.main import main
from nnunet_lk.memory.estimate import estimate_for_plans, estimate_training, trainer_builder
from nnunet_lk.memory.planner import memory_warning, plan_for_memory
from nnunet_lk.memory.step import make_train_step
from nnunet_lk.memory.tracker import MiB, LiveStorageTracker, measured_peak, storage_bytes
from nnunet_lk.plans import derive_plans

TRAINERS = ["nnUNetTrainer", "nnUNetTrainerDLKUNetS", "nnUNetTrainerDLKUNetM", "nnUNetTrainerLGMSNet",
            "nnUNetTrainerLMNet", "nnUNetTrainerMSLKSeg"]


def test_live_storage_tracker_counts_allocations_frees_and_views():
    with LiveStorageTracker() as tracker:
        a = torch.empty(1024, device="meta")             # 4 KiB
        b = torch.empty(2048, dtype=torch.float16, device="meta")  # 4 KiB
        view = a[:10]                                    # shares a's storage: free
        a.add_(1)                                        # in place: no new storage
        assert tracker.live == 8192 and tracker.peak == 8192
        del b
        c = torch.empty(512, device="meta")              # 2 KiB
        assert tracker.live == 6144 and tracker.peak == 8192
    assert storage_bytes([a, view, c]) == 6144


def _with_memory_lean(plans, configuration, trainer, setting):
    """The plans with the backbone's ``memory_lean`` set (a GPU runs "auto" lean; a CPU needs True to do so)."""
    backbone = getattr(resolve_trainer(trainer), "backbone", None)
    if backbone is None:
        return plans
    return derive_plans(plans, configuration, plans["plans_name"], backbone_opts={backbone: {"memory_lean": setting}})


def _measured_cpu_peak(trainer, plans, dataset_json, configuration, batch):
    """Weights, optimiser state and inputs, plus what torch's memory profiler sees a real step allocate, with the
    network as a GPU would run it (lean forms on)."""
    plans = _with_memory_lean(plans, configuration, trainer, True)
    pm, cm, n_in, n_out = plans_context(plans, dataset_json, configuration)
    torch.manual_seed(0)
    net = resolve_trainer(trainer).build_network_architecture(pm, cm, n_in, n_out, True)
    if hasattr(net, "cpu_channels_last"):
        net.cpu_channels_last = False
    step = make_train_step(net, n_in, n_out, list(cm.patch_size), batch, batch_dice=bool(cm.batch_dice), device="cpu")
    step.run()
    step.optimizer.zero_grad(set_to_none=True)
    return measured_peak(step.run, net, step.optimizer, step.inputs)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_estimate_matches_the_profiled_peak_of_a_real_step(trainer, hippocampus_plans, hippocampus_dataset_json,
                                                           monkeypatch):
    # torch's own convolutions, contiguous: the device-independent path the estimate models (CUDA's); the
    # estimate of the shipped "auto" setting is the lean network a GPU runs
    monkeypatch.setenv(settings.DEPTHWISE, "torch")
    batch = 8
    measured = _measured_cpu_peak(trainer, hippocampus_plans, hippocampus_dataset_json, "2d", batch)
    pm, cm, n_in, n_out = plans_context(hippocampus_plans, hippocampus_dataset_json, "2d")
    estimate = estimate_for_plans(resolve_trainer(trainer), pm, cm, n_in, n_out, batch=batch)
    assert estimate.total == pytest.approx(measured, rel=0.15), (estimate.total / MiB, measured / MiB)
    assert estimate.persistent > estimate.parameters > 0 and not estimate.amp
    # AMP halves what convolutions save; weights and optimiser state stay float32
    amp = estimate_for_plans(resolve_trainer(trainer), pm, cm, n_in, n_out, batch=batch, amp=True)
    assert amp.persistent == estimate.persistent and amp.step_peak < estimate.step_peak


def test_estimate_is_affine_in_the_batch(hippocampus_plans, hippocampus_dataset_json):
    # once one part of the network holds the peak (with the lean forms the smallest batches peak elsewhere, which is
    # why the planner confirms its extrapolation by bisection)
    pm, cm, n_in, n_out = plans_context(hippocampus_plans, hippocampus_dataset_json, "3d_fullres")
    build = trainer_builder(resolve_trainer("nnUNetTrainerLMNet"), pm, cm, n_in, n_out)
    three, four, six = (estimate_training(build, n_in, n_out, [16, 24, 16], b).total for b in (3, 4, 6))
    assert six - four == pytest.approx(2 * (four - three), rel=0.02)


def test_plans_written_for_a_target_measure_under_it(hippocampus_plans, hippocampus_dataset_json, monkeypatch):
    # float32 on this CPU (AMP needs CUDA): plan LM-Net 3d_fullres for 0.3 GB, then measure a real step
    monkeypatch.setenv(settings.DEPTHWISE, "torch")
    trainer = resolve_trainer("nnUNetTrainerLMNet")
    plan = plan_for_memory(trainer, hippocampus_plans, hippocampus_dataset_json, "3d_fullres", "nnUNetPlans_lm",
                           gpu_memory_gb=0.3, amp=False)
    assert plan.estimate.total <= plan.target_bytes == int(0.3 * 2 ** 30 * 0.85)
    assert plan.batch_size >= 2 and plan.patch_size != [40, 56, 40]
    config = plan.plans["configurations"]["3d_fullres"]
    assert config["patch_size"] == plan.patch_size and config["batch_size"] == plan.batch_size
    measured = _measured_cpu_peak("nnUNetTrainerLMNet", plan.plans, hippocampus_dataset_json, "3d_fullres",
                                  plan.batch_size)
    assert measured <= 0.3 * 2 ** 30


def test_default_target_is_stock_nnunets_estimate_and_batch_follows_nnunets_caps(hippocampus_plans,
                                                                                hippocampus_dataset_json):
    stock = resolve_trainer("nnUNetTrainer")
    plan = plan_for_memory(stock, hippocampus_plans, hippocampus_dataset_json, "2d", "same")
    # stock nnU-Net at its own plans fits its own estimate with the planned patch and at least its batch
    assert plan.patch_size == [56, 40] and plan.batch_size >= 81 and "stock nnU-Net" in plan.target_source
    assert plan.estimate.total <= plan.target_bytes
    # a batch covers at most 5% of the dataset's voxels (the 3D median shape x cases, as nnU-Net counts them)
    median = hippocampus_plans["configurations"]["3d_fullres"]["median_image_size_in_voxels"]
    small_dataset = {**hippocampus_dataset_json, "numTraining": 20}
    capped = plan_for_memory(stock, hippocampus_plans, small_dataset, "2d", "same", gpu_memory_gb=80)
    assert capped.batch_size == round(float(torch.tensor(median).prod()) * 20 * 0.05 / (56 * 40)) < 81


def _residual_encoder_plans(plans):
    """The fixture's 2d configuration as nnU-Net's residual-encoder planner (nnUNetPlannerResEncM) writes it."""
    plans = json.loads(json.dumps(plans))
    plans["experiment_planner_used"], plans["plans_name"] = "nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"
    arch = plans["configurations"]["2d"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kwargs = arch["arch_kwargs"]
    kwargs["n_blocks_per_stage"] = [1, 3, 4, 6][:kwargs.pop("n_conv_per_stage") and kwargs["n_stages"]]
    kwargs["n_conv_per_stage_decoder"] = [1] * (kwargs["n_stages"] - 1)
    return plans


def test_residual_encoder_plans_are_planned_with_their_network_and_their_batch_rule(hippocampus_plans,
                                                                                  hippocampus_dataset_json):
    from nnunet_lk.memory.planner import stock_target
    resenc = _residual_encoder_plans(hippocampus_plans)
    # the target is nnU-Net's own network of these plans: the residual encoder, more blocks than the plain U-Net
    assert stock_target(resenc, hippocampus_dataset_json, "2d") > stock_target(hippocampus_plans,
                                                                             hippocampus_dataset_json, "2d")
    trainer = resolve_trainer("nnUNetTrainerLGMSNet")
    plan = plan_for_memory(trainer, resenc, hippocampus_dataset_json, "2d", "x")
    assert "ResidualEncoderUNet, 81 x [56, 40]" in plan.target_source and plan.estimate.total <= plan.target_bytes
    # the default planner caps a batch at 5% of the dataset's voxels; the residual-encoder planners do not
    median = hippocampus_plans["configurations"]["3d_fullres"]["median_image_size_in_voxels"]
    small_dataset = {**hippocampus_dataset_json, "numTraining": 20}
    capped = plan_for_memory(trainer, hippocampus_plans, small_dataset, "2d", "x", gpu_memory_gb=16)
    uncapped = plan_for_memory(trainer, resenc, small_dataset, "2d", "x", gpu_memory_gb=16)
    assert capped.batch_size == round(float(torch.tensor(median).prod()) * 20 * 0.05 / (56 * 40))
    assert uncapped.batch_size > 10 * capped.batch_size


def test_memory_warning_names_the_estimate_free_memory_and_the_plans_command(hippocampus_plans,
                                                                           hippocampus_dataset_json):
    trainer = resolve_trainer("nnUNetTrainerDLKUNetM")
    args = dict(dataset="Dataset004_Hippocampus", plans_name="nnUNetPlans")
    assert memory_warning(trainer, hippocampus_plans, hippocampus_dataset_json, "3d_fullres", 80 * 2 ** 30, **args) is None
    message = memory_warning(trainer, hippocampus_plans, hippocampus_dataset_json, "3d_fullres", 2 ** 29, **args)
    assert "nnUNetTrainerDLKUNetM needs an estimated" in message and "0.5 GiB free" in message
    assert ("`nnunet-lk plans -d Dataset004_Hippocampus -c 3d_fullres -p nnUNetPlans --backbone dlkunet_m "
            "--gpu-memory 1`" in message and "-p nnUNetPlans_dlkunet_m_1GB" in message)


def test_trainer_warns_before_its_first_step_on_cuda(hippocampus_plans, hippocampus_dataset_json, monkeypatch,
                                                     capsys, tmp_path):
    from nnunet_lk.training.trainers import all_trainers
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = {**hippocampus_plans, "continue_training": False}  # run_training adds this key
    trainer = all_trainers()["nnUNetTrainerLMNet"](plans, "3d_fullres", 0, hippocampus_dataset_json,
                                                  torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 ** 28, 2 ** 33))
    trainer._warn_if_memory_short()
    err = capsys.readouterr().err
    assert "nnUNetTrainerLMNet needs an estimated" in err and "0.2 GiB free" in err and "--backbone lmnet" in err


def test_cli_plans_for_a_backbone(nnunet_dirs, hippocampus_plans, hippocampus_dataset_json, capsys):
    folder = nnunet_dirs["preprocessed"] / "Dataset004_Hippocampus"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(hippocampus_plans))
    (folder / "dataset.json").write_text(json.dumps(hippocampus_dataset_json))
    assert main(["plans", "-d", "4", "-c", "3d_fullres", "--backbone", "dlkunet_m"]) == 0
    out = capsys.readouterr().out
    written = json.loads((folder / "nnUNetPlans_dlkunet_m.json").read_text())
    config = written["configurations"]["3d_fullres"]
    assert written["plans_name"] == "nnUNetPlans_dlkunet_m" and config["batch_size"] >= 2
    assert config["patch_size"] != [40, 56, 40]  # DLKUNet-M needs ~5x stock's memory at nnU-Net's plans
    assert "-tr nnUNetTrainerDLKUNetM -p nnUNetPlans_dlkunet_m" in out and "stock nnU-Net's estimate" in out
    # nnU-Net's own spelling of the target; options are planned with (the plain blocks need more memory than the
    # shipped lean ones, so the same target fits fewer voxels per batch)
    voxels = {}
    for name, option in (("lean", []), ("plain", ["--option", "dlkunet_m.memory_lean=false"])):
        assert main(["plans", "-d", "4", "-c", "3d_fullres", "--backbone", "dlkunet_m", "-gpu_memory_target", "0.5",
                     "--name", name, *option]) == 0
        config = json.loads((folder / f"{name}.json").read_text())["configurations"]["3d_fullres"]
        voxels[name] = config["batch_size"] * torch.tensor(config["patch_size"]).prod().item()
    assert config["nnunet_lk"] == {"dlkunet_m": {"memory_lean": False}}
    assert voxels["lean"] > voxels["plain"]
    # bad input: a clear error, nothing written
    assert main(["plans", "-d", "4", "-c", "2d", "--gpu-memory", "8", "--name", "x"]) == 2
    assert main(["plans", "-d", "4", "-c", "2d", "--backbone", "lmnet", "--batch", "4"]) == 2
    assert main(["plans", "-d", "4", "-c", "2d", "--backbone", "nnUNetTrainerNoSuch"]) == 2
    err = capsys.readouterr().err
    assert "add --backbone" in err and "leave out --patch and --batch" in err
    assert not (folder / "x.json").exists() and not (folder / "nnUNetPlans_lmnet.json").exists()
