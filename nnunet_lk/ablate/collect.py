"""The collection: every trainer's folds read into one ``Ablation`` (rows per case and class, figures per
trainer: params, MACs, latency, epoch times, curves), then summarised and tested against the baseline."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..nnunet_io import dataset_name, resolve_trainer
from ..errors import UsageError
from .merge import EarlierReport, check_compatible, merge_into
from .metrics import fold_case_metrics
from .results import (ALL_FOLDS, FoldRun, checkpoint_curves, default_baseline, discover_trainers, label_names,
                      model_folder, parse_training_logs, recorded_seed, repeat_root)
from .statistics import _nanmean, case_means, mean_sd, paired_wilcoxon, repeat_bootstrap


@dataclass
class Ablation:
    dataset: str
    configuration: str
    plans: str
    baseline: Optional[str]
    class_names: Dict[str, str]
    nsd_tolerance: float
    rows: List[dict] = field(default_factory=list)          # per (trainer, fold, case, class)
    trainers: Dict[str, dict] = field(default_factory=dict)  # per trainer: folds, figures, curves
    stats: List[dict] = field(default_factory=list)
    find_best: Optional[dict] = None
    notes: List[str] = field(default_factory=list)
    repeats: int = 1                                          # trainings per (trainer, fold) read
    repeat_stats: List[dict] = field(default_factory=list)   # bootstrap over cases and repeats vs the baseline


def network_figures(trainer: str, model_dir: Path, configuration: str, latency_repeats: int) -> dict:
    """Params, MACs and eval-mode latency per patch (batch 1, CPU) of the net built from the results' plans."""
    import statistics as st

    import torch

    from ..analysis import count_macs
    from ..plans import plans_context
    from ..networks.unet import count_parameters
    plans = json.loads((model_dir / "plans.json").read_text())
    dataset_json = json.loads((model_dir / "dataset.json").read_text())
    pm, cm, n_in, n_out = plans_context(plans, dataset_json, configuration)
    net = resolve_trainer(trainer).build_network_architecture(pm, cm, n_in, n_out, False).eval()
    shape = (1, n_in, *cm.patch_size)
    figures = {"params": sum(p.numel() for p in net.parameters()), "params_without_ds_heads": count_parameters(net, deep_supervision_heads=False),
               "macs": count_macs(net, shape)}
    if latency_repeats > 0:
        x = torch.randn(shape)
        times = []
        with torch.inference_mode():
            net(x)  # warm-up
            for _ in range(latency_repeats):
                start = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - start)
        figures["latency_ms"] = 1e3 * st.median(times)
    return figures


def collect(results_root, preprocessed_root, dataset: str, configuration: str, plans: str = "nnUNetPlans",
            trainers: Optional[Sequence[str]] = None, folds: Sequence[int] = ALL_FOLDS, baseline: Optional[str] = None,
            nsd_tolerance: float = 1.0, latency_repeats: int = 5, repeats: int = 1,
            earlier: Optional[EarlierReport] = None, log=print) -> Ablation:
    """Every trainer's validated folds, of each of ``repeats`` trainings (repeat k > 0 under
    ``repeat_root(results_root, k)``), read into one Ablation and summarised; with ``earlier`` (``--merge``), the
    folds that report holds and this results folder does not are added (``merge.merge_into``)."""
    name = dataset_name(dataset)
    if earlier is not None:
        check_compatible(earlier, name, configuration, plans, nsd_tolerance)
    if not trainers:
        trainers = discover_trainers(results_root, name, plans, configuration)
        if earlier is not None:
            trainers += [t for t in earlier.record.get("trainers", {}) if t not in trainers]
    trainers = list(trainers)
    if not trainers:
        raise UsageError(f"no results for {name} {configuration} (plans {plans}) under {results_root}: train first "
                         f"(nnUNetv2_train, or nnunet-lk ablate --run)")
    baseline = baseline or default_baseline(trainers)
    if baseline is not None and baseline not in trainers:
        trainers = [baseline] + trainers
    gt_folder = Path(preprocessed_root) / name / "gt_segmentations"
    if not gt_folder.is_dir():
        raise UsageError(f"{gt_folder} does not exist: the ground truth comes from nnUNetv2_plan_and_preprocess")
    abl = Ablation(name, configuration, plans, baseline, {}, nsd_tolerance, repeats=repeats)
    for trainer in trainers:
        info = {"folds": [], "incomplete_folds": [], "missing_folds": [], "epoch_times": [], "curves": {},
                "repeats": {}}
        figures_from = None
        for repeat in range(repeats):
            model_dir = model_folder(repeat_root(results_root, repeat), name, trainer, plans, configuration)
            done = _read_repeat(abl, info, trainer, model_dir, folds, gt_folder, repeat, log)
            if done is not None:
                info["repeats"][repeat] = done
                figures_from = figures_from or model_dir
        for key in ("incomplete_folds", "missing_folds"):
            info[key] = sorted(set(info[key]) - set(info["folds"]))
        if figures_from is None:
            log(f"{trainer}: no results folder ({model_folder(results_root, name, trainer, plans, configuration)})")
        else:
            try:
                info.update(network_figures(trainer, figures_from, configuration, latency_repeats))
            except Exception as e:  # a trainer whose class is gone can still be reported by its metrics
                abl.notes.append(f"{trainer}: params/MACs/latency not measured ({type(e).__name__}: {e})")
        abl.trainers[trainer] = info
    if earlier is not None:
        merge_into(abl, earlier, folds, log=log)
    summarize(abl)
    return abl


def _read_repeat(abl: Ablation, info: dict, trainer: str, model_dir: Path, folds: Sequence[int], gt_folder: Path,
                 repeat: int, log) -> Optional[dict]:
    """Add one repeat's validated folds to ``abl.rows`` and ``info``; its folds and seed (None: no results)."""
    if not (model_dir / "plans.json").is_file():
        info["missing_folds"] += list(folds)
        return None
    plans_json = json.loads((model_dir / "plans.json").read_text())
    dataset_json = json.loads((model_dir / "dataset.json").read_text())
    abl.class_names = abl.class_names or label_names(dataset_json)
    read, seeds = [], set()
    suffix = f" repeat {repeat}" if repeat else ""
    for f in folds:
        run = FoldRun(trainer, f, model_dir / f"fold_{f}")
        if not run.validated:
            (info["incomplete_folds"] if run.path.is_dir() else info["missing_folds"]).append(f)
            continue
        log(f"{trainer} fold {f}{suffix}: reading validation ({'final' if run.complete else 'NO checkpoint_final'})")
        rows = fold_case_metrics(run, plans_json, dataset_json, gt_folder, abl.nsd_tolerance, log=log)
        abl.rows += [{**r, "repeat": repeat} for r in rows]
        read.append(f)
        seeds.add(recorded_seed(run.path))
        curves = parse_training_logs(run.path) or checkpoint_curves(run.path)
        info["curves"][f if not repeat else f"{f}.{repeat}"] = curves
        info["epoch_times"] += [c["epoch_time"] for c in curves.values() if "epoch_time" in c]
        info["epochs"] = max(info.get("epochs", 0), len(curves))
    info["folds"] = sorted(set(info["folds"]) | set(read))
    return {"folds": read, "complete": sorted(read) == sorted(folds),
            "seed": seeds.pop() if len(seeds) == 1 else sorted(seeds, key=str) if seeds else None}


def summarize(abl: Ablation) -> None:
    """Per-trainer means (per class, overall, cross-validation) and the Wilcoxon tests against the baseline."""
    classes = sorted({r["class"] for r in abl.rows}, key=lambda k: (len(k), k))
    for trainer, info in abl.trainers.items():
        rows = [r for r in abl.rows if r["trainer"] == trainer]
        info["n_cases"] = len({r["case"] for r in rows})
        for metric in ("Dice", "HD95", "NSD"):
            info[metric] = {c: _nanmean(r[metric] for r in rows if r["class"] == c) for c in classes}
            info[f"{metric}_mean"] = _nanmean(case_means(abl.rows, trainer, metric).values()) if rows else math.nan
            # cross-validation: the mean of the per-fold means, only with all five folds
            if sorted(info["folds"]) == list(ALL_FOLDS):
                fold_means = [_nanmean(case_means([r for r in rows if r["fold"] == f], trainer, metric).values())
                              for f in ALL_FOLDS]
                info[f"{metric}_cv_mean"] = _nanmean(fold_means)
        info["epoch_time_median_s"] = float(np.median(info["epoch_times"])) if info["epoch_times"] else math.nan
        if abl.repeats > 1:
            per_repeat = repeat_case_means(abl, trainer)
            info["Dice_repeat_means"] = {k: _nanmean(v.values()) for k, v in per_repeat.items()}
            info["Dice_repeat_mean"], info["Dice_repeat_sd"] = mean_sd(list(info["Dice_repeat_means"].values()))
    abl.stats = []
    abl.repeat_stats = []
    if abl.baseline is None or not abl.trainers.get(abl.baseline, {}).get("folds"):
        abl.notes.append("no baseline results (stock nnUNetTrainer / nnUNetTrainerStockBudget): no Wilcoxon tests")
        return
    if abl.repeats > 1:
        base = _by_case(repeat_case_means(abl, abl.baseline))
        for trainer in abl.trainers:
            if trainer != abl.baseline and abl.trainers[trainer]["folds"]:
                test = repeat_bootstrap(_by_case(repeat_case_means(abl, trainer)), base)
                abl.repeat_stats.append({"trainer": trainer, "baseline": abl.baseline, "metric": "Dice", **test})
    for trainer in abl.trainers:
        if trainer == abl.baseline or not abl.trainers[trainer]["folds"]:
            continue
        for metric in ("Dice", "HD95", "NSD"):
            for cls in [None] + classes:
                test = paired_wilcoxon(case_means(abl.rows, trainer, metric, cls),
                                       case_means(abl.rows, abl.baseline, metric, cls))
                abl.stats.append({"trainer": trainer, "baseline": abl.baseline, "metric": metric,
                                  "class": "mean" if cls is None else cls, **test})


def repeat_case_means(abl: Ablation, trainer: str, metric: str = "Dice") -> Dict[int, Dict[str, float]]:
    """repeat -> case -> metric (mean over classes), for the repeats with every requested fold validated."""
    complete = [k for k, r in abl.trainers[trainer].get("repeats", {}).items() if r["complete"]]
    return {k: case_means([r for r in abl.rows if r.get("repeat", 0) == k], trainer, metric) for k in complete}


def _by_case(per_repeat: Dict[int, Dict[str, float]]) -> Dict[str, List[float]]:
    """case -> one value per repeat (cases present in every repeat)."""
    if not per_repeat:
        return {}
    cases = set.intersection(*(set(v) for v in per_repeat.values()))
    return {c: [per_repeat[k][c] for k in sorted(per_repeat)] for c in cases}
