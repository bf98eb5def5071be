"""Confidence intervals by the bootstrap over test items (images), for one model or a paired comparison of two.

A metric here is the mean of a per-item score (1 if image i's caption is in its top k, 1 if its class is the top-1,
the share of its boundaries on object outlines, ...). `bootstrap_ci` resamples the items with replacement and
takes the percentile interval of the resampled means; `paired_ci` does the same for the difference of two models
scored on the same items, resampling the items once for both, so that what the items share cancels.
With `weights` the metric is the weighted mean (a ratio of sums: text-to-image recall over the texts, with the
images, each carrying its captions, as the items resampled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate (the mean over items) and its bootstrap percentile interval."""

    value: float
    low: float
    high: float
    level: float = 0.95
    items: int = 0

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _resampled_means(scores: np.ndarray, resamples: int, seed: int, weights: np.ndarray | None = None) -> np.ndarray:
    """(Weighted) means of `resamples` bootstrap resamples of the items (axis 0): resamples x ...; drawn in chunks."""
    rng = np.random.default_rng(seed)
    count = len(scores)
    means = []
    for start in range(0, resamples, 256):
        index = rng.integers(0, count, size=(min(256, resamples - start), count))  # chunk x items
        if weights is None:
            means.append(scores[index].mean(axis=1))
        else:
            means.append((scores[index] * weights[index]).sum(axis=1) / weights[index].sum(axis=1))
    return np.concatenate(means)


def _weights(weights, count: int) -> np.ndarray | None:
    if weights is None:
        return None
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(weights) != count or (weights <= 0).any():
        raise ValueError(f"need one positive weight per item: {len(weights)} weights for {count} items")
    return weights


def bootstrap_ci(scores, resamples: int = 1000, level: float = 0.95, seed: int = 0, *, weights=None) -> Interval:
    """Mean of per-item scores with its bootstrap percentile interval (items resampled with replacement).

    `weights` (positive, one per item): the weighted mean sum(w s) / sum(w), each resample's likewise."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) == 0:
        raise ValueError("a confidence interval needs at least one scored item")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    weights = _weights(weights, len(scores))
    means = _resampled_means(scores, resamples, seed, weights)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    value = scores.mean() if weights is None else (scores * weights).sum() / weights.sum()
    return Interval(float(value), float(low), float(high), level, len(scores))


def paired_ci(scores_a, scores_b, resamples: int = 1000, level: float = 0.95, seed: int = 0, *,
              weights=None) -> Interval:
    """Mean of (a - b) over the same items, with the interval of a bootstrap that resamples items for both."""
    a = np.asarray(scores_a, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same items: {a.shape[0]} scores against {b.shape[0]}")
    return bootstrap_ci(a - b, resamples, level, seed, weights=weights)


# Intervals over a few independent runs (seeds): Student's t
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    """t(0.975, df): the two-sided 95% Student-t quantile."""
    if df < 1:
        return float("nan")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def t_interval(values) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite values: mean +- t(0.975, n-1) sd / sqrt(n); one value: no interval."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(values.mean())
    if n == 1:
        return mean, float("nan"), float("nan"), 1
    half = t_quantile(n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n
