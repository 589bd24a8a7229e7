"""nnunet-lk ablate on synthetic nnU-Net results folders with known Dice, HD95, NSD and Wilcoxon values.

Geometry (array axes z, y, x; spacing 2.0 x 1.0 x 1.0 mm):
- class 1 (Anterior): a one-voxel plate in z. The candidate predicts it 2 slices off: Dice 0, and every
  surface voxel is exactly 2 x 2.0 = 4.0 mm from the other surface, so HD95 = 4.0 and NSD(1 mm) = 0.
- class 2 (Posterior): a 6x6x6 cube. The candidate shifts it by s = case index voxels along x: Dice (6-s)/6.
- the baseline (stock nnUNetTrainer) predicts the reference exactly: Dice 1, HD95 0, NSD 1.
Six cases, all worse for the candidate with distinct differences: the exact two-sided Wilcoxon p = 2/2^6.
"""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_lk import settings
from nnunet_lk import ablate as ab
from nnunet_lk.cli.main import main

DATASET = "Dataset004_Hippocampus"
CANDIDATE, BASELINE = "nnUNetTrainerDLKUNetS", "nnUNetTrainer"
SHAPE, SPACING = (12, 16, 24), (2.0, 1.0, 1.0)
N_CASES = 6
FOLD_OF = {i: 0 if i < 3 else 1 for i in range(N_CASES)}
EPOCH_TIMES = {CANDIDATE: [10.0, 12.0, 11.0], BASELINE: [20.0, 22.0, 21.0]}


def volume(plate_z: int, cube_shift: int) -> np.ndarray:
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[plate_z, 4:12, 4:12] = 1
    seg[6:12, 5:11, 8 + cube_shift:14 + cube_shift] = 2
    return seg


def write_nifti(seg: np.ndarray, path) -> None:
    image = sitk.GetImageFromArray(seg)
    image.SetSpacing(tuple(reversed(SPACING)))  # SimpleITK is x, y, z
    sitk.WriteImage(image, str(path))


def write_log(fold_dir, times) -> None:
    lines = []
    for e, t in enumerate(times):
        lines += [f"2026-01-01 00:00:0{e}.000000: Epoch {e} ", f"2026-01-01: Current learning rate: 0.01 ",
                  f"2026-01-01: train_loss {-0.1 * e:.4f} ", f"2026-01-01: val_loss {-0.05 * e:.4f} ",
                  f"2026-01-01: Pseudo dice [np.float32({0.1 * e:.1f}), np.float32(0.5)] ",
                  f"2026-01-01: Epoch time: {t} s "]
    (fold_dir / "training_log_2026_1_1_00_00_00.txt").write_text("\n".join(lines) + "\n")


def write_summary(fold_dir, gt_dir, cases, plans) -> None:
    """validation/summary.json as nnU-Net writes it (its own per-case metric function and writer)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics, save_summary_json
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    reader = PlansManager(plans).image_reader_writer_class()
    per_case = [compute_metrics(str(gt_dir / f"{c}.nii.gz"), str(fold_dir / "validation" / f"{c}.nii.gz"), reader,
                                [1, 2]) for c in cases]
    means = {k: {m: float(np.nanmean([r["metrics"][k][m] for r in per_case])) for m in per_case[0]["metrics"][k]}
             for k in (1, 2)}
    foreground = {m: float(np.mean([means[k][m] for k in means])) for m in means[1]}
    [recursive_fix_for_json_export(r) for r in per_case]
    save_summary_json({"metric_per_case": per_case, "mean": means, "foreground_mean": foreground},
                      str(fold_dir / "validation" / "summary.json"))


@pytest.fixture
def synthetic_results(nnunet_dirs, hippocampus_plans, hippocampus_dataset_json):
    gt_dir = nnunet_dirs["preprocessed"] / DATASET / "gt_segmentations"
    gt_dir.mkdir(parents=True)
    for d in (nnunet_dirs["preprocessed"] / DATASET,):
        (d / "nnUNetPlans.json").write_text(json.dumps(hippocampus_plans))
        (d / "dataset.json").write_text(json.dumps(hippocampus_dataset_json))
    cases = [f"hippocampus_{i:03d}" for i in range(N_CASES)]
    for c in cases:
        write_nifti(volume(3, 0), gt_dir / f"{c}.nii.gz")
    for trainer in (CANDIDATE, BASELINE):
        model = nnunet_dirs["results"] / DATASET / f"{trainer}__nnUNetPlans__2d"
        for fold in (0, 1):
            fold_dir = model / f"fold_{fold}"
            (fold_dir / "validation").mkdir(parents=True)
            (fold_dir / "checkpoint_final.pth").write_bytes(b"")
            (fold_dir / "debug.json").write_text("{}")
            fold_cases = [c for i, c in enumerate(cases) if FOLD_OF[i] == fold]
            for c in fold_cases:
                i = int(c[-3:])
                pred = volume(5, i) if trainer == CANDIDATE else volume(3, 0)
                write_nifti(pred, fold_dir / "validation" / f"{c}.nii.gz")
            write_summary(fold_dir, gt_dir, fold_cases, hippocampus_plans)
            write_log(fold_dir, EPOCH_TIMES[trainer])
        (model / "plans.json").write_text(json.dumps(hippocampus_plans))
        (model / "dataset.json").write_text(json.dumps(hippocampus_dataset_json))
    return nnunet_dirs


def test_surface_metrics_known_distances():
    ref, pred = volume(3, 0), volume(5, 2)
    m = ab.surface_metrics(pred[None], ref[None], SPACING, ["1", "2"], nsd_tolerance=1.0)
    assert m["1"]["HD95"] == pytest.approx(4.0)  # 2 slices x 2.0 mm, every surface voxel
    assert m["1"]["NSD"] == pytest.approx(0.0)
    assert ab.surface_metrics(pred, ref, SPACING, ["1"], nsd_tolerance=4.0)["1"]["NSD"] == pytest.approx(1.0)
    same = ab.surface_metrics(ref, ref, SPACING, ["1", "2"], nsd_tolerance=1.0)
    assert same["2"] == {"HD95": 0.0, "NSD": 1.0}
    # a class missing from the prediction: worst distance (the image diagonal), NSD 0; missing from both: NaN
    empty = np.zeros_like(ref)
    miss = ab.surface_metrics(empty, ref, SPACING, ["1"], 1.0)["1"]
    assert miss["HD95"] == pytest.approx(math.sqrt(24 ** 2 + 16 ** 2 + 24 ** 2)) and miss["NSD"] == 0.0
    assert all(math.isnan(v) for v in ab.surface_metrics(empty, empty, SPACING, ["1"], 1.0)["1"].values())
    # 2D images stored with a singleton axis (nnU-Net's 2D layout) are measured in 2D
    line_ref, line_pred = np.zeros((1, 1, 12, 16), np.uint8), np.zeros((1, 1, 12, 16), np.uint8)
    line_ref[0, 0, 4, 2:12] = 1
    line_pred[0, 0, 7, 2:12] = 1
    flat = ab.surface_metrics(line_pred, line_ref, (999.0, 0.5, 1.0), ["1"], 1.0)["1"]
    assert flat["HD95"] == pytest.approx(1.5) and flat["NSD"] == 0.0  # 3 rows x 0.5 mm


def test_wilcoxon_exact_and_degenerate():
    worse = {f"c{i}": 1.0 - 0.1 * (i + 1) for i in range(6)}
    base = {f"c{i}": 1.0 for i in range(6)}
    t = ab.paired_wilcoxon(worse, {**base, "extra": 0.5})
    assert t["n"] == 6 and t["p_value"] == pytest.approx(2 / 2 ** 6) and t["median_difference"] < 0
    assert ab.paired_wilcoxon(base, base)["p_value"] == 1.0
    assert ab.paired_wilcoxon({}, base)["n"] == 0


def test_collect_metrics_stats_and_reports(synthetic_results, tmp_path):
    dirs = synthetic_results
    abl = ab.collect(dirs["results"], dirs["preprocessed"], DATASET, "2d", folds=[0, 1], latency_repeats=1,
                     log=lambda m: None)
    assert abl.baseline == BASELINE and set(abl.trainers) == {CANDIDATE, BASELINE}
    cand, base = abl.trainers[CANDIDATE], abl.trainers[BASELINE]
    assert cand["folds"] == [0, 1] and cand["n_cases"] == N_CASES
    expected_dice2 = np.mean([(6 - s) / 6 for s in range(N_CASES)])
    assert cand["Dice"]["1"] == pytest.approx(0.0)
    assert cand["Dice"]["2"] == pytest.approx(expected_dice2)
    assert cand["HD95"]["1"] == pytest.approx(4.0)
    assert cand["NSD"]["1"] == pytest.approx(0.0)
    assert base["Dice"] == {"1": pytest.approx(1.0), "2": pytest.approx(1.0)}
    assert base["HD95"]["2"] == pytest.approx(0.0) and base["NSD"]["2"] == pytest.approx(1.0)
    assert cand["Dice_mean"] == pytest.approx(expected_dice2 / 2)
    assert cand["epoch_time_median_s"] == pytest.approx(11.0) and base["epoch_time_median_s"] == pytest.approx(21.0)
    assert cand["params"] > 0 and cand["macs"] > 0 and cand["latency_ms"] > 0
    assert base["params"] > cand["params"]  # stock nnU-Net vs DLKUNet-S from the same plans
    assert "Dice_cv_mean" not in cand  # only two folds

    mean_dice = next(s for s in abl.stats if s["trainer"] == CANDIDATE and s["metric"] == "Dice"
                     and s["class"] == "mean")
    assert mean_dice["n"] == N_CASES and mean_dice["p_value"] == pytest.approx(2 / 2 ** 6)

    out = tmp_path / "report"
    paths = ab.write_outputs(abl, out)
    for key in ("cases", "summary", "wilcoxon", "markdown", "json", "pareto", "curves", "box_Dice", "box_HD95"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    rows = list(csv.DictReader(open(paths["cases"])))
    assert len(rows) == 2 * N_CASES * 2
    shifted = next(r for r in rows if r["trainer"] == CANDIDATE and r["case"] == "hippocampus_002"
                   and r["class_name"] == "Posterior")
    assert float(shifted["Dice"]) == pytest.approx(4 / 6) and shifted["fold"] == "0"
    summary = {r["trainer"]: r for r in csv.DictReader(open(paths["summary"]))}
    assert float(summary[CANDIDATE]["HD95_Anterior"]) == pytest.approx(4.0)
    report = paths["markdown"].read_text()
    assert f"{expected_dice2 / 2:.4f}" in report and "0.0312" in report and "4.00" in report
    assert "ablate_pareto.png" in report
    record = json.loads(paths["json"].read_text())
    assert record["trainers"][CANDIDATE]["Dice"]["2"] == pytest.approx(expected_dice2)


def test_cli_ablate_and_run_planning(synthetic_results, tmp_path, capsys):
    dirs = synthetic_results
    out = tmp_path / "cli"
    rc = main(["ablate", "-d", DATASET, "-c", "2d", "--folds", "0", "1", "-o", str(out), "--latency-repeats", "0",
               "--no-plots"])
    assert rc == 0
    assert "| nnUNetTrainerDLKUNetS |" in capsys.readouterr().out
    assert (out / "ablate_report.md").is_file() and not (out / "ablate_pareto.png").exists()

    # --run planning: finished folds are skipped, a fold with only checkpoint_latest resumes with --c,
    # a finished fold without validation is validated, a missing fold trains from scratch
    model = dirs["results"] / DATASET / f"{CANDIDATE}__nnUNetPlans__2d"
    (model / "fold_2").mkdir()
    (model / "fold_2" / "checkpoint_latest.pth").write_bytes(b"")
    (model / "fold_1" / "validation" / "summary.json").unlink()
    todo = {t.fold: t.action for t in ab.plan_runs(DATASET, "2d", "nnUNetPlans", [CANDIDATE], [0, 1, 2, 3],
                                                   device="cpu", results_root=dirs["results"])}
    assert todo == {1: "validate", 2: "resume", 3: "train"}
    cmd = ab.train_command("4", "2d", 2, CANDIDATE, "nnUNetPlans", "cpu", "resume")
    assert os.path.basename(cmd[0]) == "nnUNetv2_train" and cmd[1:] == [
        "4", "2d", "2", "-tr", CANDIDATE, "-p", "nnUNetPlans", "-device", "cpu", "--npz", "--c"]


def test_stock_budget_trainer_reads_the_budget_variables(nnunet_dirs, hippocampus_plans, hippocampus_dataset_json,
                                                         monkeypatch):
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_lk.training.stock import nnUNetTrainerStockBudget
    monkeypatch.setenv(settings.EPOCHS, "3")
    monkeypatch.setenv(settings.ITERATIONS, "7")
    def plans():  # nnU-Net 2.8 pops this key, which run_training puts in
        return {**hippocampus_plans, "continue_training": False}

    trainer = nnUNetTrainerStockBudget(plans(), "2d", 0, hippocampus_dataset_json, device=torch.device("cpu"))
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch) == (3, 7)
    assert nnUNetTrainerStockBudget.build_network_architecture is nnUNetTrainer.build_network_architecture
    monkeypatch.setenv(settings.EPOCHS, "0")
    with pytest.raises(ValueError, match="NNUNET_LK_EPOCHS"):
        nnUNetTrainerStockBudget(plans(), "2d", 0, hippocampus_dataset_json, device=torch.device("cpu"))


def test_repeat_bootstrap_matches_scipy_with_one_repeat_and_carries_the_spread_of_repeats():
    from scipy.stats import bootstrap

    from nnunet_lk.ablate.statistics import mean_sd, repeat_bootstrap
    rng = np.random.default_rng(1)
    base, diff = rng.uniform(0.7, 0.9, 40), rng.normal(0.01, 0.03, 40)
    one = repeat_bootstrap({f"c{i}": [base[i] + diff[i]] for i in range(40)}, {f"c{i}": [base[i]] for i in range(40)})
    reference = bootstrap((diff,), np.mean, method="percentile", n_resamples=10000, random_state=0)
    assert one["n"] == 40 and one["mean_difference"] == pytest.approx(diff.mean())
    assert one["ci_low"] == pytest.approx(reference.confidence_interval.low, abs=1.5e-3)
    assert one["ci_high"] == pytest.approx(reference.confidence_interval.high, abs=1.5e-3)

    # three repeats whose trainings differ by a shift common to all cases: the case bootstrap of the per-case
    # means cannot see that spread, the two-level bootstrap does
    shifts = [-0.03, 0.0, 0.03]
    cand = {f"c{i}": [base[i] + diff[i] + s for s in shifts] for i in range(40)}
    stock = {f"c{i}": [base[i]] * 3 for i in range(40)}
    three = repeat_bootstrap(cand, stock)
    assert three["repeats"] == 3 and three["baseline_repeats"] == 3
    assert three["mean_difference"] == pytest.approx(diff.mean())
    assert three["ci_high"] - three["ci_low"] > 2 * (one["ci_high"] - one["ci_low"])
    assert three["p_value"] > one["p_value"]
    # a clear difference on every case and repeat
    clear = repeat_bootstrap({c: [v[0] + 0.1] * 3 for c, v in stock.items()}, stock)
    assert clear["p_value"] == 0.0 and clear["ci_low"] == pytest.approx(0.1)
    # a case without a finite value in every repeat is left out
    cand["c0"][1] = float("nan")
    assert repeat_bootstrap(cand, stock)["n"] == 39
    assert mean_sd([0.8, 0.9, float("nan")]) == (pytest.approx(0.85), pytest.approx(0.0707107, rel=1e-5))
    assert np.isnan(mean_sd([0.8])[1])


def test_repeats_are_read_summarised_and_tested_over_cases_and_repeats(synthetic_results, tmp_path):
    """Repeat 1 (its own results folder, seed recorded in nnU-Net's debug.json) predicts fold 0 perfectly for the
    candidate: each case's Wilcoxon value is its mean over the two repeats; repeat 2 has only fold 0, so it is
    left out of the repeat statistics and named."""
    import shutil
    dirs = synthetic_results
    repeat_1 = dirs["results"] / "nnunet_lk_repeats" / "repeat_1" / DATASET
    shutil.copytree(dirs["results"] / DATASET, repeat_1)
    for fold_dir in repeat_1.glob("*/fold_*"):
        (fold_dir / "debug.json").write_text(json.dumps({"nnunet_lk_seed": "11"}))
    gt_dir = dirs["preprocessed"] / DATASET / "gt_segmentations"
    fold_0 = repeat_1 / f"{CANDIDATE}__nnUNetPlans__2d" / "fold_0"
    cases = [f"hippocampus_{i:03d}" for i in range(3)]
    for c in cases:
        write_nifti(volume(3, 0), fold_0 / "validation" / f"{c}.nii.gz")
    write_summary(fold_0, gt_dir, cases, json.loads((fold_0.parent / "plans.json").read_text()))
    partial = dirs["results"] / "nnunet_lk_repeats" / "repeat_2" / DATASET / f"{CANDIDATE}__nnUNetPlans__2d"
    shutil.copytree(repeat_1 / f"{CANDIDATE}__nnUNetPlans__2d", partial)
    shutil.rmtree(partial / "fold_1")

    one = ab.collect(dirs["results"], dirs["preprocessed"], DATASET, "2d", folds=[0, 1], latency_repeats=0)
    abl = ab.collect(dirs["results"], dirs["preprocessed"], DATASET, "2d", folds=[0, 1], latency_repeats=0,
                     repeats=3)
    cand = abl.trainers[CANDIDATE]
    assert cand["repeats"][0]["seed"] is None and cand["repeats"][1]["seed"] == 11
    assert [cand["repeats"][k]["complete"] for k in (0, 1, 2)] == [True, True, False]
    r0, r1 = cand["Dice_repeat_means"][0], cand["Dice_repeat_means"][1]
    assert r0 == pytest.approx(one.trainers[CANDIDATE]["Dice_mean"]) and r1 > r0
    assert cand["Dice_repeat_mean"] == pytest.approx((r0 + r1) / 2)
    assert cand["Dice_repeat_sd"] == pytest.approx(abs(r1 - r0) / math.sqrt(2))
    assert abl.trainers[BASELINE]["Dice_repeat_sd"] == pytest.approx(0.0)
    # the Wilcoxon test pairs each case's mean over the repeats read (repeat 2's fold 0 included)
    per_case = ab.case_means(abl.rows, CANDIDATE, "Dice")
    first = [r["Dice"] for r in abl.rows if r["trainer"] == CANDIDATE and r["case"] == "hippocampus_001"]
    assert len(first) == 2 * 3 and per_case["hippocampus_001"] == pytest.approx(np.nanmean(first))
    (test,) = abl.repeat_stats
    assert test["trainer"] == CANDIDATE and test["n"] == N_CASES and test["repeats"] == 2
    assert test["ci_low"] <= test["mean_difference"] <= test["ci_high"] < 0
    out = tmp_path / "report"
    paths = ab.write_outputs(abl, out, plots=True)
    report = paths["markdown"].read_text()
    assert "## Repeats: 3 trainings per (trainer, fold)" in report and f"{CANDIDATE} repeat 2 (folds [0])" in report
    with open(out / "ablate_repeats.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["repeat"], r["seed"], r["complete"]) for r in rows if r["trainer"] == CANDIDATE] == [
        ("0", "", "True"), ("1", "11", "True"), ("2", "11", "False")]
    with open(out / "ablate_cases.csv") as f:
        assert "repeat" in next(csv.reader(f))
    assert (out / "ablate_repeats.png").is_file()
    assert json.loads(paths["json"].read_text())["repeat_bootstrap"][0]["n"] == N_CASES
    # one repeat: the files are as before (no repeat column, no repeats section)
    ab.write_outputs(one, tmp_path / "single", plots=False)
    with open(tmp_path / "single" / "ablate_cases.csv") as f:
        assert "repeat" not in next(csv.reader(f))
    assert "## Repeats" not in (tmp_path / "single" / "ablate_report.md").read_text()


def test_bootstrap_p_of_zero_reads_as_below_what_the_resamples_can_show():
    from nnunet_lk.ablate.report import bootstrap_p
    from nnunet_lk.ablate.statistics import repeat_bootstrap
    cases = [f"c{i}" for i in range(20)]
    far = repeat_bootstrap({c: [0.9, 0.91] for c in cases}, {c: [0.5, 0.52] for c in cases}, resamples=1000)
    assert far["p_value"] == 0.0 and bootstrap_p(far) == "< 2e-03"
    near = repeat_bootstrap({c: [0.5 + 0.01 * (i % 3 - 1)] for i, c in enumerate(cases)}, {c: [0.5] for c in cases},
                            resamples=1000)
    assert 0.0 < near["p_value"] <= 1.0 and bootstrap_p(near) == f"{near['p_value']:.4f}"
