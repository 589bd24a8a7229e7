"""``ablate --merge``: an earlier report's (trainer, fold, repeat) results stand in for model folders that are
gone (another machine, a fresh checkout), give the same statistics as the folders did, and are not trained again."""
from __future__ import annotations

import json
import shutil

import pytest

from nnunet_lk import ablate as ab
from nnunet_lk.cli.main import main
from nnunet_lk.errors import UsageError

from .test_ablate import BASELINE, CANDIDATE, DATASET, synthetic_results  # noqa: F401  (fixture)

FOLDS = [0, 1]


def _with_repeat_1(dirs):
    """Repeat 1 of both trainers: a copy of repeat 0 with its own seed."""
    repeat_1 = ab.results.repeat_root(dirs["results"], 1) / DATASET
    shutil.copytree(dirs["results"] / DATASET, repeat_1)
    for fold_dir in repeat_1.glob("*/fold_*"):
        (fold_dir / "debug.json").write_text(json.dumps({"nnunet_lk_seed": "1"}))
    return repeat_1


def _collect(dirs, **kw):
    return ab.collect(dirs["results"], dirs["preprocessed"], DATASET, "2d", folds=FOLDS, latency_repeats=0,
                      repeats=2, log=lambda m: None, **kw)


def _comparable(abl):
    rows = sorted((r["trainer"], r["repeat"], r["fold"], r["case"], r["class"], round(r["Dice"], 12))
                  for r in abl.rows)
    figures = {t: (i["Dice_repeat_means"], i["folds"], {k: (r["folds"], r["complete"], r["seed"])
                                                        for k, r in i["repeats"].items()}, i.get("params"))
               for t, i in abl.trainers.items()}
    return rows, figures, _rounded(abl.repeat_stats), _rounded(abl.stats)


def _rounded(records):
    return [{k: round(v, 9) if isinstance(v, float) else v for k, v in r.items()} for r in records]


def test_a_report_stands_in_for_model_folders_that_are_gone(synthetic_results, tmp_path):
    dirs = synthetic_results
    repeat_1 = _with_repeat_1(dirs)
    full = _collect(dirs)
    out = tmp_path / "report"
    ab.write_outputs(full, out, plots=False)

    # this machine lost the candidate's repeat 1 and every folder of the baseline
    shutil.rmtree(repeat_1 / f"{CANDIDATE}__nnUNetPlans__2d")
    for root in (dirs["results"] / DATASET, repeat_1):
        shutil.rmtree(root / f"{BASELINE}__nnUNetPlans__2d")
    alone = _collect(dirs, trainers=[CANDIDATE], baseline=BASELINE)
    assert alone.trainers[BASELINE]["folds"] == [] and alone.stats == []

    earlier = ab.read_report(out)
    merged = _collect(dirs, trainers=[CANDIDATE], baseline=BASELINE, earlier=earlier)
    rows, figures, repeat_stats, stats = _comparable(merged)
    assert (rows, figures) == _comparable(full)[:2]
    assert (repeat_stats, stats) == _comparable(full)[2:] and stats
    base = merged.trainers[BASELINE]
    assert base["epoch_time_median_s"] == pytest.approx(full.trainers[BASELINE]["epoch_time_median_s"])
    assert base["repeats"][1]["merged_from"] == str(out) and "merged_from" not in merged.trainers[CANDIDATE]["repeats"][0]
    assert any(n.startswith(f"{CANDIDATE}: repeat 1 fold 0, repeat 1 fold 1 from the earlier report") for n in merged.notes)

    # --run trains only what neither this machine nor the report holds
    done = earlier.keys([CANDIDATE, BASELINE, "nnUNetTrainerLGMSNet"], [0, 1, 2], 2)
    assert done == {(t, f, k) for t in (CANDIDATE, BASELINE) for f in FOLDS for k in (0, 1)}
    jobs = ab.plan_runs(DATASET, "2d", "nnUNetPlans", [CANDIDATE, BASELINE], [0, 1, 2], device="cpu",
                        results_root=dirs["results"], repeats=2, seed=0, done_elsewhere=done)
    assert sorted((j.trainer, j.fold, j.repeat) for j in jobs) == [
        (BASELINE, 2, 0), (BASELINE, 2, 1), (CANDIDATE, 2, 0), (CANDIDATE, 2, 1)]


def test_a_fold_validated_here_wins_over_the_reports(synthetic_results, tmp_path):
    dirs = synthetic_results
    _with_repeat_1(dirs)
    out = tmp_path / "report"
    ab.write_outputs(_collect(dirs), out, plots=False)
    earlier = ab.read_report(out)
    for r in earlier.rows:  # the report says otherwise; this machine's validation counts
        r["Dice"] = 0.0
    merged = _collect(dirs, earlier=earlier)
    assert _comparable(merged)[:2] == _comparable(_collect(dirs))[:2] and not merged.notes


def test_cli_merges_and_refuses_another_protocol(synthetic_results, tmp_path, capsys):
    dirs = synthetic_results
    out = tmp_path / "report"
    assert main(["ablate", "-d", DATASET, "-c", "2d", "--folds", "0", "1", "-o", str(out), "--latency-repeats", "0",
                 "--no-plots"]) == 0
    shutil.rmtree(dirs["results"] / DATASET / f"{CANDIDATE}__nnUNetPlans__2d")
    capsys.readouterr()
    # the report is its own earlier report: rewritten with the same figures
    before = json.loads((out / "ablate_results.json").read_text())
    assert main(["ablate", "-d", DATASET, "-c", "2d", "--folds", "0", "1", "-o", str(out), "--latency-repeats", "0",
                 "--no-plots", "--merge", str(out)]) == 0
    after = json.loads((out / "ablate_results.json").read_text())
    assert after["trainers"][CANDIDATE]["Dice_mean"] == pytest.approx(before["trainers"][CANDIDATE]["Dice_mean"])
    tests = [[(w["trainer"], w["metric"], w["class"], w["n"], round(w["p_value"] or 0, 9)) for w in r["wilcoxon"]]
             for r in (before, after)]
    assert tests[0] == tests[1] and len(tests[0]) > 0
    assert f"| {CANDIDATE} |" in capsys.readouterr().out

    assert main(["ablate", "-d", DATASET, "-c", "2d", "-p", "nnUNetPlans_cpu", "--folds", "0", "1", "-o",
                 str(tmp_path / "x"), "--merge", str(out)]) == 2
    assert "another protocol: plans 'nnUNetPlans' (here 'nnUNetPlans_cpu')" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="ablate_results.json and ablate_cases.csv not found"):
        ab.read_report(tmp_path / "nowhere")
    (out / "ablate_results.json").write_text("{")
    with pytest.raises(UsageError, match="not valid JSON"):
        ab.read_report(out)
