"""``nnunet-lk ablate``: finished nnU-Net trainings of one dataset and configuration, compared across
trainers (stock nnU-Net included) and folds (issue 6).

Read from ``$nnUNet_results/DatasetXXX/TRAINER__PLANS__CFG/fold_F/``:
- Dice per case and class from nnU-Net's own ``validation/summary.json``;
- HD95 and normalised surface Dice (NSD) computed here with MONAI from the validation predictions
  against ``$nnUNet_preprocessed/DatasetXXX/gt_segmentations``, both read with the plans' image
  reader (so in nnU-Net's axis order with its spacing: distances are physical, e.g. mm);
- epoch times and training curves from nnU-Net's ``training_log_*.txt`` (a resumed fold has several
  logs; later ones win per epoch), falling back to the checkpoint's ``logging`` dict;
- params, MACs and eval-mode latency per patch of the network built from the results folder's plans.

Each trainer is compared with the baseline (stock nnU-Net) case by case with a paired Wilcoxon
signed-rank test (scipy), reporting the number of paired cases. ``--run`` first trains the missing
(trainer, fold) pairs through ``nnUNetv2_train``.

Conventions [ASSUMED, stated in every report]: a class absent from both prediction and reference
has no HD95/NSD (NaN, left out of means, as nnU-Net does for Dice); a class present in only one of them
gets HD95 = the image's physical diagonal (the worst possible distance, so a miss is penalised rather
than dropped) and NSD = 0.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .bench import STOCK_BUDGET_TRAINER, STOCK_TRAINER, STOCK_TRAINERS, dataset_name, default_trainers, \
    resolve_trainer

ALL_FOLDS = (0, 1, 2, 3, 4)
EPOCH_LINE = re.compile(r": Epoch (\d+)\s*$")
EPOCH_TIME = re.compile(r"Epoch time: ([0-9.eE+-]+) s")
TRAIN_LOSS = re.compile(r"train_loss (-?[0-9.eE+-]+|nan)")
VAL_LOSS = re.compile(r"val_loss (-?[0-9.eE+-]+|nan)")
PSEUDO_DICE = re.compile(r"Pseudo dice \[(.*)\]")


# ---- locating results -----------------------------------------------------------------------------------
@dataclass
class FoldRun:
    trainer: str
    fold: int
    path: Path

    @property
    def complete(self) -> bool:
        return (self.path / "checkpoint_final.pth").is_file()

    @property
    def validated(self) -> bool:
        return (self.path / "validation" / "summary.json").is_file()

    @property
    def resumable(self) -> bool:
        return any((self.path / f).is_file() for f in ("checkpoint_latest.pth", "checkpoint_best.pth"))


def model_folder(results_root, dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    return Path(results_root) / dataset / f"{trainer}__{plans}__{configuration}"


def discover_trainers(results_root, dataset: str, plans: str, configuration: str) -> List[str]:
    folder = Path(results_root) / dataset
    suffix = f"__{plans}__{configuration}"
    if not folder.is_dir():
        return []
    return sorted(p.name[:-len(suffix)] for p in folder.iterdir() if p.is_dir() and p.name.endswith(suffix))


def default_baseline(trainers: Sequence[str]) -> Optional[str]:
    for name in (STOCK_TRAINER, STOCK_BUDGET_TRAINER):
        if name in trainers:
            return name
    return None


# ---- metrics --------------------------------------------------------------------------------------------
def label_names(dataset_json: dict) -> Dict[str, str]:
    """summary.json class key ("1", "(1, 2)") -> name from dataset.json's labels."""
    names = {}
    for name, value in dataset_json.get("labels", {}).items():
        if isinstance(value, (list, tuple)):
            key = str(tuple(int(v) for v in value)) if len(value) > 1 else str(int(value[0]))
        else:
            key = str(int(value))
        names[key] = name
    return names


def read_validation_summary(fold: FoldRun, file_ending: str) -> Dict[str, Dict[str, float]]:
    """case -> {class key: Dice} from nnU-Net's fold_F/validation/summary.json."""
    summary = json.loads((fold.path / "validation" / "summary.json").read_text())
    per_case = {}
    for entry in summary["metric_per_case"]:
        case = os.path.basename(entry["prediction_file"])
        case = case[:-len(file_ending)] if case.endswith(file_ending) else case
        per_case[case] = {str(k): _float(v.get("Dice")) for k, v in entry["metrics"].items()}
    return per_case


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _class_masks(seg: np.ndarray, key: str) -> np.ndarray:
    if key.startswith("("):
        labels = [int(v) for v in key.strip("()").split(",") if v.strip()]
        return np.isin(seg, labels)
    return seg == int(key)


def surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], class_keys: Sequence[str],
                    nsd_tolerance: float) -> Dict[str, Dict[str, float]]:
    """{class key: {"HD95": mm, "NSD": fraction}} with MONAI, in physical spacing. Arrays in nnU-Net's
    reader layout (1, *spatial) or (*spatial); axes of length 1 (2D images stored as 3D) are dropped."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {ref.shape}")
    spacing = [float(s) for s in spacing]
    if pred.ndim == len(spacing) + 1:
        pred, ref = pred[0], ref[0]
    keep = [a for a, n in enumerate(pred.shape) if n > 1]
    pred, ref = pred.squeeze(), ref.squeeze()
    spacing = [spacing[a] for a in keep]
    if pred.ndim not in (2, 3):
        raise ValueError(f"surface metrics need 2D or 3D images, got shape {pred.shape}")
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))))
    out = {}
    for key in class_keys:
        p, r = _class_masks(pred, key), _class_masks(ref, key)
        if not p.any() and not r.any():
            out[key] = {"HD95": math.nan, "NSD": math.nan}
            continue
        if not p.any() or not r.any():
            out[key] = {"HD95": diagonal, "NSD": 0.0}
            continue
        pt = torch.from_numpy(p)[None, None].float()
        rt = torch.from_numpy(r)[None, None].float()
        hd = compute_hausdorff_distance(pt, rt, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(pt, rt, class_thresholds=[nsd_tolerance], include_background=True,
                                   spacing=spacing)
        out[key] = {"HD95": float(hd.item()), "NSD": float(nsd.item())}
    return out


def fold_case_metrics(fold: FoldRun, plans: dict, dataset_json: dict, gt_folder: Path, nsd_tolerance: float,
                      log=print) -> List[dict]:
    """One row per (case, class): Dice from nnU-Net's summary, HD95/NSD from the prediction files."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    file_ending = dataset_json["file_ending"]
    dice = read_validation_summary(fold, file_ending)
    reader = PlansManager(plans).image_reader_writer_class()
    rows = []
    for case, per_class in sorted(dice.items()):
        keys = [k for k in per_class if k not in ("0", "background")]
        pred_file = fold.path / "validation" / f"{case}{file_ending}"
        ref_file = gt_folder / f"{case}{file_ending}"
        surface = {}
        if pred_file.is_file() and ref_file.is_file():
            pred, _ = reader.read_seg(str(pred_file))
            ref, props = reader.read_seg(str(ref_file))
            surface = surface_metrics(pred, ref, props["spacing"], keys, nsd_tolerance)
        else:
            log(f"  warning: {fold.trainer} fold {fold.fold} {case}: "
                f"{pred_file if not pred_file.is_file() else ref_file} missing; no HD95/NSD for this case")
        for key in keys:
            rows.append({"trainer": fold.trainer, "fold": fold.fold, "case": case, "class": key,
                         "Dice": per_class[key], "HD95": surface.get(key, {}).get("HD95", math.nan),
                         "NSD": surface.get(key, {}).get("NSD", math.nan)})
    return rows


# ---- training logs --------------------------------------------------------------------------------------
def parse_training_logs(fold_path: Path) -> Dict[int, dict]:
    """epoch -> {epoch_time, train_loss, val_loss, pseudo_dice} from nnU-Net's logs (later logs win)."""
    epochs: Dict[int, dict] = {}
    for log in sorted(Path(fold_path).glob("training_log_*.txt")):
        current = None
        for line in log.read_text(errors="replace").splitlines():
            m = EPOCH_LINE.search(line)
            if m:
                current = int(m.group(1))
                epochs[current] = {}
                continue
            if current is None:
                continue
            for name, pattern in (("epoch_time", EPOCH_TIME), ("train_loss", TRAIN_LOSS), ("val_loss", VAL_LOSS)):
                m = pattern.search(line)
                if m:
                    epochs[current][name] = _float(m.group(1))
            m = PSEUDO_DICE.search(line)
            if m:
                values = [_float(v.strip().replace("np.float32(", "").replace("np.float64(", "").rstrip(")"))
                          for v in m.group(1).split(",") if v.strip()]
                epochs[current]["pseudo_dice"] = float(np.nanmean(values)) if values else math.nan
    return {e: v for e, v in epochs.items() if v}


def checkpoint_curves(fold_path: Path) -> Dict[int, dict]:
    """The same from the checkpoint's 'logging' dict, for folds whose logs are gone."""
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        f = Path(fold_path) / name
        if f.is_file():
            import torch
            try:
                logging = torch.load(f, map_location="cpu", weights_only=False).get("logging", {})
            except Exception:
                continue
            n = len(logging.get("train_losses", []))
            out = {}
            for e in range(n):
                entry = {"train_loss": _float(logging["train_losses"][e])}
                for key, src in (("val_loss", "val_losses"), ("pseudo_dice", "mean_fg_dice")):
                    if e < len(logging.get(src, [])):
                        entry[key] = _float(logging[src][e])
                starts, ends = logging.get("epoch_start_timestamps", []), logging.get("epoch_end_timestamps", [])
                if e < len(starts) and e < len(ends):
                    entry["epoch_time"] = float(ends[e] - starts[e])
                out[e] = entry
            return out
    return {}


# ---- statistics -----------------------------------------------------------------------------------------
def paired_wilcoxon(candidate: Dict[str, float], baseline: Dict[str, float]) -> dict:
    """Two-sided paired Wilcoxon signed-rank test over the cases both have a finite value for."""
    from scipy.stats import wilcoxon
    cases = sorted(c for c in candidate if c in baseline and np.isfinite(candidate[c]) and np.isfinite(baseline[c]))
    a = np.array([candidate[c] for c in cases])
    b = np.array([baseline[c] for c in cases])
    result = {"n": len(cases), "median_difference": float(np.median(a - b)) if cases else math.nan,
              "mean_difference": float(np.mean(a - b)) if cases else math.nan,
              "statistic": math.nan, "p_value": math.nan}
    if not cases:
        return result
    if np.all(a == b):
        result.update(statistic=0.0, p_value=1.0)
        return result
    test = wilcoxon(a, b, alternative="two-sided")
    result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
    return result


# ---- the collection -------------------------------------------------------------------------------------
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


def case_means(rows: List[dict], trainer: str, metric: str, cls: Optional[str] = None) -> Dict[str, float]:
    """case -> metric (one class, or the mean over classes with a finite value)."""
    values: Dict[str, List[float]] = {}
    for r in rows:
        if r["trainer"] == trainer and (cls is None or r["class"] == cls):
            values.setdefault(r["case"], []).append(r[metric])
    return {c: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for c, v in values.items()}


def _nanmean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def network_figures(trainer: str, model_dir: Path, configuration: str, latency_repeats: int) -> dict:
    """Params, MACs and eval-mode latency per patch (batch 1, CPU) of the net built from the results' plans."""
    import statistics as st

    import torch

    from .analysis import count_macs
    from .bench import plans_context
    from .networks.unet import count_parameters
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
        raise ValueError(f"no results for {name} {configuration} (plans {plans}) under {results_root}: train first "
                         f"(nnUNetv2_train, or nnunet-lk ablate --run)")
    baseline = baseline or default_baseline(trainers)
    if baseline is not None and baseline not in trainers:
        trainers = [baseline] + trainers
    gt_folder = Path(preprocessed_root) / name / "gt_segmentations"
    if not gt_folder.is_dir():
        raise ValueError(f"{gt_folder} does not exist: the ground truth comes from nnUNetv2_plan_and_preprocess")
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


# ---- outputs --------------------------------------------------------------------------------------------
def _fmt(v, digits=4) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _cls_name(abl: Ablation, key: str) -> str:
    return abl.class_names.get(key, key)


def write_csvs(abl: Ablation, out: Path) -> Dict[str, Path]:
    paths = {"cases": out / "ablate_cases.csv", "summary": out / "ablate_summary.csv", "wilcoxon": out / "ablate_wilcoxon.csv"}
    with open(paths["cases"], "w", newline="") as f:
        w = csv.DictWriter(f, ["trainer", "fold", "case", "class", "class_name", "Dice", "HD95", "NSD"])
        w.writeheader()
        for r in abl.rows:
            w.writerow({**r, "class_name": _cls_name(abl, r["class"])})
    classes = sorted({r["class"] for r in abl.rows}, key=lambda k: (len(k), k))
    fields = ["trainer", "folds", "n_cases", "Dice_mean", "HD95_mean", "NSD_mean", "Dice_cv_mean", "HD95_cv_mean",
              "NSD_cv_mean"] + [f"{m}_{_cls_name(abl, c)}" for m in ("Dice", "HD95", "NSD") for c in classes] + \
             ["params", "params_without_ds_heads", "macs", "latency_ms", "epoch_time_median_s", "epochs"]
    with open(paths["summary"], "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for trainer, info in abl.trainers.items():
            row = {"trainer": trainer, "folds": " ".join(map(str, info["folds"]))}
            for k in fields[2:]:
                if k in info:
                    row[k] = info[k]
            for m in ("Dice", "HD95", "NSD"):
                for c in classes:
                    row[f"{m}_{_cls_name(abl, c)}"] = info.get(m, {}).get(c)
            w.writerow(row)
    with open(paths["wilcoxon"], "w", newline="") as f:
        w = csv.DictWriter(f, ["trainer", "baseline", "metric", "class", "n", "median_difference", "mean_difference",
                               "statistic", "p_value"])
        w.writeheader()
        for s in abl.stats:
            w.writerow({**s, "class": _cls_name(abl, s["class"])})
    return paths


def markdown_report(abl: Ablation, plots: Dict[str, Path]) -> str:
    classes = sorted({r["class"] for r in abl.rows}, key=lambda k: (len(k), k))
    lines = [f"# nnunet-lk ablate: {abl.dataset} {abl.configuration} ({abl.plans})", "",
             f"Baseline: {abl.baseline or 'none'}. Dice from nnU-Net's validation summaries; HD95 (physical units) "
             f"and normalised surface Dice (tolerance {abl.nsd_tolerance:g}) computed with MONAI from the validation "
             f"predictions against gt_segmentations. Means are over cases (per case: mean over classes present). "
             f"A class missing from both prediction and reference is left out; missing from one of them: HD95 = the "
             f"image diagonal, NSD = 0. Latency: eval-mode forward of one patch, batch 1, CPU, in this process.", ""]
    header = ["trainer", "folds", "cases", "Dice", "HD95", "NSD"] + \
             [f"Dice {_cls_name(abl, c)}" for c in classes] + [f"HD95 {_cls_name(abl, c)}" for c in classes] + \
             ["params", "GMACs", "latency ms", "epoch s", "epochs"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cv = any("Dice_cv_mean" in i for i in abl.trainers.values())
    for trainer, info in abl.trainers.items():
        cells = [trainer + (" (baseline)" if trainer == abl.baseline else ""),
                 " ".join(map(str, info["folds"])) or "–", str(info.get("n_cases", 0)),
                 _fmt(info.get("Dice_mean")), _fmt(info.get("HD95_mean"), 2), _fmt(info.get("NSD_mean"))]
        cells += [_fmt(info.get("Dice", {}).get(c)) for c in classes]
        cells += [_fmt(info.get("HD95", {}).get(c), 2) for c in classes]
        cells += [f"{info['params'] / 1e6:.3f} M" if "params" in info else "–",
                  _fmt(info["macs"] / 1e9, 3) if "macs" in info else "–", _fmt(info.get("latency_ms"), 1),
                  _fmt(info.get("epoch_time_median_s"), 1), str(info.get("epochs", "–"))]
        lines.append("| " + " | ".join(cells) + " |")
    if cv:
        lines += ["", "## Cross-validation (all 5 folds: mean of the fold means)", "",
                  "| trainer | Dice | HD95 | NSD |", "|---|---|---|---|"]
        for trainer, info in abl.trainers.items():
            if "Dice_cv_mean" in info:
                lines.append(f"| {trainer} | {_fmt(info['Dice_cv_mean'])} | {_fmt(info['HD95_cv_mean'], 2)} | "
                             f"{_fmt(info['NSD_cv_mean'])} |")
    if abl.stats:
        lines += ["", f"## Paired Wilcoxon signed-rank tests against {abl.baseline} (two-sided, per case)", "",
                  "Difference = trainer − baseline (Dice/NSD: higher is better; HD95: lower is better). "
                  "n = paired cases; with few cases no p-value can be small.", "",
                  "| trainer | metric | class | n | median diff | mean diff | W | p |", "|---|---|---|---|---|---|---|---|"]
        for s in abl.stats:
            lines.append(f"| {s['trainer']} | {s['metric']} | {_cls_name(abl, s['class'])} | {s['n']} | "
                         f"{_fmt(s['median_difference'])} | {_fmt(s['mean_difference'])} | {_fmt(s['statistic'], 1)} | "
                         f"{_fmt(s['p_value'])} |")
    missing = {t: i for t, i in abl.trainers.items() if i["missing_folds"] or i["incomplete_folds"]}
    if missing:
        lines += ["", "## Missing", ""]
        for t, i in missing.items():
            lines.append(f"- {t}: folds without results {i['missing_folds']}, started but not validated "
                         f"{i['incomplete_folds']} (`nnunet-lk ablate --run` trains/resumes them)")
    if abl.find_best:
        lines += ["", "## nnUNetv2_find_best_configuration", "", f"`{abl.find_best['command']}` → exit "
                  f"{abl.find_best['returncode']}", "", "```", abl.find_best["output"].strip()[-4000:], "```"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}]({p.name})" for k, p in plots.items()]
    if abl.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in abl.notes]
    return "\n".join(lines) + "\n"


def write_plots(abl: Ablation, out: Path) -> Dict[str, Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    trainers = [t for t, i in abl.trainers.items() if i["folds"]]
    classes = sorted({r["class"] for r in abl.rows}, key=lambda k: (len(k), k))
    short = {t: t.replace("nnUNetTrainer", "") or "nnUNetTrainer" for t in trainers}
    for metric in ("Dice", "HD95", "NSD"):
        fig, axes = plt.subplots(1, max(len(classes), 1), figsize=(max(4, 1.2 * len(trainers)) * max(len(classes), 1), 4),
                                 squeeze=False)
        for ax, cls in zip(axes[0], classes):
            data = [[v for v in case_means(abl.rows, t, metric, cls).values() if np.isfinite(v)] for t in trainers]
            ax.boxplot([d if d else [math.nan] for d in data], tick_labels=[short[t] for t in trainers])
            ax.set_title(f"{metric}: {_cls_name(abl, cls)}")
            ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        plots[f"box_{metric}"] = out / f"ablate_box_{metric.lower()}.png"
        fig.savefig(plots[f"box_{metric}"], dpi=100)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "params", "parameters (M)"), (axes[1], "latency_ms", "latency per patch (ms)")):
        points = [(abl.trainers[t][key] / (1e6 if key == "params" else 1), abl.trainers[t]["Dice_mean"], t)
                  for t in trainers if key in abl.trainers[t] and np.isfinite(abl.trainers[t]["Dice_mean"])]
        for x, y, t in points:
            ax.scatter(x, y, marker="*" if t == abl.baseline else "o", s=80)
            ax.annotate(short[t], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = _pareto_front([(x, y) for x, y, _ in points])
        if len(front) > 1:
            ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto front")
            ax.legend(loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("mean Dice")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{abl.dataset} {abl.configuration}: Dice vs size and speed")
    fig.tight_layout()
    plots["pareto"] = out / "ablate_pareto.png"
    fig.savefig(plots["pareto"], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for t in trainers:
        for f, curves in sorted(abl.trainers[t]["curves"].items()):
            epochs = sorted(curves)
            for ax, key in zip(axes, ("train_loss", "val_loss", "pseudo_dice")):
                xs = [e for e in epochs if key in curves[e]]
                if xs:
                    ax.plot(xs, [curves[e][key] for e in xs], label=f"{short[t]} f{f}", lw=1)
    for ax, key in zip(axes, ("train loss", "validation loss", "pseudo Dice (nnU-Net, per epoch)")):
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    plots["curves"] = out / "ablate_training_curves.png"
    fig.savefig(plots["curves"], dpi=100)
    plt.close(fig)
    return plots


def _pareto_front(points):
    """Points not beaten by another with smaller-or-equal x and higher-or-equal y, sorted by x."""
    front = [p for p in points if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in points)]
    return sorted(front)


def write_outputs(abl: Ablation, out_dir, plots: bool = True) -> Dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_csvs(abl, out)
    plot_paths = write_plots(abl, out) if plots and abl.rows else {}
    paths.update(plot_paths)
    paths["markdown"] = out / "ablate_report.md"
    paths["markdown"].write_text(markdown_report(abl, plot_paths))
    paths["json"] = out / "ablate_results.json"
    record = {"dataset": abl.dataset, "configuration": abl.configuration, "plans": abl.plans, "baseline": abl.baseline,
              "nsd_tolerance": abl.nsd_tolerance, "class_names": abl.class_names,
              "trainers": {t: {k: v for k, v in i.items() if k != "curves"} for t, i in abl.trainers.items()},
              "wilcoxon": abl.stats, "find_best_configuration": abl.find_best, "notes": abl.notes}
    paths["json"].write_text(json.dumps(_json_safe(record), indent=2) + "\n")
    return paths


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ---- training the missing folds and nnU-Net's model selection -------------------------------------------
def plan_runs(results_root, dataset: str, configuration: str, plans: str, trainers: Sequence[str],
              folds: Sequence[int]) -> List[dict]:
    """What ``--run`` must do per (trainer, fold): skip (validated), validate only, resume, or train."""
    name = dataset_name(dataset)
    todo = []
    for t in trainers:
        for f in folds:
            run = FoldRun(t, f, model_folder(results_root, name, t, plans, configuration) / f"fold_{f}")
            if run.complete and run.validated:
                continue
            action = "validate" if run.complete else "resume" if run.resumable else "train"
            todo.append({"trainer": t, "fold": f, "action": action, "path": run.path})
    return todo


def train_command(dataset: str, configuration: str, fold: int, trainer: str, plans: str, device: str,
                  action: str) -> List[str]:
    cmd = [_cli("nnUNetv2_train"), str(dataset), configuration, str(fold), "-tr", trainer, "-p", plans,
           "-device", device, "--npz"]
    if action == "resume":
        cmd.append("--c")
    elif action == "validate":
        cmd.append("--val")
    return cmd


def _cli(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


def check_trainers_findable(trainers: Sequence[str]) -> None:
    """nnUNetv2_train looks trainers up itself: fail before hours of training if it cannot find one."""
    import contextlib
    import io

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    for t in trainers:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                recursive_find_trainer_class_by_name(t)
        except RuntimeError:
            hint = (" It lives in nnunet_lk/training/stock.py and must be re-exported by trainers/ "
                    "(nnunet_lk_ext) for nnU-Net to find it." if t == STOCK_BUDGET_TRAINER else "")
            raise ValueError(f"nnUNetv2_train cannot find trainer {t!r} (nnUNet_extTrainer="
                             f"{os.environ.get('nnUNet_extTrainer', '')!r}); run `nnunet-lk doctor`.{hint}") from None


def run_missing(dataset: str, configuration: str, plans: str, trainers: Sequence[str], folds: Sequence[int], *,
                epochs: Optional[int], iterations: Optional[int], val_iterations: Optional[int], device: str,
                results_root, log=print, log_dir: Optional[Path] = None) -> List[dict]:
    """Train/resume/validate the missing (trainer, fold) pairs one after the other with nnUNetv2_train.
    A failed pair is reported and the next one runs; returns one record per pair."""
    todo = plan_runs(results_root, dataset, configuration, plans, trainers, folds)
    if not todo:
        log("--run: every (trainer, fold) pair is already trained and validated")
        return []
    check_trainers_findable(sorted({t["trainer"] for t in todo}))
    if STOCK_TRAINER in {t["trainer"] for t in todo} and (epochs or iterations):
        log(f"warning: {STOCK_TRAINER} ignores --epochs/--iterations and trains nnU-Net's full schedule; for the "
            f"same budget use {STOCK_BUDGET_TRAINER}")
    env = dict(os.environ)
    for var, value in (("NNUNET_LK_EPOCHS", epochs), ("NNUNET_LK_ITERATIONS", iterations),
                       ("NNUNET_LK_VAL_ITERATIONS", val_iterations)):
        if value is not None:
            env[var] = str(value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    done = []
    for i, item in enumerate(todo, 1):
        cmd = train_command(dataset, configuration, item["fold"], item["trainer"], plans, device, item["action"])
        log(f"[{i}/{len(todo)}] {item['action']} {item['trainer']} fold {item['fold']}: {' '.join(cmd)}")
        start = time.time()
        log_file = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            log_file = open(Path(log_dir) / f"run_{item['trainer']}_fold{item['fold']}.log", "a")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if log_file:
                log_file.write(line)
            # progress: nnU-Net's per-epoch lines and anything that looks like an error
            if re.search(r"Epoch \d+|Epoch time|Pseudo dice|Error|Traceback|mean Validation Dice", line):
                log(f"    {line.rstrip()}")
        rc = proc.wait()
        if log_file:
            log_file.close()
        item = {**item, "returncode": rc, "seconds": round(time.time() - start, 1), "path": str(item["path"])}
        log(f"    -> exit {rc} after {item['seconds']:.0f} s")
        done.append(item)
    return done


def find_best_configuration(dataset: str, configuration: str, plans: str, trainers: Sequence[str], results_root,
                            log=print) -> Optional[dict]:
    """nnUNetv2_find_best_configuration over the trainers with all five folds validated."""
    name = dataset_name(dataset)
    full = [t for t in trainers if all(FoldRun(t, f, model_folder(results_root, name, t, plans, configuration)
                                               / f"fold_{f}").validated for f in ALL_FOLDS)]
    if not full:
        return None
    npz = all(any((model_folder(results_root, name, t, plans, configuration) / f"fold_{f}" / "validation").glob("*.npz"))
              for t in full for f in ALL_FOLDS)
    cmd = [_cli("nnUNetv2_find_best_configuration"), str(dataset), "-c", configuration, "-tr", *full, "-p", plans]
    if not npz:
        cmd.append("--disable_ensembling")  # ensembling needs the softmax .npz files (train with --npz)
    log(f"running {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)), "trainers": full,
            "returncode": proc.returncode, "output": proc.stdout[-6000:] + proc.stderr[-2000:]}


def default_run_trainers() -> List[str]:
    """What ``--run`` trains without --trainers: stock nnU-Net on the same budget, then one trainer per backbone."""
    return [STOCK_BUDGET_TRAINER] + default_trainers()
