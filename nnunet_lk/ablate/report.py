"""What an ablation writes: per-case, summary and Wilcoxon CSVs, a markdown report, plots (box plots per
class, Dice against size and speed with the Pareto front, training curves) and a JSON record."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict

import numpy as np

from .collect import Ablation
from .statistics import case_means


def _fmt(v, digits=4) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def bootstrap_p(test: dict) -> str:
    """A bootstrap p-value as text: 0 means no resample crossed zero, i.e. below the smallest p the resamples can
    show (2 / resamples, two-sided)."""
    p = test.get("p_value")
    if p == 0.0 and test.get("resamples"):
        return f"< {2.0 / test['resamples']:.0e}"
    return _fmt(p)


def _cls_name(abl: Ablation, key: str) -> str:
    return abl.class_names.get(key, key)


def write_csvs(abl: Ablation, out: Path) -> Dict[str, Path]:
    paths = {"cases": out / "ablate_cases.csv", "summary": out / "ablate_summary.csv", "wilcoxon": out / "ablate_wilcoxon.csv"}
    repeat_column = ["repeat"] if abl.repeats > 1 else []
    with open(paths["cases"], "w", newline="") as f:
        w = csv.DictWriter(f, ["trainer", *repeat_column, "fold", "case", "class", "class_name", "Dice", "HD95", "NSD"],
                           extrasaction="ignore")
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
    if abl.repeats > 1:
        paths["repeats"] = out / "ablate_repeats.csv"
        with open(paths["repeats"], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["trainer", "repeat", "seed", "folds", "complete", "Dice_mean"])
            for trainer, info in abl.trainers.items():
                for k, r in sorted(info.get("repeats", {}).items()):
                    w.writerow([trainer, k, r["seed"], " ".join(map(str, r["folds"])), r["complete"],
                                info.get("Dice_repeat_means", {}).get(k)])
    return paths


def repeats_section(abl: Ablation) -> list:
    """Markdown lines: per trainer the mean Dice of each repeat, their mean ± sd, and the bootstrap over cases
    and repeats against the baseline."""
    tests = {s["trainer"]: s for s in abl.repeat_stats}
    lines = ["", f"## Repeats: {abl.repeats} trainings per (trainer, fold)", "",
             "Dice per repeat = mean over cases (per case: mean over classes) of the repeats with every fold "
             "validated. The Wilcoxon tests above pair each case's mean over repeats. Bootstrap: difference in mean "
             f"Dice against {abl.baseline}, cases and each side's repeats resampled (10,000 resamples), 95 % "
             "percentile interval and two-sided p.", "",
             "| trainer | repeats | seeds | Dice per repeat | mean ± sd | diff vs baseline [95 % CI] | p (bootstrap) |",
             "|---|---|---|---|---|---|---|"]
    for trainer, info in abl.trainers.items():
        done = {k: r for k, r in info.get("repeats", {}).items() if r["complete"]}
        means = info.get("Dice_repeat_means", {})
        test = tests.get(trainer)
        diff = (f"{test['mean_difference']:+.4f} [{test['ci_low']:+.4f}, {test['ci_high']:+.4f}]"
                if test and np.isfinite(test["mean_difference"]) else "–")
        lines.append(f"| {trainer}{' (baseline)' if trainer == abl.baseline else ''} | {len(done)} | "
                     f"{' '.join('–' if r['seed'] is None else str(r['seed']) for r in done.values()) or '–'} | "
                     f"{' '.join(_fmt(means.get(k)) for k in done) or '–'} | {_fmt(info.get('Dice_repeat_mean'))} ± "
                     f"{_fmt(info.get('Dice_repeat_sd'))} | {diff} | {bootstrap_p(test) if test else '–'} |")
    partial = [f"{t} repeat {k} (folds {r['folds']})" for t, i in abl.trainers.items()
               for k, r in i.get("repeats", {}).items() if not r["complete"]]
    if partial:
        lines += ["", "Left out of the repeat statistics (not every fold validated): " + "; ".join(partial) + "."]
    return lines


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
    if abl.repeats > 1:
        lines += repeats_section(abl)
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
    """One PNG each: a box plot per metric (one panel per class), Dice against size and speed, training curves."""
    trainers = [t for t, i in abl.trainers.items() if i["folds"]]
    short = {t: t.replace("nnUNetTrainer", "") or "nnUNetTrainer" for t in trainers}
    plots = {f"box_{metric}": _box_plot(abl, out, trainers, short, metric) for metric in ("Dice", "HD95", "NSD")}
    plots["pareto"] = _pareto_plot(abl, out, trainers, short)
    plots["curves"] = _curves_plot(abl, out, trainers, short)
    if abl.repeats > 1:
        plots["repeats"] = _repeats_plot(abl, out, trainers, short)
    return plots


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display on a cluster node)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _box_plot(abl: Ablation, out: Path, trainers, short, metric: str) -> Path:
    """Per-case means of one metric, a panel per class, a box per trainer."""
    classes = sorted({r["class"] for r in abl.rows}, key=lambda k: (len(k), k))
    fig, axes = _pyplot().subplots(1, max(len(classes), 1),
                                   figsize=(max(4, 1.2 * len(trainers)) * max(len(classes), 1), 4), squeeze=False)
    for ax, cls in zip(axes[0], classes):
        data = [[v for v in case_means(abl.rows, t, metric, cls).values() if np.isfinite(v)] for t in trainers]
        ax.boxplot([d if d else [math.nan] for d in data], tick_labels=[short[t] for t in trainers])
        ax.set_title(f"{metric}: {_cls_name(abl, cls)}")
        ax.tick_params(axis="x", rotation=45)
    return _save(fig, out / f"ablate_box_{metric.lower()}.png")


def _pareto_plot(abl: Ablation, out: Path, trainers, short) -> Path:
    """Mean Dice against parameters and against latency, the baseline starred, with the Pareto front."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4.5))
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
    return _save(fig, out / "ablate_pareto.png")


def _curves_plot(abl: Ablation, out: Path, trainers, short) -> Path:
    """Training loss, validation loss and nnU-Net's pseudo Dice per epoch, a line per trainer and fold."""
    fig, axes = _pyplot().subplots(1, 3, figsize=(15, 4))
    for t in trainers:
        for f, curves in sorted(abl.trainers[t]["curves"].items(), key=lambda kv: str(kv[0])):
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
    return _save(fig, out / "ablate_training_curves.png")


def _repeats_plot(abl: Ablation, out: Path, trainers, short) -> Path:
    """The spread between trainings: each repeat's mean Dice as a point, their mean as a bar, per trainer."""
    fig, ax = _pyplot().subplots(figsize=(max(6.5, 1.3 * len(trainers)), 4.5))
    for x, t in enumerate(trainers):
        values = list(abl.trainers[t].get("Dice_repeat_means", {}).values())
        if values:
            ax.scatter([x] * len(values), values, s=30, zorder=3)
            ax.hlines(np.mean(values), x - 0.3, x + 0.3, colors="k", lw=1.5)
    ax.set_xticks(range(len(trainers)), [short[t] for t in trainers], rotation=45, ha="right")
    ax.set_ylabel("mean Dice of one training")
    ax.set_title(f"{abl.dataset} {abl.configuration}: each training's Dice (up to {abl.repeats} per trainer)",
                 fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "ablate_repeats.png")


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
    if abl.repeats > 1:
        record.update(repeats=abl.repeats, repeat_bootstrap=abl.repeat_stats)
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
