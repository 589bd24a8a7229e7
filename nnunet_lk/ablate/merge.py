"""An earlier ``ablate`` report as a source of results: ``--merge DIR`` reads its ``ablate_results.json`` and
``ablate_cases.csv`` and adds every (trainer, fold, repeat) it holds that this machine's nnU-Net results folder
does not. Trainings done on another machine, or in a session whose model folders are gone, then count in the
same report, and ``--run`` trains only what neither holds. A fold validated here wins over the report's."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..errors import UsageError

RESULTS_FILE = "ablate_results.json"
CASES_FILE = "ablate_cases.csv"
# what a trainer's network figures are: taken from the report where no model folder here gives them
FIGURES = ("params", "params_without_ds_heads", "macs", "latency_ms")

Key = Tuple[str, int, int]  # (trainer, fold, repeat)


@dataclass
class EarlierReport:
    folder: Path
    record: dict
    rows: List[dict] = field(default_factory=list)   # per (trainer, repeat, fold, case, class), as collect's rows

    def folds(self, trainer: str, repeat: int) -> List[int]:
        """The folds of one training the report read (validated when it was written)."""
        info = self.record.get("trainers", {}).get(trainer, {})
        repeats = info.get("repeats")
        if repeats is None:  # a report of single trainings: repeat 0 only
            return sorted(int(f) for f in info.get("folds", [])) if repeat == 0 else []
        return sorted(int(f) for f in repeats.get(str(repeat), {}).get("folds", []))

    def seed(self, trainer: str, repeat: int):
        return self.record.get("trainers", {}).get(trainer, {}).get("repeats", {}).get(str(repeat), {}).get("seed")

    def keys(self, trainers: Sequence[str], folds: Sequence[int], repeats: int) -> Set[Key]:
        """The (trainer, fold, repeat) of the requested grid that the report holds."""
        return {(t, f, k) for t in trainers for k in range(repeats) for f in self.folds(t, k) if f in set(folds)}


def read_report(folder) -> EarlierReport:
    """An ``ablate`` output folder; a clear error where it is not one."""
    folder = Path(folder)
    results, cases = folder / RESULTS_FILE, folder / CASES_FILE
    missing = [p.name for p in (results, cases) if not p.is_file()]
    if missing:
        raise UsageError(f"--merge {folder}: {' and '.join(missing)} not found; give a folder that "
                         f"`nnunet-lk ablate -o FOLDER` wrote")
    try:
        record = json.loads(results.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"--merge {folder}: {RESULTS_FILE} is not valid JSON ({e}); restore it from version "
                         f"control or write the report again") from None
    rows = []
    with open(cases, newline="") as f:
        reader = csv.DictReader(f)
        needed = {"trainer", "fold", "case", "class", "Dice", "HD95", "NSD"}
        if not needed <= set(reader.fieldnames or ()):
            raise UsageError(f"--merge {folder}: {CASES_FILE} lacks the columns "
                             f"{', '.join(sorted(needed - set(reader.fieldnames or ())))}")
        for r in reader:
            rows.append({"trainer": r["trainer"], "repeat": int(r.get("repeat") or 0), "fold": int(r["fold"]),
                         "case": r["case"], "class": r["class"],
                         **{m: _number(r[m]) for m in ("Dice", "HD95", "NSD")}})
    return EarlierReport(folder, record, rows)


def _number(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def check_compatible(report: EarlierReport, dataset: str, configuration: str, plans: str,
                     nsd_tolerance: float) -> None:
    """Only results of the same dataset, configuration, plans and NSD tolerance may be merged."""
    rec = report.record
    wanted = {"dataset": dataset, "configuration": configuration, "plans": plans}
    differ = [f"{k} {rec.get(k)!r} (here {v!r})" for k, v in wanted.items() if rec.get(k) != v]
    if not math.isclose(float(rec.get("nsd_tolerance", nsd_tolerance)), nsd_tolerance):
        differ.append(f"NSD tolerance {rec.get('nsd_tolerance')} (here {nsd_tolerance}; --nsd-tolerance)")
    if differ:
        raise UsageError(f"--merge {report.folder}: that report is of another protocol: {'; '.join(differ)}. "
                         f"Merge only a report of the same dataset, configuration, plans and tolerance")


def merge_into(abl, report: EarlierReport, folds: Sequence[int], log=print) -> List[Key]:
    """Add to ``abl`` (before ``summarize``) the report's folds that ``abl`` did not read here; returns them."""
    names = report.record.get("class_names") or {}
    if abl.class_names and names and {str(k): v for k, v in abl.class_names.items()} != names:
        raise UsageError(f"--merge {report.folder}: its labels {names} differ from this dataset's "
                         f"{abl.class_names}")
    abl.class_names = abl.class_names or names
    added: List[Key] = []
    for trainer, info in abl.trainers.items():
        prior = report.record.get("trainers", {}).get(trainer)
        if prior is None:
            continue
        local_repeats = set(info.get("repeats", {}))
        for repeat in range(abl.repeats):
            here = set(info.get("repeats", {}).get(repeat, {}).get("folds", []))
            take = [f for f in report.folds(trainer, repeat) if f in set(folds) and f not in here]
            if not take:
                continue
            abl.rows += [dict(r) for r in report.rows
                         if r["trainer"] == trainer and r["repeat"] == repeat and r["fold"] in take]
            record = info.setdefault("repeats", {}).setdefault(repeat, {"folds": [], "seed": report.seed(trainer, repeat)})
            record["folds"] = sorted(set(record["folds"]) | set(take))
            record["complete"] = sorted(record["folds"]) == sorted(folds)
            record["merged_from"] = str(report.folder)
            info["folds"] = sorted(set(info["folds"]) | set(take))
            added += [(trainer, f, repeat) for f in take]
        if not local_repeats and any(k[0] == trainer for k in added):
            # no training of this trainer read here: its figures and epoch times are the report's
            info["epoch_times"] = list(prior.get("epoch_times", []))
            info["epochs"] = prior.get("epochs", info.get("epochs"))
            for key in FIGURES:
                if key not in info and key in prior:
                    info[key] = prior[key]
        for key in ("incomplete_folds", "missing_folds"):
            info[key] = sorted(set(info.get(key, [])) - set(info["folds"]))
    for trainer in sorted({k[0] for k in added}):
        got = sorted({(k[2], k[1]) for k in added if k[0] == trainer})
        abl.notes.append(f"{trainer}: " + ", ".join(f"repeat {r} fold {f}" for r, f in got)
                         + f" from the earlier report {report.folder} (no model folder here)")
    if added:
        log(f"--merge: {len(added)} (trainer, fold, repeat) from {report.folder}")
    return added
