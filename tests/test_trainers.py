import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_lk import settings
from nnunet_lk.networks import NetworkConfigError
from nnunet_lk.training import run_settings, trainers as lk_trainers
from nnunet_lk.training.trainers import (all_trainers, nnUNetTrainerDLKUNetM, nnUNetTrainerDLKUNetS,
                                         nnUNetTrainerDLKUNetS_PhaseLoss)


def test_every_trainer_is_thin_and_named_uniquely():
    trainers = all_trainers()
    assert {"nnUNetTrainerDLKUNetS", "nnUNetTrainerDLKUNetM", "nnUNetTrainerDLKUNetL",
            "nnUNetTrainerDLKUNetL_PhaseLoss", "nnUNetTrainerDLKUNetL_ConstLoss"} <= set(trainers)
    for name, cls in trainers.items():
        assert cls.__module__ == lk_trainers.__name__
        assert cls.loss_schedule in ("sigmoid", "phase", "constant")
        # nnU-Net fills my_init_kwargs from the base signature: subclasses must not change it
        assert "__init__" not in vars(cls)


def test_builder_signature_is_the_nnunet_27_one():
    import inspect
    params = list(inspect.signature(nnUNetTrainerDLKUNetM.build_network_architecture).parameters)
    assert params == ["plans_manager", "configuration_manager", "num_input_channels", "num_output_channels",
                      "enable_deep_supervision"]


@pytest.mark.parametrize("configuration,expected_outputs", [("2d", 3), ("3d_fullres", 3)])
def test_static_build_from_plans_strict_load(hippocampus_plans, configuration, expected_outputs):
    pm = PlansManager(hippocampus_plans)
    cm = pm.get_configuration(configuration)
    hippocampus_plans["configurations"][configuration]["nnunet_lk"] = {"dlkunet_m": {"width": 8}}
    pm = PlansManager(hippocampus_plans)
    cm = pm.get_configuration(configuration)
    on = nnUNetTrainerDLKUNetM.build_network_architecture(pm, cm, 1, 3, True)
    off = nnUNetTrainerDLKUNetM.build_network_architecture(pm, cm, 1, 3, False)
    off.load_state_dict(on.state_dict(), strict=True)  # what nnUNetv2_predict does
    assert on.encoder[0].conv1.pointwise.out_channels == 8  # the plans' backbone options reach the builder
    x = torch.randn(2, 1, *cm.patch_size)
    outs = on(x)
    assert len(outs) == expected_outputs == len(on.deep_supervision_scales)
    # the network's scales equal nnU-Net's own for these plans (same strides)
    nnunet_scales = list(list(i) for i in 1 / np.cumprod(np.vstack(cm.pool_op_kernel_sizes), axis=0))[:-1]
    assert np.allclose(on.deep_supervision_scales, nnunet_scales)
    for o, s in zip(outs, on.deep_supervision_scales):
        assert list(o.shape[2:]) == [round(p * f) for p, f in zip(cm.patch_size, s)]
    assert off(x).shape == (2, 3, *cm.patch_size)


def _make_trainer(cls, plans, configuration, dataset_json, nnunet_dirs):
    folder = nnunet_dirs["preprocessed"] / plans["dataset_name"] / plans["configurations"][configuration].get(
        "data_identifier", "nnUNetPlans_2d")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "case.b2nd").touch()  # nnU-Net infers the dataset class from file endings
    plans = {**plans, "continue_training": False}  # run_training adds this key
    return cls(plans, configuration, 0, dataset_json, device=torch.device("cpu"))


def test_trainer_deep_supervision_scales_follow_network(hippocampus_plans, hippocampus_dataset_json, nnunet_dirs):
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": 8}}
    trainer = _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                            nnunet_dirs)
    trainer.initialize()
    # DLKUNet-S has 3 levels of the plans' 4 stages: 2 outputs, not nnU-Net's default 3
    assert trainer._get_deep_supervision_scales() == [[1.0, 1.0], [0.5, 0.5]]
    assert len(trainer.loss.weight_factors) == 2
    with pytest.raises(RuntimeError, match="2 outputs but there are 3 targets"):
        trainer.loss([torch.zeros(1, 3, 4, 4)] * 2, [torch.zeros(1, 1, 4, 4)] * 3)


def test_loss_weights_set_at_epoch_start(hippocampus_plans, hippocampus_dataset_json, nnunet_dirs, monkeypatch):
    monkeypatch.setenv(settings.EPOCHS, "10")
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": 8}}
    trainer = _make_trainer(nnUNetTrainerDLKUNetS_PhaseLoss, hippocampus_plans, "2d", hippocampus_dataset_json,
                            nnunet_dirs)
    assert trainer.num_epochs == 10
    trainer.initialize()
    for epoch, expected in [(0, (0.6, 0.4)), (4, (0.6, 0.4)), (5, (0.7, 0.3)), (9, (0.7, 0.3))]:
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        assert (trainer.loss.loss.weight_dice, trainer.loss.loss.weight_ce) == expected
    log = open(trainer.log_file).read()
    assert "Loss weights (phase schedule, epoch 5 of 10): dice 0.7000, ce 0.3000" in log


def test_checkpoint_records_budget_and_resume_restores_it(hippocampus_plans, hippocampus_dataset_json, nnunet_dirs,
                                                          monkeypatch, tmp_path):
    monkeypatch.setenv(settings.EPOCHS, "7")
    monkeypatch.setenv(settings.ITERATIONS, "3")
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": 8}}
    trainer = _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                            nnunet_dirs)
    trainer.initialize()
    trainer.current_epoch = 4
    path = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    assert not os.path.exists(path + ".tmp")
    saved = torch.load(path, weights_only=False)
    assert saved["nnunet_lk"]["num_epochs"] == 7 and saved["current_epoch"] == 5
    assert saved["trainer_name"] == "nnUNetTrainerDLKUNetS"

    monkeypatch.delenv(settings.EPOCHS)
    monkeypatch.delenv(settings.ITERATIONS)
    resumed = _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                            nnunet_dirs)
    assert resumed.num_epochs == 1000  # nnU-Net's default until the checkpoint is read
    resumed.load_checkpoint(path)
    assert (resumed.num_epochs, resumed.num_iterations_per_epoch, resumed.current_epoch) == (7, 3, 5)
    assert resumed.loss_weights_for_epoch(5) == trainer.loss_weights_for_epoch(5)


def test_kill_during_checkpoint_write_keeps_the_last_complete_one(hippocampus_plans, hippocampus_dataset_json,
                                                                  nnunet_dirs, monkeypatch, tmp_path):
    import io
    from nnunet_lk.training import base
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": 8}}
    trainer = _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                            nnunet_dirs)
    trainer.initialize()
    path = str(tmp_path / "checkpoint_latest.pth")
    trainer.current_epoch = 3
    trainer.save_checkpoint(path)  # the last complete checkpoint: epoch 4 next
    good = open(path, "rb").read()

    real_save = torch.save

    def killed_mid_write(obj, f):  # half the bytes reach the disk, then the process dies
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt("killed during the checkpoint write")
    monkeypatch.setattr(base.torch, "save", killed_mid_write)
    trainer.current_epoch = 4
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(path)
    monkeypatch.setattr(base.torch, "save", real_save)
    assert open(path, "rb").read() == good  # the half-written file is the .tmp, never the checkpoint

    resumed = _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                            nnunet_dirs)
    resumed.load_checkpoint(path)  # what --c does
    assert resumed.current_epoch == 4
    resumed.save_checkpoint(path)  # the next write replaces the stale .tmp
    assert not os.path.exists(path + ".tmp") and torch.load(path, weights_only=False)["current_epoch"] == 5


def test_unreadable_checkpoint_is_a_clear_error(hippocampus_plans, hippocampus_dataset_json, nnunet_dirs, tmp_path):
    from nnunet_lk.errors import CheckpointError
    from nnunet_lk.checkpoints import read_checkpoint
    bad = tmp_path / "checkpoint_final.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="truncated or not a torch file"):
        read_checkpoint(str(bad))
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an nnU-Net checkpoint"):
        read_checkpoint(str(foreign))


def test_bad_budget_variable(hippocampus_plans, hippocampus_dataset_json, nnunet_dirs, monkeypatch):
    monkeypatch.setenv(settings.EPOCHS, "five")
    with pytest.raises(ValueError, match="NNUNET_LK_EPOCHS='five' is not an integer"):
        _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                      nnunet_dirs)


def test_unsupported_plans_version_fails_before_training(hippocampus_plans, hippocampus_dataset_json, nnunet_dirs):
    del hippocampus_plans["configurations"]["2d"]["architecture"]
    with pytest.raises(NetworkConfigError, match="unsupported nnU-Net version"):
        _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                      nnunet_dirs)


def test_discovery_through_nnunet_lookup_in_a_fresh_process():
    # The stock CLIs resolve -tr NAME with this function; the .pth hook (nnunet-lk env --install) or
    # `eval "$(nnunet-lk env)"` puts our folder on nnUNet_extTrainer.
    code = (
        "import pickle, sys\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "for name in sys.argv[1:]:\n"
        "    cls = find(name)\n"
        "    assert cls.__name__ == name and cls.__module__ == 'nnunet_lk.training.trainers', cls.__module__\n"
        "    assert pickle.loads(pickle.dumps(cls)) is cls\n"
        "print('FOUND', len(sys.argv) - 1)\n")
    from nnunet_lk.env import with_trainer_folder
    env = dict(os.environ, nnUNet_extTrainer=with_trainer_folder(""))
    names = ["nnUNetTrainerDLKUNetL", "nnUNetTrainerDLKUNetM_PhaseLoss", "nnUNetTrainerDLKUNetS_ConstLoss"]
    proc = subprocess.run([sys.executable, "-c", code, *names], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FOUND 3" in proc.stdout


def test_nan_loss_stops_with_epoch_and_iteration(hippocampus_plans, hippocampus_dataset_json, nnunet_dirs):
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": 8}}
    trainer = _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                            nnunet_dirs)
    trainer.initialize()
    trainer.current_epoch = 3
    trainer._iteration = 1
    data = torch.full((2, 1, 56, 40), float("nan"))
    target = [torch.zeros(2, 1, 56, 40), torch.zeros(2, 1, 28, 20)]
    with pytest.raises(FloatingPointError, match="epoch 3, iteration 2") as error:
        trainer.train_step({"data": data, "target": target})
    # nothing on disk yet: the message says so, names no checkpoint, and asserts no single cause
    message = str(error.value)
    assert f"No checkpoint has been written to {trainer.output_folder} yet" in message and "without --c" in message
    assert "checkpoint_latest" not in message and "checkpoint_best" not in message
    for cause in ("NaN/Inf values in the training images", "learning rate", "patch too small"):
        assert cause in message

    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_latest.pth"))  # one exists now
    with pytest.raises(FloatingPointError) as error:
        trainer.train_step({"data": data, "target": target})
    message = str(error.value)
    assert "left untouched: checkpoint_latest.pth;" in message and "--c" in message
    assert "checkpoint_best" not in message and "No checkpoint" not in message


def test_plans_with_one_deep_supervision_output_fail_before_training(hippocampus_plans, hippocampus_dataset_json,
                                                                     nnunet_dirs):
    # plans written by hand (nnunet-lk plans refuses this patch): 8x8 gets two stages, so one output
    arch = hippocampus_plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    arch.update(n_stages=2, strides=[[1, 1], [2, 2]], kernel_sizes=[[3, 3], [3, 3]], features_per_stage=[32, 64],
                n_conv_per_stage=[2, 2], n_conv_per_stage_decoder=[2])
    hippocampus_plans["configurations"]["2d"].update(patch_size=[8, 8], nnunet_lk={"dlkunet_s": {"width": 8}})
    trainer = _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                            nnunet_dirs)
    with pytest.raises(NetworkConfigError, match=r"1 deep-supervision output.*--patch 16 16"):
        trainer.initialize()


class _Validating:
    """Stands for nnUNetTrainer: what the run-settings mixin touches when it validates."""
    inference_allowed_mirroring_axes = (0, 1)

    def __init__(self):
        self.logged, self.seen = [], []

    def print_to_log_file(self, message):
        self.logged.append(message)

    def perform_actual_validation(self, save_probabilities):
        self.seen.append((self.inference_allowed_mirroring_axes, run_settings.nnunet_trainer_module.default_num_processes))


class _Trainer(run_settings.RunSettingsMixin, _Validating):
    pass


@pytest.mark.parametrize("value,enabled", [(None, True), ("1", True), ("on", True), ("0", False), ("off", False)])
def test_validation_mirroring_switch(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv(settings.VAL_MIRRORING, raising=False)
    else:
        monkeypatch.setenv(settings.VAL_MIRRORING, value)
    assert settings.validation_mirroring() is enabled
    trainer = _Trainer()
    trainer.perform_actual_validation(False)
    assert trainer.seen[0][0] == ((0, 1) if enabled else None)
    assert trainer.inference_allowed_mirroring_axes == (0, 1)  # restored: checkpoints keep the trained axes


def test_validation_mirroring_bad_value(monkeypatch):
    monkeypatch.setenv(settings.VAL_MIRRORING, "maybe")
    with pytest.raises(ValueError, match="use 0 \\(off\\) or 1"):
        settings.validation_mirroring()


@pytest.mark.parametrize("def_n_proc,cores,expected", [(None, 2, 2), (None, 16, 8), ("8", 2, 8), ("1", 16, 1)])
def test_final_validation_workers_are_capped_at_the_usable_cores_unless_set(monkeypatch, def_n_proc, cores,
                                                                             expected):
    """nnU-Net's final validation spawns nnUNet_def_n_proc (default 8) export and metric workers, each importing
    torch: on a 2-core machine they took most of a short training's time."""
    default = int(def_n_proc or 8)  # nnU-Net reads the variable once, at import
    monkeypatch.setattr(run_settings.nnunet_trainer_module, "default_num_processes", default)
    monkeypatch.setattr(settings, "usable_cores", lambda: cores)
    if def_n_proc is None:
        monkeypatch.delenv(run_settings.WORKERS_ENV, raising=False)
    else:
        monkeypatch.setenv(run_settings.WORKERS_ENV, def_n_proc)
    trainer = _Trainer()
    trainer.perform_actual_validation(False)
    assert trainer.seen[0][1] == expected
    assert run_settings.nnunet_trainer_module.default_num_processes == default  # restored
    assert any("Final validation with" in m for m in trainer.logged) == (expected != default)


def test_stock_budget_trainer_and_ours_share_the_run_settings():
    from nnunet_lk.training.stock import nnUNetTrainerStockBudget
    for cls in (nnUNetTrainerStockBudget, nnUNetTrainerDLKUNetM):
        assert issubclass(cls, run_settings.RunSettingsMixin)
        assert cls.perform_actual_validation is run_settings.RunSettingsMixin.perform_actual_validation


@pytest.mark.parametrize("threads,predicting,current,usable,idle,expected", [
    (None, False, 2, 2, 1, 2),  # training -device cpu on 2 cores: all usable cores, whatever is busy
    (None, False, 16, 4, 4, 4),  # cpu_count() says 16, the affinity (taskset, cpuset, SLURM) allows 4
    (None, True, 2, 2, 2, 2),  # nnUNetv2_predict -device cpu on an idle 2-core machine: both cores
    (None, True, 2, 2, 1, 1),  # one core busy: one thread (2 threads took 25x longer, measured)
    (None, True, 1, 16, 16, 1),  # CUDA prediction: nnU-Net's one thread stays
    ("3", True, 16, 4, 1, 3),  # NNUNET_LK_THREADS wins
])
def test_cpu_threads(monkeypatch, threads, predicting, current, usable, idle, expected):
    monkeypatch.setattr(settings, "usable_cores", lambda: usable)
    monkeypatch.setattr(settings, "idle_cores", lambda: idle)
    monkeypatch.setattr(settings, "_idle_at_start", None)
    monkeypatch.setattr(settings, "_prediction_process", predicting)
    if threads is None:
        monkeypatch.delenv(settings.THREADS, raising=False)
    else:
        monkeypatch.setenv(settings.THREADS, threads)
    assert settings.cpu_threads(current) == expected


def test_idle_cores_from_proc_stat_snapshots(monkeypatch):
    """Per usable cpu: idle when idle+iowait ticks are over half of its ticks in the window."""
    snapshots = iter([{0: (100, 1000), 1: (200, 1000), 2: (0, 1000)},
                      {0: (125, 1025), 1: (205, 1025), 2: (25, 1025)}])  # cpu 0 idle, 1 busy, 2 idle, not ours
    monkeypatch.setattr(settings, "_cpu_times", lambda: next(snapshots))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(settings, "usable_cores", lambda: 2)
    assert settings.idle_cores(window=0) == 1


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two usable cores")
def test_idle_cores_sees_a_busy_core(tmp_path):
    usable = sorted(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{usable[0]}}})\n"
                                                      f"while True: pass"])
    try:
        import time
        time.sleep(0.5)
        assert settings.idle_cores() <= len(usable) - 1
    finally:
        spinner.kill()
        spinner.wait()


def test_the_network_nnunet_predict_builds_runs_on_the_thread_budget(monkeypatch, hippocampus_plans):
    """nnUNetv2_predict sets torch to every core, then builds the network through the trainer class: that call
    applies NNUNET_LK_THREADS."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = PlansManager(hippocampus_plans)
    monkeypatch.setenv(settings.THREADS, "1")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        nnUNetTrainerDLKUNetM.build_network_architecture(plans, plans.get_configuration("2d"), 1, 3, False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def _random_batch(num_classes=3):
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(2, 1, 56, 40, generator=generator)
    target = torch.randint(0, num_classes, (2, 1, 56, 40), generator=generator).float()
    return {"data": data, "target": [target, target[:, :, ::2, ::2]]}


def _log(trainer) -> str:
    with open(trainer.log_file) as f:
        return f.read()


def test_mixed_precision_overflow_switches_the_network_to_float32(hippocampus_plans, hippocampus_dataset_json,
                                                                   nnunet_dirs, tmp_path):
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": 8}}
    trainer = _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                            nnunet_dirs)
    trainer.initialize()
    trainer.on_train_epoch_start()
    trainer.grad_scaler = torch.amp.GradScaler("cpu")  # what nnU-Net sets up on CUDA: the mixed-precision path
    network = trainer.network
    before = {k: v.clone() for k, v in network.state_dict().items()}

    def fp16_overflow(module, inputs, output):  # an fp16 overflow early in the net, while it is in fp16
        return output * float("inf") if not network.full_precision else output
    network.encoder[0].register_forward_hook(fp16_overflow)

    result = trainer.train_step(_random_batch())
    assert np.isfinite(result["loss"]) and network.full_precision
    assert "the step was redone in float32" in _log(trainer)
    after = network.state_dict()
    assert all(torch.isfinite(v).all() for k, v in after.items() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the float32 step did train

    trainer.save_checkpoint(str(tmp_path / "checkpoint.pth"))  # nnUNetv2_predict's strict load keeps float32
    weights = torch.load(tmp_path / "checkpoint.pth", weights_only=False)["network_weights"]
    fresh = type(trainer).build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3,
                                                     enable_deep_supervision=False)
    fresh.load_state_dict(weights, strict=True)
    assert fresh.full_precision


def test_compile_failure_falls_back_to_eager(hippocampus_plans, hippocampus_dataset_json, nnunet_dirs):
    from torch._dynamo import OptimizedModule
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": 8}}
    trainer = _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                            nnunet_dirs)
    trainer.initialize()
    trainer.on_train_epoch_start()

    def broken_backend(graph_module, example_inputs):  # stands in for an inductor failure on some block
        raise NotImplementedError("no kernel for this block")
    torch._dynamo.reset()
    trainer.network = torch.compile(trainer.network, backend=broken_backend)
    result = trainer.train_step(_random_batch())
    assert np.isfinite(result["loss"]) and not isinstance(trainer.network, OptimizedModule)
    assert "torch.compile failed (BackendCompilerFailed" in _log(trainer)
    assert "no kernel for this block" in _log(trainer)
    assert "training continues without compilation" in _log(trainer)


def test_activation_checkpointing_trains_eagerly_and_says_so(hippocampus_plans, hippocampus_dataset_json,
                                                             nnunet_dirs, monkeypatch):
    # the option from the plans reaches the network; nnU-Net's default compilation is skipped with a log line
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from torch._dynamo import OptimizedModule
    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: True)  # nnU-Net's choice on CUDA
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": 8, "checkpoint_style": "stages"}}
    trainer = _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                            nnunet_dirs)
    trainer.initialize()
    assert not isinstance(trainer.network, OptimizedModule) and trainer.network.checkpoint_style == "stages"
    assert "checkpoint_style=stages: torch.compile is not used" in _log(trainer)
    trainer.on_train_epoch_start()
    assert np.isfinite(trainer.train_step(_random_batch())["loss"])


def test_checkpoint_keys_are_nnunets_own_plus_ours(hippocampus_plans, hippocampus_dataset_json, nnunet_dirs,
                                                   monkeypatch, tmp_path):
    """Our save_checkpoint rewrites nnU-Net's: an nnU-Net release that adds a key must fail here, not have
    the key silently dropped from our checkpoints."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": 8}}
    trainer = _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                            nnunet_dirs)
    trainer.initialize()
    written = {}
    with monkeypatch.context() as m:
        m.setattr(nnunet_trainer_module.torch, "save", lambda obj, f: written.setdefault("nnunet", obj))
        nnUNetTrainer.save_checkpoint(trainer, str(tmp_path / "stock.pth"))  # nnU-Net's own method, our trainer
    trainer.save_checkpoint(str(tmp_path / "ours.pth"))
    ours = torch.load(tmp_path / "ours.pth", weights_only=False)
    assert set(written["nnunet"]) == set(ours) - {"nnunet_lk"}


# ---- training recipes ----------------------------------------------------------------------------------------
def test_recipe_variants_combine_with_every_loss_variant_and_skip_backbones_without_one():
    trainers = all_trainers()
    for plain in lk_trainers.plain_trainers().values():
        assert plain.recipe is None  # the backbone's default
        for suffix, recipe in (("_PaperRecipe", "paper"), ("_nnUNetRecipe", "nnunet")):
            for loss in ("", "_PhaseLoss", "_ConstLoss"):
                name = f"{plain.__name__}{suffix}{loss}"
                if plain.backbone == "mslkseg":  # no recipe published: none invented, the plain one is nnU-Net's
                    assert name not in trainers
                else:
                    assert trainers[name].recipe == recipe and issubclass(trainers[name], plain)
                    assert trainers[name].loss_schedule == {"": "sigmoid", "_PhaseLoss": "phase",
                                                            "_ConstLoss": "constant"}[loss]


@pytest.mark.parametrize("name, optimizer", [("nnUNetTrainerLGMSNet", torch.optim.SGD),  # paper: SGD 0.02, wd 1e-4
                                             ("nnUNetTrainerLMNet", torch.optim.AdamW),
                                             ("nnUNetTrainerDLKUNetS", torch.optim.Adam),
                                             ("nnUNetTrainerDLKUNetS_nnUNetRecipe", torch.optim.SGD),
                                             ("nnUNetTrainerMSLKSeg", torch.optim.SGD)])
def test_plain_trainers_train_with_the_paper_recipe_where_one_is_published(
        name, optimizer, hippocampus_plans, hippocampus_dataset_json, nnunet_dirs):
    from nnunet_lk.training.recipes import NNUNET, paper_recipe
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {b: {"width": 8} for b in ("dlkunet_s",)}
    trainer = _make_trainer(all_trainers()[name], hippocampus_plans, "2d", hippocampus_dataset_json, nnunet_dirs)
    trainer.initialize()
    expected = NNUNET if name.endswith("_nnUNetRecipe") or "MSLKSeg" in name else paper_recipe(trainer.backbone, 2)
    assert type(trainer.optimizer) is optimizer
    assert (trainer.optimizer.defaults["lr"], trainer.optimizer.defaults["weight_decay"]) == \
        (expected.lr, expected.weight_decay)
    assert trainer.recipe_name == ("nnunet" if expected is NNUNET else "paper")
    assert f"Training recipe ({trainer.recipe_name}): {expected.optimizer}, lr {expected.lr}" in \
        open(trainer.log_file).read()


def test_resume_continues_with_the_recipe_the_checkpoint_was_trained_with(
        hippocampus_plans, hippocampus_dataset_json, nnunet_dirs, tmp_path):
    """A plain trainer's checkpoint from before the paper recipe became its default (recipe None: nnU-Net's)
    continues with nnU-Net's SGD and its momentum; a new run of the same trainer uses the paper's Adam."""
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": 8}}
    old = _make_trainer(all_trainers()["nnUNetTrainerDLKUNetS_nnUNetRecipe"], hippocampus_plans, "2d",
                        hippocampus_dataset_json, nnunet_dirs)
    old.initialize()
    old.network.train()
    sum(o.float().square().mean() for o in old.network(torch.randn(2, 1, 56, 40))).backward()
    old.optimizer.step()
    old.current_epoch = 3
    old._budget = lambda: {**nnUNetTrainerDLKUNetS._budget(old), "recipe": None}  # as those checkpoints say
    path = str(tmp_path / "checkpoint_latest.pth")
    old.save_checkpoint(path)

    resumed = _make_trainer(nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json, nnunet_dirs)
    assert resumed.recipe_name == "paper"
    resumed.initialize()
    assert type(resumed.optimizer) is torch.optim.Adam
    resumed.load_checkpoint(path)  # what --c does
    assert resumed.recipe_name == "nnunet" and type(resumed.optimizer) is torch.optim.SGD
    saved, restored = old.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert saved and all(torch.equal(saved[k]["momentum_buffer"], restored[k]["momentum_buffer"]) for k in saved)
    resumed.current_epoch = 4
    resumed.on_train_epoch_start()
    from nnunet_lk.training.recipes import NNUNET, learning_rate
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(NNUNET, 4, resumed.num_epochs))
    assert "Continuing with the nnunet recipe" in open(resumed.log_file).read()
    assert resumed._budget()["recipe"] == "nnunet"  # and its next checkpoints say so


def test_paper_recipe_trainer_builds_adam_steps_its_rate_and_resumes_the_optimiser(
        hippocampus_plans, hippocampus_dataset_json, nnunet_dirs, monkeypatch, tmp_path):
    from nnunet_lk.training.recipes import learning_rate, paper_recipe
    monkeypatch.setenv(settings.EPOCHS, "40")
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": 8}}
    cls = all_trainers()["nnUNetTrainerDLKUNetS_PaperRecipe_PhaseLoss"]
    trainer = _make_trainer(cls, hippocampus_plans, "2d", hippocampus_dataset_json, nnunet_dirs)
    trainer.initialize()
    assert type(trainer.optimizer) is torch.optim.Adam
    assert (trainer.optimizer.defaults["lr"], trainer.optimizer.defaults["weight_decay"]) == (1e-3, 1e-5)
    # the official StepLR(20 of 400 epochs, 0.9) over progress: a step every 2 of 40 epochs
    for epoch, expected in [(0, 1e-3), (1, 1e-3), (2, 0.9e-3), (39, 1e-3 * 0.9 ** 19)]:
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
        assert (trainer.loss.loss.weight_dice, trainer.loss.loss.weight_ce) == ((0.6, 0.4) if epoch < 20 else (0.7, 0.3))
    assert "Training recipe (paper): adam, lr 0.001" in open(trainer.log_file).read()

    # one real optimiser step, so that Adam has moments to save
    x = torch.randn(2, 1, 56, 40)
    trainer.network.train()
    sum(o.float().square().mean() for o in trainer.network(x)).backward()
    trainer.optimizer.step()
    trainer.current_epoch = 6
    path = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(path)

    monkeypatch.delenv(settings.EPOCHS)
    resumed = _make_trainer(cls, hippocampus_plans, "2d", hippocampus_dataset_json, nnunet_dirs)
    resumed.load_checkpoint(path)  # what --c does
    assert resumed.num_epochs == 40 and resumed.current_epoch == 7 and type(resumed.optimizer) is torch.optim.Adam
    saved, restored = trainer.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys() and saved
    for key in saved:
        assert torch.equal(saved[key]["exp_avg"], restored[key]["exp_avg"])
        assert torch.equal(saved[key]["exp_avg_sq"], restored[key]["exp_avg_sq"])
    resumed.on_train_epoch_start()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(paper_recipe("dlkunet_s", 2), 7, 40))


def test_paper_recipe_of_a_backbone_without_one_fails_at_construction(hippocampus_plans, hippocampus_dataset_json,
                                                                       nnunet_dirs):
    class nnUNetTrainerMSLKSegPaper(lk_trainers.nnUNetTrainerMSLKSeg):
        recipe = "paper"
    with pytest.raises(NetworkConfigError, match="no paper recipe"):
        _make_trainer(nnUNetTrainerMSLKSegPaper, hippocampus_plans, "2d", hippocampus_dataset_json, nnunet_dirs)


def test_thread_budget_reaches_torch_in_every_trainer(hippocampus_plans, hippocampus_dataset_json, nnunet_dirs,
                                                      monkeypatch):
    from nnunet_lk.training.stock import nnUNetTrainerStockBudget
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": 8}}
    previous = torch.get_num_threads()
    try:
        for cls, threads in ((lk_trainers.nnUNetTrainerDLKUNetS, 2), (nnUNetTrainerStockBudget, 3)):
            torch.set_num_threads(1)
            monkeypatch.setenv(settings.THREADS, str(threads))
            _make_trainer(cls, hippocampus_plans, "2d", hippocampus_dataset_json, nnunet_dirs)
            assert torch.get_num_threads() == threads
        monkeypatch.setenv(settings.THREADS, "zero")
        with pytest.raises(ValueError, match="NNUNET_LK_THREADS='zero' is not an integer"):
            _make_trainer(lk_trainers.nnUNetTrainerDLKUNetS, hippocampus_plans, "2d", hippocampus_dataset_json,
                          nnunet_dirs)
    finally:
        torch.set_num_threads(previous)


def test_a_2d_only_backbone_on_3d_plans_fails_at_construction_with_one_message(hippocampus_plans,
                                                                                hippocampus_dataset_json, nnunet_dirs,
                                                                                monkeypatch):
    """One dimension check (the backbone spec's), worded the same by the trainer, the builder and bench. Every
    shipped backbone has 2D and 3D forms: LM-Net is made 2D-only here."""
    import dataclasses
    from nnunet_lk.bench import precheck
    from nnunet_lk.networks import build_backbone, registry
    monkeypatch.setitem(registry._REGISTRY, "lmnet", dataclasses.replace(registry.get_backbone("lmnet"), dims=(2,)))
    problem = "lmnet is a 2D network and this configuration is 3D"
    with pytest.raises(NetworkConfigError, match=rf"nnUNetTrainerLMNet trains {problem} \('3d_fullres'\): use a 2d "):
        _make_trainer(lk_trainers.nnUNetTrainerLMNet, hippocampus_plans, "3d_fullres", hippocampus_dataset_json,
                      nnunet_dirs)
    with pytest.raises(NetworkConfigError, match=rf"^{problem}: use a 2d configuration\.$"):
        build_backbone("lmnet", dim=3, input_channels=1, num_classes=2)
    assert precheck("nnUNetTrainerLMNet", [40, 56, 40]) == problem
    assert precheck("nnUNetTrainerLMNet", [56, 40]) is None


def _initial_weights(cls, plans, dataset_json, nnunet_dirs):
    trainer = _make_trainer(cls, plans, "2d", dataset_json, nnunet_dirs)
    trainer.initialize()
    return trainer, {k: v.clone() for k, v in trainer.network.state_dict().items()}


def test_seed_fixes_the_initial_weights_and_is_recorded(hippocampus_plans, hippocampus_dataset_json, nnunet_dirs,
                                                         monkeypatch):
    from nnunet_lk.training.stock import nnUNetTrainerStockBudget
    hippocampus_plans["configurations"]["2d"]["nnunet_lk"] = {"lgmsnet": {}}
    for cls in (lk_trainers.nnUNetTrainerLGMSNet, nnUNetTrainerStockBudget):
        monkeypatch.setenv(settings.SEED, "7")
        first, a = _initial_weights(cls, hippocampus_plans, hippocampus_dataset_json, nnunet_dirs)
        torch.manual_seed(1234)  # what ran before must not matter
        _, b = _initial_weights(cls, hippocampus_plans, hippocampus_dataset_json, nnunet_dirs)
        monkeypatch.setenv(settings.SEED, "8")
        _, c = _initial_weights(cls, hippocampus_plans, hippocampus_dataset_json, nnunet_dirs)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)
        assert first.nnunet_lk_seed == 7
        assert "NNUNET_LK_SEED=7" in open(first.log_file).read()
        # nnU-Net's debug.json takes the trainer's plain attributes: the seed is among them
        assert "nnunet_lk_seed" in dir(first) and not callable(first.nnunet_lk_seed)
    monkeypatch.delenv(settings.SEED)
    unseeded = _make_trainer(nnUNetTrainerStockBudget, hippocampus_plans, "2d", hippocampus_dataset_json, nnunet_dirs)
    assert unseeded.nnunet_lk_seed is None


@pytest.mark.parametrize("value", ["x", "-1", str(2 ** 32)])
def test_bad_seed_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(settings.SEED, value)
    with pytest.raises(ValueError, match="NNUNET_LK_SEED"):
        settings.seed()


def test_seed_reaches_the_augmentation_workers(monkeypatch):
    """nnU-Net builds its augmenters with seeds=None; under a seed each worker gets its own fixed seed, the
    training and the validation loader different ones, and nnU-Net's class is restored afterwards."""
    made = []

    class Recorder:
        def __init__(self, data_loader, transform, num_processes, num_cached=2, seeds=None, **kwargs):
            made.append((num_processes, seeds))
    monkeypatch.setattr(run_settings.nnunet_trainer_module, "NonDetMultiThreadedAugmenter", Recorder)
    with run_settings._seeded_augmenters(5):
        run_settings.nnunet_trainer_module.NonDetMultiThreadedAugmenter(data_loader=None, transform=None,
                                                                        num_processes=3, seeds=None)
        run_settings.nnunet_trainer_module.NonDetMultiThreadedAugmenter(data_loader=None, transform=None,
                                                                        num_processes=1, seeds=None)
    assert run_settings.nnunet_trainer_module.NonDetMultiThreadedAugmenter is Recorder
    (n_train, train), (n_val, val) = made
    assert (n_train, n_val) == (3, 1) and len(set(train)) == 3 and val[0] not in train
    assert train == run_settings.worker_seeds(5, 0, 3) != run_settings.worker_seeds(6, 0, 3)
    assert all(0 <= s < 2 ** 32 for s in train + val)


def test_a_backbone_registered_outside_the_package_gets_its_trainers_through_nnunets_lookup(hippocampus_plans,
                                                                                             tmp_path):
    """A new backbone is one module that registers itself: nnU-Net's own lookup then finds its plain trainer and
    every variant (here registered after the trainers module was imported), they pickle, and the plain trainer
    builds the network from the plans. No file of the package names it."""
    (tmp_path / "plans.json").write_text(json.dumps(hippocampus_plans))
    code = (
        "import json, pickle, sys, torch\n"
        "import nnunet_lk.training.trainers\n"
        "import tests.helpers.toy_backbone\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "from nnunetv2.utilities.plans_handling.plans_handler import PlansManager\n"
        "for name in ('nnUNetTrainerToy', 'nnUNetTrainerToy_PaperRecipe_PhaseLoss', 'nnUNetTrainerToy_ConstLoss'):\n"
        "    cls = find(name)\n"
        "    assert cls.__name__ == name and cls.backbone == 'toy', cls\n"
        "    assert pickle.loads(pickle.dumps(cls)) is cls\n"
        "assert find('nnUNetTrainerToy_PaperRecipe').recipe == 'paper'\n"
        "pm = PlansManager(json.load(open(sys.argv[1])))\n"
        "cm = pm.get_configuration('2d')\n"
        "net = find('nnUNetTrainerToy').build_network_architecture(pm, cm, 1, 3, True)\n"
        "outs = net(torch.zeros(2, 1, *cm.patch_size))\n"
        "print('SHAPES', [list(o.shape) for o in outs])\n")
    from nnunet_lk.env import with_trainer_folder
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, nnUNet_extTrainer=with_trainer_folder(""), PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "plans.json")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SHAPES [[2, 3, 56, 40], [2, 3, 28, 20]]" in proc.stdout  # 3 levels: two deep-supervision outputs
    # and in this process the shipped backbones are the only ones
    assert "toy" not in lk_trainers.list_backbones()
