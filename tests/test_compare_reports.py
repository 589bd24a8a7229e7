"""benchmarks/compare_reports.py: two ablate reports' cases paired, tested as the ablate report tests them."""
import csv
import importlib.util
from pathlib import Path

import pytest
from scipy.stats import wilcoxon

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_reports.py"
spec = importlib.util.spec_from_file_location("compare_reports", SCRIPT)
compare_reports = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_reports)

FIELDS = ["trainer", "fold", "case", "class", "class_name", "Dice", "HD95", "NSD"]


def write_report(folder: Path, trainer: str, dice: dict, other_trainer_dice: float = 0.1) -> None:
    folder.mkdir(parents=True)
    with (folder / "ablate_cases.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for case, (anterior, posterior) in dice.items():
            for cls, name, d in (("1", "Anterior", anterior), ("2", "Posterior", posterior)):
                w.writerow(dict(trainer=trainer, fold=0, case=case, **{"class": cls}, class_name=name, Dice=d,
                                HD95=10 * (1 - d), NSD=d))
                w.writerow(dict(trainer="nnUNetTrainerStockBudget", fold=0, case=case, **{"class": cls},
                                class_name=name, Dice=other_trainer_dice, HD95=50.0, NSD=0.0))


def test_pairs_the_same_cases_of_two_reports_and_tests_them_per_class(tmp_path):
    cases = [f"hippocampus_{i:03d}" for i in range(12)]
    a = {c: (0.5 + 0.02 * i, 0.6 + 0.01 * i) for i, c in enumerate(cases)}
    b = {c: (0.4 + 0.015 * i, 0.6 + 0.01 * i) for i, c in enumerate(cases[:10])}  # two cases only in a
    write_report(tmp_path / "gate", "nnUNetTrainerDLKUNetM", a)
    write_report(tmp_path / "plain", "nnUNetTrainerDLKUNetM", b)

    result = compare_reports.compare(f"{tmp_path / 'gate'}:nnUNetTrainerDLKUNetM",
                                     f"{tmp_path / 'plain'}:nnUNetTrainerDLKUNetM")
    tests = {(t["metric"], t["class"]): t for t in result["tests"]}
    anterior = tests[("Dice", "Anterior")]
    assert anterior["n"] == 10  # the other trainer's rows and the unpaired cases are left out
    diffs = [a[c][0] - b[c][0] for c in cases[:10]]
    assert anterior["mean_difference"] == pytest.approx(sum(diffs) / 10)
    assert anterior["p_value"] == pytest.approx(wilcoxon([a[c][0] for c in cases[:10]],
                                                         [b[c][0] for c in cases[:10]]).pvalue)
    assert tests[("Dice", "Posterior")]["p_value"] == 1.0  # identical values
    assert tests[("Dice", "mean")]["candidate_mean"] == pytest.approx(sum(sum(a[c]) / 2 for c in cases[:10]) / 10)
    assert "| Dice | Anterior |" in compare_reports.markdown(result)


def test_a_missing_report_or_trainer_names_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="run `nnunet-lk ablate"):
        compare_reports.read_cases(f"{tmp_path}:nnUNetTrainerDLKUNetM")
    write_report(tmp_path / "r", "nnUNetTrainerDLKUNetM", {"c": (0.5, 0.5)})
    with pytest.raises(SystemExit, match="no cases of nnUNetTrainerLMNet"):
        compare_reports.read_cases(f"{tmp_path / 'r'}:nnUNetTrainerLMNet")
    with pytest.raises(SystemExit, match="REPORT_DIR:TRAINER"):
        compare_reports.read_cases("no-colon")
