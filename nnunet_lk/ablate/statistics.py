"""Paired statistics against the baseline (scipy's Wilcoxon signed-rank test) and per-case means."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

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
