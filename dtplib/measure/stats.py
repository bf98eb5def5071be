"""Confidence intervals by the bootstrap over test items (images), for one model or a paired comparison of two.

A metric here is the mean of a per-item score (1 if image i's caption is in its top k, 1 if its class is the top-1,
the share of its boundaries on object outlines, ...). `bootstrap_ci` resamples the items with replacement and
takes the percentile interval of the resampled means; `paired_ci` does the same for the difference of two models
scored on the same items, resampling the items once for both, so that what the items share cancels.
With `weights` the metric is the weighted mean (a ratio of sums: text-to-image recall over the texts, with the
images, each carrying its captions, as the items resampled). The resampling is SciPy's (`scipy.stats.bootstrap`,
percentile method, items drawn in batches of 256 from `numpy.random.default_rng(seed)`).

Over a few independent runs (seeds) the interval is Student's t, with SciPy's quantile (`t_interval`).
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


def _weighted_mean(scores: np.ndarray, weights: np.ndarray, axis: int = -1) -> np.ndarray:
    return (scores * weights).sum(axis=axis) / weights.sum(axis=axis)


def _percentile_interval(scores: np.ndarray, weights: np.ndarray | None, resamples: int, level: float,
                         seed: int) -> tuple[float, float]:
    """The percentile interval of the (weighted) mean over `resamples` resamples of the items, with and without
    weights the same draws (scores and weights resampled as pairs). One item: no spread, [score, score]."""
    if len(scores) == 1:
        return float(scores[0]), float(scores[0])
    samples, statistic = ((scores,), np.mean) if weights is None else ((scores, weights), _weighted_mean)
    from scipy import stats as scipy_stats  # here, not at import: every training process imports this module

    result = scipy_stats.bootstrap(samples, statistic, n_resamples=resamples, batch=256, method="percentile",
                                   confidence_level=level, paired=True, vectorized=True,
                                   rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


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
    low, high = _percentile_interval(scores, weights, resamples, level, seed)
    value = scores.mean() if weights is None else _weighted_mean(scores, weights)
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
def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided Student-t quantile, t((1 + level) / 2, df) (scipy.stats.t.ppf); nan below 1 degree of freedom."""
    from scipy import stats as scipy_stats

    return float(scipy_stats.t.ppf((1 + level) / 2, df)) if df >= 1 else float("nan")


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
