"""Seed statistics: means, t confidence intervals, paired comparisons."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t interval ``(mean, low, high)``.

    With fewer than two values the interval is undefined and returned as NaN.
    """
    values = np.asarray(values, dtype=float)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * stats.sem(values)
    return mean, mean - half, mean + half


def paired_summary(
    learned, baseline, *, lower_is_better: bool, confidence: float = 0.95
) -> dict:
    """Compares paired per-seed values of two methods.

    Returns the mean and interval of ``learned - baseline``, the number of
    pairs where the learned loss is better, and the two-sided p-value of a
    paired t-test (NaN with fewer than two pairs or zero variance).
    """
    learned = np.asarray(learned, dtype=float)
    baseline = np.asarray(baseline, dtype=float)
    if learned.shape != baseline.shape:
        raise ValueError(
            f"paired values need equal shapes, got {learned.shape} and {baseline.shape}"
        )
    diff = learned - baseline
    mean, low, high = mean_ci(diff, confidence)
    wins = int((diff < 0).sum() if lower_is_better else (diff > 0).sum())
    p_value = math.nan
    if len(diff) >= 2 and np.std(diff) > 0:
        p_value = float(stats.ttest_rel(learned, baseline).pvalue)
    return {
        "diff_mean": mean,
        "diff_low": low,
        "diff_high": high,
        "wins": wins,
        "n_pairs": len(diff),
        "p_value": p_value,
    }
