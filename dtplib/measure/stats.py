"""Confidence intervals by the bootstrap over test items (images), for one model or a paired comparison of two.

A metric here is the mean of a per-item score (1 if image i's caption is in its top k, 1 if its class is the top-1,
the share of its boundaries on object outlines, ...). `bootstrap_ci` resamples the items with replacement and
takes the percentile interval of the resampled means; `paired_ci` does the same for the difference of two models
scored on the same items, resampling the items once for both, so that what the items share cancels.
With `weights` the metric is the weighted mean (a ratio of sums: text-to-image recall over the texts, with the
images, each carrying its captions, as the items resampled). The resampling is SciPy's (`scipy.stats.bootstrap`,
percentile method, items drawn in batches of 256 from `numpy.random.default_rng(seed)`).

Over a few independent runs (seeds) the interval is Student's t, with SciPy's quantile (`t_interval`), and the
tests are SciPy's: a paired t-test (`paired_t_pvalue`), two one-sided tests for equivalence within a margin (`tost`),
Holm's step-down adjustment over a family of tests (`holm`). An interval of zero width (every difference the same,
e.g. two seeds that moved alike) says nothing about the spread: `degenerate` flags it, and it is never read as
excluding 0.

Over seeds and test items together, `hierarchical_ci` and `hierarchical_paired_ci`: a bootstrap that resamples the
runs (seeds) and the test items, both with replacement, so that the interval counts both sources of noise. The
items are the same test set for every run, so they are crossed with the seeds, not nested in them: each resample
draws one set of items and scores every chosen run on it (the "pigeonhole" bootstrap of a crossed design, Owen 2007;
it errs on the wide side). With items that score alike within each run it is the bootstrap over seeds; with runs
that score alike it is the bootstrap over items.
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


def _finite(values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)


def degenerate(values) -> bool:
    """Whether a t-interval over these values says nothing about their spread: fewer than two finite values, or all
    of them equal (to rounding: a spread below 1e-12 of their size), so that its width is 0."""
    values = _finite(values)
    return len(values) < 2 or float(np.ptp(values)) <= 1e-12 * max(1.0, float(np.abs(values).max()))


def paired_t_pvalue(differences) -> float:
    """Two-sided p-value of the paired t-test that the mean of the (seed-paired) differences is 0
    (`scipy.stats.ttest_1samp`); NaN where `degenerate` (no spread to test against)."""
    values = _finite(differences)
    if degenerate(values):
        return float("nan")
    from scipy import stats as scipy_stats

    return float(scipy_stats.ttest_1samp(values, 0.0).pvalue)


def tost(differences, margin: float, alpha: float = 0.05) -> tuple[float, bool]:
    """Two one-sided t-tests (Schuirmann 1987) that the mean of the paired differences lies within ±`margin`:
    (p-value, equivalent at `alpha`). The p-value is the larger of the two one-sided tests' (H0: mean <= -margin,
    H0: mean >= +margin); equivalent means p < alpha, the same as the (1 - 2 alpha) t-interval lying inside
    ±margin. Degenerate differences: (NaN, False)."""
    if not margin > 0:
        raise ValueError(f"an equivalence margin must be > 0, got {margin}")
    values = _finite(differences)
    if degenerate(values):
        return float("nan"), False
    from scipy import stats as scipy_stats

    above = scipy_stats.ttest_1samp(values, -margin, alternative="greater").pvalue
    below = scipy_stats.ttest_1samp(values, margin, alternative="less").pvalue
    p = float(max(above, below))
    return p, bool(p < alpha)


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the order given: the i-th smallest of m times (m - i + 1), made
    non-decreasing along that order (step-down), capped at 1. A NaN (an untestable contrast) stays NaN but still
    counts in m: a family is not made smaller by the contrasts that could not be tested."""
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    m, adjusted = len(p), np.full(len(p), np.nan)
    order = np.argsort(np.where(np.isnan(p), np.inf, p), kind="stable")  # NaN last
    running = 0.0
    for rank, index in enumerate(order):
        if np.isnan(p[index]):
            break
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


# The bootstrap over seeds and test items
def _as_components(scores, weights) -> tuple[np.ndarray, np.ndarray]:
    """(K x S x N scores, K x N weights): a runs x items table is one component; weights one per item (the same
    test set for every run), ones when None."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 2:
        scores = scores[None]
    if scores.ndim != 3 or 0 in scores.shape:
        raise ValueError(f"need scores as runs x items (or components x runs x items), got shape {scores.shape}")
    components, items = scores.shape[0], scores.shape[2]
    weights = np.ones(items) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.size not in (items, components * items) or (weights <= 0).any():
        raise ValueError(f"need one positive weight per item (per component): {weights.size} weights for "
                         f"{components} x {items}")
    weights = np.broadcast_to(weights.reshape(-1, items), (components, items))
    if not np.isfinite(scores).all():
        raise ValueError("per-item scores must be finite")
    return scores, weights


def _hierarchical_draws(tables: list[np.ndarray], weights: np.ndarray, resamples: int,
                        seed: int) -> list[np.ndarray]:
    """Each table's statistic (the mean over components of each component's weighted item mean, averaged over the
    chosen runs) on `resamples` draws, the same draws for every table: S runs and N items with replacement, one item
    draw shared by every chosen run (and every table: the runs of a paired contrast share the test set)."""
    components, runs, items = tables[0].shape
    rng = np.random.default_rng(seed)
    out = [np.empty(resamples) for _ in tables]
    chunk = max(1, min(resamples, 2**22 // max(items, runs)))  # bounded memory: chunk x N counts
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        run_draws = rng.integers(0, runs, size=(count, runs))  # chunk x S
        item_draws = rng.integers(0, items, size=(count, items))  # chunk x N
        offsets = np.arange(count)[:, None]
        run_counts = np.bincount((offsets * runs + run_draws).ravel(), minlength=count * runs).reshape(count, runs)
        item_counts = np.bincount((offsets * items + item_draws).ravel(),
                                  minlength=count * items).reshape(count, items)  # chunk x N
        for table, result in zip(tables, out, strict=True):
            total = np.zeros(count)
            for k in range(components):
                per_item = run_counts @ table[k] / runs  # chunk x N: the chosen runs' mean score of each item
                drawn = item_counts * weights[k]  # chunk x N: each item's weight times its draws
                total += (per_item * drawn).sum(axis=1) / drawn.sum(axis=1)
            result[start:start + count] = total / components
    return out


def _point(scores: np.ndarray, weights: np.ndarray) -> float:
    return float(np.mean([(scores[k] * weights[k]).sum(axis=1).mean() / weights[k].sum()
                          for k in range(len(scores))]))


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def hierarchical_ci(scores, weights=None, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """One arm's metric over its runs and test items, with the percentile interval of a bootstrap over both
    (`_hierarchical_draws`: runs and items resampled with replacement, one item draw for every chosen run).

    `scores`: runs x items, or components x runs x items for a metric that averages several per-item metrics of the
    same items (mean R@10 over both retrieval directions); `weights`: one positive weight per item (per component),
    the metric of a run then the weighted mean sum(w s) / sum(w) (text-to-image recall: the image's captions).
    The value is the mean over runs of each run's metric."""
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    scores, weights = _as_components(scores, weights)
    (draws,) = _hierarchical_draws([scores], weights, resamples, seed)
    return Interval(_point(scores, weights), *_percentiles(draws, level), level, scores.shape[2])


def hierarchical_paired_ci(scores_a, scores_b, weights=None, resamples: int = 2000, level: float = 0.95,
                           seed: int = 0) -> Interval:
    """a − b over seed-paired runs (row s of a and of b: the same seed) on the same test items, with the interval of
    the bootstrap over seed pairs and items: each resample draws the pairs and one set of items, for both arms."""
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    a, weights_a = _as_components(scores_a, weights)
    b, _ = _as_components(scores_b, weights)
    if a.shape != b.shape:
        raise ValueError(f"a paired contrast needs the same seeds and items: shapes {a.shape} and {b.shape}")
    draws_a, draws_b = _hierarchical_draws([a, b], weights_a, resamples, seed)
    return Interval(_point(a, weights_a) - _point(b, weights_a), *_percentiles(draws_a - draws_b, level), level,
                    a.shape[2])
