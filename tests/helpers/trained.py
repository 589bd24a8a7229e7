"""Trained folds for the real-data tests: each (dataset subset, trainer) is prepared, trained, predicted and
evaluated once per test session through the stock CLIs, then shared by every check that needs it (Dice
floor, resume schedule, fused kernels under the stock predictor, ONNX export). The fixtures that hand them
out are in tests/conftest.py."""
from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from tests.helpers.realdata import foreground_dice, kill_group, prepared_subset, run, train_env
from nnunet_lk import settings

# 3D and large 2D images: no test-time mirroring and no window overlap at prediction, a 4-8x saving on this
# CPU (the floors were calibrated this way).
FAST_PREDICTION = ("--disable_tta", "-step_size", "1")


@dataclass(frozen=True)
class Subset:
    """A linked subset of ../shared/data with CPU-sized derived plans (same preprocessed data)."""
    source: str
    configuration: str
    n_train: int
    n_test: int
    plans_args: Tuple[str, ...]
    predict_options: Tuple[str, ...] = ()

    @property
    def dataset_id(self) -> str:
        return str(int(self.source[len("Dataset"):len("Dataset") + 3]))

    @property
    def plans(self) -> str:
        return self.plans_args[self.plans_args.index("--name") + 1]


SUBSETS = {
    # batch 8 instead of the planned 81 for 2d; narrower DLKUNet/MS-LKSeg (the options are recorded in the plans,
    # so nnUNetv2_predict rebuilds the same nets)
    "hippocampus_2d": Subset("Dataset004_Hippocampus", "2d", 60, 10,
                             ("--name", "nnUNetPlans_cpu", "--batch", "8", "--option", "dlkunet_m.width=16",
                              "--option", "mslkseg.width=16")),
    # patch 24x32x24 instead of 40x56x40 (a depthwise-3D training step is ~10x cheaper), batch 2, lite_3d preset
    # (InstanceNorm, DLKUNet C=32); its own smaller subset: 3D prediction costs seconds per case here
    "hippocampus_3d": Subset("Dataset004_Hippocampus", "3d_fullres", 25, 8,
                             ("--name", "nnUNetPlans_cpu3d", "--patch", "24", "32", "24", "--batch", "2",
                              "--preset", "lite_3d"), FAST_PREDICTION),
    # nnU-Net plans 640x640 at batch 5: far too heavy for a CPU test; the derived plans re-plan the topology for
    # 128x128 as nnU-Net would (6 stages instead of 8)
    "kvasir": Subset("Dataset201_KvasirSEG", "2d", 60, 10,
                     ("--name", "nnUNetPlans_cpu", "--patch", "128", "128", "--batch", "4",
                      "--option", "mslkseg.width=16"), FAST_PREDICTION),
}


@dataclass(frozen=True)
class Run:
    """One trained fold: ``subset`` (a key of SUBSETS), trainer, budget, and the calibrated Dice floor.
    ``kill_at``: the training is killed with SIGKILL during that epoch and resumed with --c."""
    subset: str
    trainer: str
    epochs: int
    iterations: int
    floor: float
    kill_at: Optional[int] = None

    @property
    def id(self) -> str:
        return f"{self.subset}-{self.trainer}"


@dataclass
class TrainedFold:
    run: Run
    root: Path
    env: dict
    model: Path  # the nnU-Net model folder (trainer__plans__configuration)
    prediction: Path  # nnUNetv2_predict's output on the held-back cases, with evaluate_folder's summary.json
    dice: float
    seconds: dict = field(default_factory=dict)  # wall time of each step
    resume: dict = field(default_factory=dict)  # what the kill left on disk (kill_at runs)

    @property
    def fold(self) -> Path:
        return self.model / "fold_0"


def prepare(subset: Subset, root: Path) -> dict:
    return prepared_subset(root, subset.source, subset.configuration, subset.n_train, subset.n_test,
                           list(subset.plans_args))


def train_and_evaluate(spec: Run, root: Path, env: dict) -> TrainedFold:
    """nnUNetv2_train (killed and resumed with --c if ``spec.kill_at``) → nnUNetv2_predict on the held-back
    cases → nnUNetv2_evaluate_folder."""
    subset = SUBSETS[spec.subset]
    model = root / "results" / subset.source / f"{spec.trainer}__{subset.plans}__{subset.configuration}"
    train_cmd = ["nnUNetv2_train", subset.dataset_id, subset.configuration, "0", "-tr", spec.trainer,
                 "-p", subset.plans, "-device", "cpu"]
    seconds, resume = {}, {}
    start = time.perf_counter()
    if spec.kill_at is None:
        run(train_cmd, train_env(root, spec.epochs, spec.iterations))
    else:
        resume = _train_killed_then_resumed(train_cmd, root, spec, model / "fold_0")
    seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    out = root / f"pred_{spec.trainer}_{subset.configuration}"
    run(["nnUNetv2_predict", "-i", root / "new_cases", "-o", out, "-d", subset.dataset_id, "-c",
         subset.configuration, "-f", "0", "-tr", spec.trainer, "-p", subset.plans, "-device", "cpu", "-npp", "0",
         "-nps", "0", "--disable_progress_bar", *subset.predict_options], env)
    seconds["predict"] = time.perf_counter() - start
    run(["nnUNetv2_evaluate_folder", root / "new_cases_gt", out, "-djfile", model / "dataset.json",
         "-pfile", model / "plans.json"], env)
    dice = foreground_dice(out / "summary.json")
    print(f"{spec.trainer} {subset.source} {subset.configuration}, {spec.epochs}x{spec.iterations} iterations: "
          f"foreground Dice {dice:.3f} (train {seconds['train']:.0f} s, predict {seconds['predict']:.0f} s)")
    return TrainedFold(spec, root, env, model, out, dice, seconds, resume)


def _train_killed_then_resumed(train_cmd, root: Path, spec: Run, fold: Path) -> dict:
    """Train, SIGKILL the whole process group during epoch ``spec.kill_at``, then resume with --c without the
    budget variables (the checkpoint carries the budget). Returns what the kill left on disk."""
    tenv = train_env(root, spec.epochs, spec.iterations, **{settings.SAVE_EVERY: 1})
    proc = subprocess.Popen([str(c) for c in train_cmd], env=tenv, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_epoch(fold, spec.kill_at, proc, timeout=1500)
        time.sleep(1.0)
    finally:
        kill_group(proc)
    state = {"latest_after_kill": (fold / "checkpoint_latest.pth").is_file(),
             "final_after_kill": (fold / "checkpoint_final.pth").exists(),
             "logs_before_resume": sorted(p.name for p in fold.glob("training_log_*.txt"))}
    resume_env = {k: v for k, v in tenv.items() if k not in (settings.EPOCHS, settings.ITERATIONS)}
    run(train_cmd + ["--c"], resume_env)
    return state


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


def assert_beats_the_dice_floor(fold: TrainedFold) -> None:
    """Every held-back case predicted, and the foreground Dice at or above the run's calibrated floor."""
    ending = json.loads((fold.model / "dataset.json").read_text())["file_ending"]
    predicted = sorted(p.name for p in fold.prediction.glob(f"*{ending}"))
    assert predicted == sorted(p.name for p in (fold.root / "new_cases_gt").iterdir())
    assert fold.dice >= fold.run.floor, f"{fold.run.id}: foreground Dice {fold.dice:.3f} < floor {fold.run.floor}"


__all__ = ["FAST_PREDICTION", "Run", "SUBSETS", "Subset", "TrainedFold", "assert_beats_the_dice_floor", "prepare",
           "train_and_evaluate"]
