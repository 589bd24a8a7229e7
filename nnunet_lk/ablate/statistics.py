"""Paired statistics against the baseline: scipy's Wilcoxon signed-rank test on per-case values (with repeats:
each case's mean over them), and a bootstrap over cases and repeats together, which also carries the spread
between trainings; per-case means."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np


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


def repeat_bootstrap(candidate: Dict[str, Sequence[float]], baseline: Dict[str, Sequence[float]],
                     resamples: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """The mean over cases of (candidate's mean over its repeats - baseline's mean over its repeats), with a
    two-level bootstrap: each resample draws the cases with replacement, and for each side its repeats with
    replacement (the two sides' repeats are separate trainings: not paired). Percentile interval at ``level``;
    two-sided p = twice the smaller tail of the resampled differences at 0. ``candidate``/``baseline``: case ->
    one value per repeat (the same repeats, in the same order, for every case of a side; a case needs a finite
    value in every repeat of both sides to count). With one repeat per side this is the percentile bootstrap of
    the paired per-case differences."""
    cases = sorted(c for c in candidate if c in baseline and np.all(np.isfinite(candidate[c]))
                   and np.all(np.isfinite(baseline[c])))
    result = {"n": len(cases), "repeats": 0, "baseline_repeats": 0, "mean_difference": math.nan,
              "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "resamples": resamples}
    if not cases:
        return result
    a = np.array([list(candidate[c]) for c in cases], dtype=float)   # cases x candidate repeats
    b = np.array([list(baseline[c]) for c in cases], dtype=float)    # cases x baseline repeats
    n, ra, rb = len(cases), a.shape[1], b.shape[1]
    observed = float(np.mean(a.mean(axis=1) - b.mean(axis=1)))
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for i in range(resamples):
        rows = rng.integers(0, n, n)
        stats[i] = (a[rows][:, rng.integers(0, ra, ra)].mean() - b[rows][:, rng.integers(0, rb, rb)].mean())
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    tail = min(np.mean(stats <= 0.0), np.mean(stats >= 0.0))
    result.update(repeats=ra, baseline_repeats=rb, mean_difference=observed, ci_low=float(low), ci_high=float(high),
                  p_value=float(min(1.0, 2.0 * tail)))
    return result


def mean_sd(values: Sequence[float]) -> tuple:
    """(mean, sample sd) of the finite values; sd is nan with fewer than two."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
