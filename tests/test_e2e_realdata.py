"""Real data, stock CLIs, every backbone: a subset of ../shared/data → nnUNetv2_plan_and_preprocess →
`nnunet-lk plans` (CPU-sized variant) → nnUNetv2_train with an nnunet-lk trainer on a short budget →
nnUNetv2_predict on cases not trained on → nnUNetv2_evaluate_folder, with a foreground Dice floor that an
untrained net cannot pass. The DLKUNet run is also killed mid-epoch and resumed with --c.

Budgets and floors were calibrated on this 2-core CPU (README, "Tests"): an untrained net scores about 0.05
on Hippocampus; on Kvasir-SEG (17% polyp) predicting everything as polyp scores about 0.29."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunet_lk.losses.schedules import progress, sigmoid_weights
from realdata import foreground_dice, logged_loss_weights, prepared_subset, run, train_env

pytestmark = pytest.mark.slow

EPOCHS, ITERATIONS = 20, 25
DICE_FLOOR = 0.35  # calibration run: 0.507 on the 10 held-back cases (untrained: about 0.05)

# 3D and large 2D images: no test-time mirroring and no window overlap at prediction, a 4-8x saving on this
# CPU (the floors were calibrated this way).
FAST_PREDICTION = ("--disable_tta", "-step_size", "1")


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hippocampus")
    # CPU-sized derived plans (same preprocessed data): batch 8 instead of the planned 81 for 2d, narrower
    # DLKUNet/MS-LKSeg (the options are recorded in the plans, so nnUNetv2_predict rebuilds the same nets)
    env = prepared_subset(root, "Dataset004_Hippocampus", "2d", 60, 10,
                          ["--name", "nnUNetPlans_cpu", "--batch", "8",
                           "--option", "dlkunet_m.width=16", "--option", "mslkseg.width=16"])
    return root, env


@pytest.fixture(scope="module")
def hippocampus_3d(tmp_path_factory):
    # Its own smaller subset: 3D validation and prediction cost seconds per case on this CPU.
    root = tmp_path_factory.mktemp("hippocampus_3d")
    # CPU-sized: patch 24x32x24 instead of 40x56x40 (a depthwise-3D training step is ~10x cheaper), batch 2,
    # lite_3d preset (InstanceNorm, DLKUNet C=32)
    env = prepared_subset(root, "Dataset004_Hippocampus", "3d_fullres", 25, 8,
                          ["--name", "nnUNetPlans_cpu3d", "--patch", "24", "32", "24", "--batch", "2",
                           "--preset", "lite_3d"])
    return root, env


@pytest.fixture(scope="module")
def kvasir(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvasir")
    # nnU-Net plans 640x640 at batch 5: far too heavy for a CPU test (the derived plans re-plan the topology
    # for 128x128 as nnU-Net would: 6 stages instead of 8)
    env = prepared_subset(root, "Dataset201_KvasirSEG", "2d", 60, 10,
                          ["--name", "nnUNetPlans_cpu", "--patch", "128", "128", "--batch", "4",
                           "--option", "mslkseg.width=16"])
    return root, env


def train_predict_evaluate(root, env, dataset_id, dataset_name, configuration, trainer, epochs, iterations,
                           plans="nnUNetPlans_cpu", predict_options=()) -> float:
    """Train fold 0 with the stock CLI, predict the held-back cases, return their foreground Dice."""
    model = root / "results" / dataset_name / f"{trainer}__{plans}__{configuration}"
    run(["nnUNetv2_train", dataset_id, configuration, "0", "-tr", trainer, "-p", plans, "-device", "cpu"],
        train_env(root, epochs, iterations))
    out = root / f"pred_{trainer}_{configuration}"
    run(["nnUNetv2_predict", "-i", root / "new_cases", "-o", out, "-d", dataset_id, "-c", configuration, "-f", "0",
         "-tr", trainer, "-p", plans, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar",
         *predict_options], env)
    run(["nnUNetv2_evaluate_folder", root / "new_cases_gt", out, "-djfile", model / "dataset.json",
         "-pfile", model / "plans.json"], env)
    dice = foreground_dice(out / "summary.json")
    print(f"{trainer} {dataset_name} {configuration}, {epochs}x{iterations} iterations: foreground Dice {dice:.3f}")
    return dice


def _wait_for_epoch(fold: Path, epoch: int, proc: subprocess.Popen, timeout: float) -> None:
    pattern = re.compile(rf": Epoch {epoch}\s*$", re.M)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before epoch {epoch}: "
                                 f"{proc.stdout.read()[-4000:] if proc.stdout else ''}")
        if any(pattern.search(log.read_text()) for log in fold.glob("training_log_*.txt")):
            return
        time.sleep(0.5)
    raise AssertionError(f"epoch {epoch} did not start within {timeout} s")


def test_dlkunet_train_kill_resume_predict_evaluate(hippocampus):
    root, env = hippocampus
    trainer = "nnUNetTrainerDLKUNetM"
    model = root / "results" / "Dataset004_Hippocampus" / f"{trainer}__nnUNetPlans_cpu__2d"
    fold = model / "fold_0"
    train_cmd = ["nnUNetv2_train", "4", "2d", "0", "-tr", trainer, "-p", "nnUNetPlans_cpu", "-device", "cpu"]
    tenv = train_env(root, EPOCHS, ITERATIONS, NNUNET_LK_SAVE_EVERY=1)

    # 1) train, and kill the whole process group during epoch `kill_at`
    kill_at = EPOCHS // 2
    proc = subprocess.Popen([str(c) for c in train_cmd], env=tenv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _wait_for_epoch(fold, kill_at, proc, timeout=1500)
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (fold / "checkpoint_latest.pth").is_file()
    assert not (fold / "checkpoint_final.pth").exists()

    # 2) resume without the budget variables: the checkpoint carries the budget
    resume_env = {k: v for k, v in tenv.items() if k not in ("NNUNET_LK_EPOCHS", "NNUNET_LK_ITERATIONS")}
    logs_before = set(fold.glob("training_log_*.txt"))
    run(train_cmd + ["--c"], resume_env)
    assert (fold / "checkpoint_final.pth").is_file()
    resumed_log = (set(fold.glob("training_log_*.txt")) - logs_before).pop().read_text()
    first_epoch = int(re.search(r": Epoch (\d+)\s*$", resumed_log, re.M).group(1))
    assert first_epoch == kill_at, "--c must continue from the last complete epoch, not restart"

    # the schedule over both runs is exactly the uninterrupted one
    weights = logged_loss_weights(fold)
    assert sorted(weights) == list(range(EPOCHS))
    for epoch, (dice, ce, total) in weights.items():
        expected = sigmoid_weights(progress(epoch, EPOCHS))
        assert total == EPOCHS
        assert (dice, ce) == pytest.approx((expected.dice, expected.ce), abs=1e-4)

    # 3) predict cases never trained on, with the stock predictor (strict load, deep supervision off)
    out = root / "pred_dlkunet"
    run(["nnUNetv2_predict", "-i", root / "new_cases", "-o", out, "-d", "4", "-c", "2d", "-f", "0", "-tr", trainer,
         "-p", "nnUNetPlans_cpu", "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar"], env)
    assert len(list(out.glob("*.nii.gz"))) == len(list((root / "new_cases_gt").glob("*.nii.gz")))

    # 4) evaluate against the held-back labels
    run(["nnUNetv2_evaluate_folder", root / "new_cases_gt", out, "-djfile", model / "dataset.json",
         "-pfile", model / "plans.json"], env)
    dice = foreground_dice(out / "summary.json")
    print(f"DLKUNet-M (width 16) Hippocampus 2d, {EPOCHS}x{ITERATIONS} iterations: foreground Dice {dice:.3f}")
    assert dice >= DICE_FLOOR


# (trainer, epochs, iterations, Dice floor). Calibration on 10 held-back Hippocampus cases, 2d, batch 8:
# LGMSNet 0.715, LM-Net 0.689, MS-LKSeg (C0=16) 0.239; floors about half of that (untrained: ~0.05).
# Runs marked `full` (NNUNET_LK_FULL_TESTS=1) are left out of CI for time: CI runs each backbone's
# required datasets once (LGMSNet: 3D and Kvasir).
full = pytest.mark.full
HIPPOCAMPUS_2D_RUNS = [
    pytest.param("nnUNetTrainerLGMSNet", 16, 25, 0.35, marks=full, id="nnUNetTrainerLGMSNet"),
    pytest.param("nnUNetTrainerLMNet", 16, 25, 0.35, id="nnUNetTrainerLMNet"),
    # learns slowest at this budget: 0.239 in calibration
    pytest.param("nnUNetTrainerMSLKSeg", 16, 25, 0.12, id="nnUNetTrainerMSLKSeg"),
]
# 3d_fullres, CPU plans (patch 24x32x24, batch 2), 8 held-back cases: LGMSNet 0.428 (~50 s an epoch here).
# DLKUNet-M is as slow per epoch and still at Dice 0 after 2 epochs: full-only, floor not calibrated.
HIPPOCAMPUS_3D_RUNS = [
    pytest.param("nnUNetTrainerLGMSNet", 6, 15, 0.2, id="nnUNetTrainerLGMSNet"),
    pytest.param("nnUNetTrainerDLKUNetM", 6, 15, 0.2, marks=full, id="nnUNetTrainerDLKUNetM"),
]
# Kvasir-SEG 2d, CPU plans (patch 128², batch 4, 6 stages), 10 held-back images; everything-polyp scores
# ~0.29, so the floors stay above it. Calibration: LGMSNet 0.571, MS-LKSeg (C0=16) 0.570, LM-Net 0.522.
KVASIR_RUNS = [
    ("nnUNetTrainerLGMSNet", 10, 20, 0.40),
    ("nnUNetTrainerMSLKSeg", 8, 20, 0.40),  # calibration 0.570
    ("nnUNetTrainerLMNet", 8, 20, 0.35),  # calibration 0.522; its pseudo Dice swings most between epochs
]


@pytest.mark.parametrize("trainer,epochs,iterations,floor", HIPPOCAMPUS_2D_RUNS)
def test_backbone_on_hippocampus_2d(hippocampus, trainer, epochs, iterations, floor):
    root, env = hippocampus
    dice = train_predict_evaluate(root, env, "4", "Dataset004_Hippocampus", "2d", trainer, epochs, iterations)
    assert dice >= floor
    model = root / "results" / "Dataset004_Hippocampus" / f"{trainer}__nnUNetPlans_cpu__2d"
    assert_predictor_uses_fused_kernels(model, root / "new_cases", env)
    if trainer == "nnUNetTrainerLMNet":  # one trained model through the ONNX path (export: ~1 min here)
        assert_onnx_matches_pytorch_on_real_data(root, env, model, root / f"pred_{trainer}_2d")


def assert_onnx_matches_pytorch_on_real_data(root: Path, env: dict, model: Path, predicted: Path) -> None:
    """`nnunet-lk export` of the trained fold, then (a) its logits against PyTorch's on real preprocessed
    slices and (b) `nnunet-lk predict-onnx` on the held-back cases against nnUNetv2_predict's files."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_lk.export import load_fold, max_abs_difference_on, ort_session

    onnx_path = root / "onnx" / f"{model.name}.onnx"
    run(["nnunet-lk", "export", model, "--fold", "0", "-o", onnx_path], env)
    fold = load_fold(str(model), 0)
    session = ort_session(str(onnx_path))
    preprocessed = root / "preprocessed" / "Dataset004_Hippocampus" / fold.configuration_manager.data_identifier
    dataset = infer_dataset_class(str(preprocessed))(str(preprocessed))
    images = [np.asarray(dataset.load_case(i)[0]) for i in dataset.identifiers[:3]]  # (c, z, y, x), normalised
    slices = [torch.from_numpy(np.ascontiguousarray(im[:, im.shape[1] // 2][None])).float() for im in images]
    diffs = max_abs_difference_on(fold.network, session, slices)
    print(f"ONNX vs PyTorch on real slices of {model.name}: max abs logit difference {max(diffs):.2e}")
    assert max(diffs) <= 1e-3, diffs

    out = root / f"pred_onnx_{model.name}"
    run(["nnunet-lk", "predict-onnx", "-i", root / "new_cases", "-o", out, "-m", model, "--onnx", onnx_path,
         "-f", "0", "-npp", "0", "-nps", "0"], env)
    cases = sorted(p.name for p in predicted.glob("*.nii.gz"))
    assert cases and sorted(p.name for p in out.glob("*.nii.gz")) == cases
    for case in cases:
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / case))) for folder in (predicted, out))
        assert a.shape == b.shape and (a == b).mean() >= 0.999, f"{case}: {(a != b).sum()} voxels differ"


@pytest.mark.parametrize("trainer,epochs,iterations,floor", HIPPOCAMPUS_3D_RUNS)
def test_backbone_on_hippocampus_3d(hippocampus_3d, trainer, epochs, iterations, floor):
    root, env = hippocampus_3d
    dice = train_predict_evaluate(root, env, "4", "Dataset004_Hippocampus", "3d_fullres", trainer, epochs,
                                  iterations, plans="nnUNetPlans_cpu3d", predict_options=FAST_PREDICTION)
    assert dice >= floor


def assert_predictor_uses_fused_kernels(model: Path, cases: Path, env: dict) -> None:
    """nnUNetv2_predict's own predictor (built statically, strict load, .eval()): every re-parameterisable
    block must run on its single fused kernel, and the state dict must be the checkpoint's."""
    code = (
        "import sys, torch\n"
        "from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor\n"
        "from nnunet_lk.blocks.reparam import ReparamDepthwise\n"
        "p = nnUNetPredictor(device=torch.device('cpu'), use_mirroring=False, verbose=False)\n"
        "p.initialize_from_trained_model_folder(sys.argv[1], use_folds=(0,), checkpoint_name='checkpoint_final.pth')\n"
        "blocks = [m for m in p.network.modules() if isinstance(m, ReparamDepthwise)]\n"
        "import glob, os\n"
        "case = sorted(glob.glob(os.path.join(sys.argv[2], '*_0000.*')))[0]\n"
        "import tempfile\n"
        "p.predict_from_files_sequential([[case]], tempfile.mkdtemp(), False, True, None)\n"
        "ck = torch.load(os.path.join(sys.argv[1], 'fold_0', 'checkpoint_final.pth'), weights_only=False)\n"
        "assert set(p.network.state_dict()) == set(ck['network_weights'])\n"
        "print('REPARAM', len(blocks), sum(b.is_fused for b in blocks))\n")
    proc = run([sys.executable, "-c", code, model, cases], env)
    n_blocks, n_fused = map(int, re.search(r"REPARAM (\d+) (\d+)", proc.stdout).groups())
    if "MSLKSeg" in model.name or "LMNet" in model.name:
        assert n_blocks > 0 and n_fused == n_blocks


@pytest.mark.parametrize("trainer,epochs,iterations,floor", KVASIR_RUNS, ids=[r[0] for r in KVASIR_RUNS])
def test_backbone_on_kvasir(kvasir, trainer, epochs, iterations, floor):
    root, env = kvasir
    dice = train_predict_evaluate(root, env, "201", "Dataset201_KvasirSEG", "2d", trainer, epochs, iterations,
                                  predict_options=FAST_PREDICTION)
    assert dice >= floor
