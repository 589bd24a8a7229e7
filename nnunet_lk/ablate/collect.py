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
from .metrics import fold_case_metrics
from .results import (ALL_FOLDS, FoldRun, checkpoint_curves, default_baseline, discover_trainers, label_names,
                      model_folder, parse_training_logs)
from .statistics import _nanmean, case_means, paired_wilcoxon


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
            nsd_tolerance: float = 1.0, latency_repeats: int = 5, log=print) -> Ablation:
    name = dataset_name(dataset)
    trainers = list(trainers) if trainers else discover_trainers(results_root, name, plans, configuration)
    if not trainers:
        raise UsageError(f"no results for {name} {configuration} (plans {plans}) under {results_root}: train first "
                         f"(nnUNetv2_train, or nnunet-lk ablate --run)")
    baseline = baseline or default_baseline(trainers)
    if baseline is not None and baseline not in trainers:
        trainers = [baseline] + trainers
    gt_folder = Path(preprocessed_root) / name / "gt_segmentations"
    if not gt_folder.is_dir():
        raise UsageError(f"{gt_folder} does not exist: the ground truth comes from nnUNetv2_plan_and_preprocess")
    abl = None
    for trainer in trainers:
        model_dir = model_folder(results_root, name, trainer, plans, configuration)
        info = {"folds": [], "incomplete_folds": [], "missing_folds": [], "epoch_times": [], "curves": {}}
        if not (model_dir / "plans.json").is_file():
            info["missing_folds"] = list(folds)
            log(f"{trainer}: no results folder ({model_dir})")
            if abl is None:
                abl = Ablation(name, configuration, plans, baseline, {}, nsd_tolerance)
            abl.trainers[trainer] = info
            continue
        plans_json = json.loads((model_dir / "plans.json").read_text())
        dataset_json = json.loads((model_dir / "dataset.json").read_text())
        if abl is None:
            abl = Ablation(name, configuration, plans, baseline, label_names(dataset_json), nsd_tolerance)
        abl.class_names = abl.class_names or label_names(dataset_json)
        for f in folds:
            run = FoldRun(trainer, f, model_dir / f"fold_{f}")
            if not run.validated:
                (info["incomplete_folds"] if run.path.is_dir() else info["missing_folds"]).append(f)
                continue
            log(f"{trainer} fold {f}: reading validation ({'final' if run.complete else 'NO checkpoint_final'})")
            abl.rows += fold_case_metrics(run, plans_json, dataset_json, gt_folder, nsd_tolerance, log=log)
            info["folds"].append(f)
            curves = parse_training_logs(run.path) or checkpoint_curves(run.path)
            info["curves"][f] = curves
            info["epoch_times"] += [c["epoch_time"] for c in curves.values() if "epoch_time" in c]
            info["epochs"] = max(info.get("epochs", 0), len(curves))
        try:
            info.update(network_figures(trainer, model_dir, configuration, latency_repeats))
        except Exception as e:  # a trainer whose class is gone can still be reported by its metrics
            abl.notes.append(f"{trainer}: params/MACs/latency not measured ({type(e).__name__}: {e})")
        abl.trainers[trainer] = info
    summarize(abl)
    return abl


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
    abl.stats = []
    if abl.baseline is None or not abl.trainers.get(abl.baseline, {}).get("folds"):
        abl.notes.append("no baseline results (stock nnUNetTrainer / nnUNetTrainerStockBudget): no Wilcoxon tests")
        return
    for trainer in abl.trainers:
        if trainer == abl.baseline or not abl.trainers[trainer]["folds"]:
            continue
        for metric in ("Dice", "HD95", "NSD"):
            for cls in [None] + classes:
                test = paired_wilcoxon(case_means(abl.rows, trainer, metric, cls),
                                       case_means(abl.rows, abl.baseline, metric, cls))
                abl.stats.append({"trainer": trainer, "baseline": abl.baseline, "metric": metric,
                                  "class": "mean" if cls is None else cls, **test})
