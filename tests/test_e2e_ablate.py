"""`nnunet-lk ablate --run` end to end on real data (issue 6): it trains the missing (trainer, fold) pairs of
all five folds through the stock nnUNetv2_train (stock nnU-Net on the same budget, and LGMSNet), reads
nnU-Net's validation results, runs nnUNetv2_find_best_configuration with ensembling, and a second call
trains nothing. Then the two trainers' 5-fold models are ensembled at prediction time with the stock
nnUNetv2_predict --save_probabilities + nnUNetv2_ensemble.

The budget is tiny (1 epoch x 2 iterations): this tests the wiring, not accuracy (README's results tables
and benchmarks/ carry the accuracy figures)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from tests.helpers.realdata import prepared_subset, run
from nnunet_lk import settings

pytestmark = pytest.mark.slow

TRAINERS = ["nnUNetTrainerStockBudget", "nnUNetTrainerLGMSNet"]
N_TRAIN = 15  # three validation cases per fold


@pytest.fixture(scope="module")
def small_hippocampus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hippocampus_5fold")
    env = prepared_subset(root, "Dataset004_Hippocampus", "2d", N_TRAIN, 2,
                          ["--name", "nnUNetPlans_cpu", "--batch", "4"], seed=1)
    return root, env


def test_ablate_run_five_folds_find_best_and_ensemble(small_hippocampus):
    root, env = small_hippocampus
    env = {**env, "nnUNet_n_proc_DA": "1", settings.VAL_MIRRORING: "0"}
    out = root / "ablation"
    # two 1-thread trainings at a time (the local executor): most of each is process start-up, which one core does
    cmd = ["nnunet-lk", "ablate", "-d", "4", "-c", "2d", "-p", "nnUNetPlans_cpu", "--run", "--trainers", *TRAINERS,
           "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--device", "cpu", "--latency-repeats", "1",
           "--executor", "local", "--jobs", "2", "--threads-per-job", "1", "-o", out]
    first = run(cmd, env, timeout=3000)
    results = root / "results" / "Dataset004_Hippocampus"
    for t in TRAINERS:
        for f in range(5):
            fold = results / f"{t}__nnUNetPlans_cpu__2d" / f"fold_{f}"
            assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
            assert len(list((fold / "validation").glob("*.npz"))) == 3  # --npz: what ensembling needs
        assert f"{t} fold 4" in first.stderr  # progress shown per pair

    record = json.loads((out / "ablate_results.json").read_text())
    assert record["baseline"] == "nnUNetTrainerStockBudget"
    for t in TRAINERS:
        assert record["trainers"][t]["folds"] == [0, 1, 2, 3, 4]
        assert record["trainers"][t]["params"] > 0 and record["trainers"][t]["macs"] > 0
    with open(out / "ablate_cases.csv") as f:
        cases = list(csv.DictReader(f))
    assert {(r["trainer"], r["case"]) for r in cases} == {(t, c) for t in TRAINERS for c in {r["case"] for r in cases}}
    assert len({r["case"] for r in cases}) == N_TRAIN  # every training case validated exactly once over the folds
    assert all(0.0 <= float(r["Dice"]) <= 1.0 for r in cases if r["Dice"] not in ("", "nan"))
    # the reference is never empty, so Dice is finite on every case: all of them are paired
    dice_test = [s for s in record["wilcoxon"] if s["metric"] == "Dice" and s["class"] == "mean"]
    assert [(s["trainer"], s["n"]) for s in dice_test] == [("nnUNetTrainerLGMSNet", N_TRAIN)]

    best = record["find_best_configuration"]
    assert best is not None and best["returncode"] == 0, best
    assert sorted(best["trainers"]) == sorted(TRAINERS)
    assert "--disable_ensembling" not in best["command"]
    assert (results / "inference_instructions.txt").is_file()
    assert any((results / "ensembles").iterdir())  # the 2-model ensemble was cross-validated
    assert "ablate_report.md" in {p.name for p in out.iterdir()}

    # a second --run trains only what is missing: with --repeats 2 on fold 0, repeat 1 of each trainer (seed 7 + 1,
    # in its own results folder); nothing of repeat 0 is touched
    stamps = {p: p.stat().st_mtime for p in results.rglob("checkpoint_final.pth")}
    env = {**env, settings.THREADS: "1"}  # reproducible with a fixed thread count (README), as --threads-per-job 1 sets
    second = run(cmd + ["--no-find-best", "--folds", "0", "--repeats", "2", "--seed", "7"], env, timeout=1200)
    assert {p: p.stat().st_mtime for p in results.rglob("checkpoint_final.pth")} == stamps
    repeat_1 = root / "results" / "nnunet_lk_repeats" / "repeat_1" / "Dataset004_Hippocampus"
    for t in TRAINERS:
        fold = repeat_1 / f"{t}__nnUNetPlans_cpu__2d" / "fold_0"
        assert (fold / "validation" / "summary.json").is_file()
        assert json.loads((fold / "debug.json").read_text())["nnunet_lk_seed"] == "8"
        assert f"{t} 2d fold 0 repeat 1" in second.stderr
    record = json.loads((out / "ablate_results.json").read_text())
    assert record["repeats"] == 2 and [s["n"] for s in record["repeat_bootstrap"]] == [3]
    assert record["trainers"][TRAINERS[1]]["repeats"]["1"]["seed"] == 8
    assert "## Repeats: 2 trainings per (trainer, fold)" in (out / "ablate_report.md").read_text()

    # the same seed again, by hand through the stock command: bitwise the same weights on this CPU (one thread, one
    # augmentation worker)
    import torch
    again = {**env, "nnUNet_results": str(root / "again"), settings.SEED: "8", settings.EPOCHS: "1",
             settings.ITERATIONS: "2", settings.VAL_ITERATIONS: "1"}
    run(["nnUNetv2_train", "4", "2d", "0", "-tr", TRAINERS[1], "-p", "nnUNetPlans_cpu", "-device", "cpu"], again)
    weights = [torch.load(r / "Dataset004_Hippocampus" / f"{TRAINERS[1]}__nnUNetPlans_cpu__2d" / "fold_0" /
                          "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
               for r in (root / "again", repeat_1.parent)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # ensembling at prediction time with the stock CLIs, 5 folds per trainer
    outputs = []
    for t in TRAINERS:
        pred = root / f"pred_{t}"
        run(["nnUNetv2_predict", "-i", root / "new_cases", "-o", pred, "-d", "4", "-c", "2d", "-tr", t,
             "-p", "nnUNetPlans_cpu", "-f", "0", "1", "2", "3", "4", "--save_probabilities", "-device", "cpu",
             "-npp", "0", "-nps", "0", "--disable_progress_bar"], env)
        outputs.append(pred)
    ensemble = root / "ensemble"
    run(["nnUNetv2_ensemble", "-i", *outputs, "-o", ensemble, "-np", "1"], env)
    segs = sorted(ensemble.glob("*.nii.gz"))
    assert len(segs) == 2
    for seg in segs:
        labels = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(seg))))
        assert set(labels.tolist()) <= {0, 1, 2}
        reference = sitk.ReadImage(str(root / "new_cases_gt" / seg.name))
        assert sitk.ReadImage(str(seg)).GetSize() == reference.GetSize()
