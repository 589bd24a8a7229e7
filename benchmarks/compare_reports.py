"""Paired per-case comparison of two trainings that live in different `nnunet-lk ablate` reports.

`nnunet-lk ablate` tests every trainer against a baseline trained with the same plans. A variant that is a
plans option (e.g. DLKUNet's ``gate_init=identity`` in ``nnUNetPlans_cpu_gate``) sits in a report of its own;
this script pairs the same validation cases of two reports' ``ablate_cases.csv`` and runs the same two-sided
Wilcoxon signed-rank test (``nnunet_lk.ablate.statistics``) per metric and class.

    python benchmarks/compare_reports.py \
        benchmarks/results/ablate_2d_3000_gate_init:nnUNetTrainerDLKUNetM \
        benchmarks/results/ablate_2d_3000:nnUNetTrainerDLKUNetM -o benchmarks/results/ablate_2d_3000_gate_init
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from nnunet_lk.ablate.statistics import case_means, paired_wilcoxon

METRICS = ("Dice", "HD95", "NSD")


def read_cases(spec: str) -> tuple[str, str, list[dict]]:
    """``REPORT_DIR:TRAINER`` -> (label, trainer, rows of that trainer with float metrics)."""
    folder, sep, trainer = spec.rpartition(":")
    if not sep or not folder or not trainer:
        raise SystemExit(f"expected REPORT_DIR:TRAINER, got {spec!r}")
    path = Path(folder) / "ablate_cases.csv"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `nnunet-lk ablate ... -o {folder}` first")
    with path.open() as f:
        rows = [dict(r, case=f"{r['fold']}/{r['case']}", **{m: float(r[m]) for m in METRICS})
                for r in csv.DictReader(f) if r["trainer"] == trainer]
    if not rows:
        raise SystemExit(f"{path} has no cases of {trainer}")
    return f"{Path(folder).name}:{trainer}", trainer, rows


def compare(candidate: str, reference: str) -> dict:
    a_label, a_trainer, a_rows = read_cases(candidate)
    b_label, b_trainer, b_rows = read_cases(reference)
    classes = sorted({(r["class"], r["class_name"]) for r in a_rows})
    tests = []
    for metric in METRICS:
        for cls, name in [(None, "mean")] + classes:
            a = case_means(a_rows, a_trainer, metric, cls)
            b = case_means(b_rows, b_trainer, metric, cls)
            paired = [c for c in a if c in b and math.isfinite(a[c]) and math.isfinite(b[c])]
            tests.append({"metric": metric, "class": name,  # means over the paired cases, as the test sees them
                          "candidate_mean": sum(a[c] for c in paired) / max(1, len(paired)),
                          "reference_mean": sum(b[c] for c in paired) / max(1, len(paired)), **paired_wilcoxon(a, b)})
    return {"candidate": a_label, "reference": b_label, "tests": tests}


def markdown(result: dict) -> str:
    lines = [f"# {result['candidate']} vs {result['reference']}", "",
             "Paired two-sided Wilcoxon signed-rank test per case (difference = candidate - reference; "
             "Dice/NSD: higher is better, HD95: lower is better).", "",
             "| metric | class | candidate | reference | n | median diff | mean diff | p |", "|---|---|---|---|---|---|---|---|"]
    for t in result["tests"]:
        lines.append(f"| {t['metric']} | {t['class']} | {t['candidate_mean']:.4f} | {t['reference_mean']:.4f} | "
                     f"{t['n']} | {t['median_difference']:.4f} | {t['mean_difference']:.4f} | {t['p_value']:.2g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidate", help="REPORT_DIR:TRAINER")
    parser.add_argument("reference", help="REPORT_DIR:TRAINER")
    parser.add_argument("-o", "--output", type=Path, help="folder for compare_<reference report>.{md,json}")
    args = parser.parse_args()
    result = compare(args.candidate, args.reference)
    text = markdown(result)
    print(text)
    if args.output:
        stem = "compare_" + result["reference"].replace(":", "_")
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / f"{stem}.md").write_text(text)
        (args.output / f"{stem}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
