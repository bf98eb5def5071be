"""Bootstrap confidence intervals (dtplib.measure.stats): the interval holds the estimate, narrows with more items, is
seeded, weights make a ratio of sums, a paired comparison of identical scores is exactly 0 with [0, 0], and the draws
are those of the hand-written resampling the committed results used. Student-t intervals over seeds: SciPy's."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from dtplib.measure.stats import bootstrap_ci, paired_ci, t_interval, t_quantile


def hits(count: int, rate: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(count) < rate).astype(float)


def test_interval_contains_the_estimate_and_shrinks_with_more_items():
    widths = []
    for count in (50, 500, 5000):
        scores = hits(count, 0.3, seed=count)
        interval = bootstrap_ci(scores, resamples=500, seed=0)
        assert interval.value == scores.mean() and interval.items == count and interval.level == 0.95
        assert interval.low <= interval.value <= interval.high
        widths.append(interval.high - interval.low)
    assert widths[0] > widths[1] > widths[2] > 0
    # about 2 x 1.96 x sqrt(p (1 - p) / n) for a mean of hits
    assert widths[2] == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 5000), rel=0.2)


def test_interval_is_seeded_and_level_widens_it():
    scores = hits(200, 0.5, seed=1)
    assert bootstrap_ci(scores, 300, seed=4) == bootstrap_ci(scores, 300, seed=4)
    narrow, wide = bootstrap_ci(scores, 300, level=0.5), bootstrap_ci(scores, 300, level=0.99)
    assert wide.low < narrow.low <= narrow.high < wide.high
    assert bootstrap_ci(np.ones(10), 100) == bootstrap_ci(np.ones(10), 100)  # no spread: [1, 1]
    assert bootstrap_ci(np.ones(10), 100).low == 1.0 == bootstrap_ci(np.ones(10), 100).high
    with pytest.raises(ValueError, match="at least one scored item"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="resamples >= 1"):
        bootstrap_ci(scores, 0)


def test_weights_give_the_ratio_of_sums():
    shares, counts = np.array([1.0, 0.5, 0.0, 1 / 3]), np.array([2.0, 2.0, 1.0, 3.0])  # found / captions per image
    interval = bootstrap_ci(shares, 400, weights=counts)
    assert interval.value == pytest.approx((2 + 1 + 0 + 1) / 8)  # 4 of 8 texts
    assert interval.low <= interval.value <= interval.high
    assert bootstrap_ci(shares, 400, weights=np.ones(4)) == pytest.approx(bootstrap_ci(shares, 400))
    with pytest.raises(ValueError, match="one positive weight per item"):
        bootstrap_ci(shares, weights=[1.0, 2.0])


def test_paired_comparison():
    a = hits(300, 0.4, seed=2)
    same = paired_ci(a, a.copy(), 500)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero()
    better = np.maximum(a, hits(300, 0.3, seed=3))  # a plus some hits: never worse on an item
    diff = paired_ci(better, a, 500)
    assert diff.value == pytest.approx(better.mean() - a.mean()) and 0 < diff.low <= diff.value <= diff.high
    assert diff.excludes_zero()
    # pairing removes what the items share: narrower than the difference of two independent intervals
    alone = bootstrap_ci(better, 500, seed=1).high - bootstrap_ci(better, 500, seed=1).low
    assert diff.high - diff.low < alone
    with pytest.raises(ValueError, match="same items"):
        paired_ci(a, a[:10])


def resampled_interval(scores, weights, resamples: int, level: float, seed: int) -> tuple[float, float]:
    """The resampling written out: chunks of 256 x items indices from default_rng(seed), np.percentile of the means."""
    rng, means = np.random.default_rng(seed), []
    for start in range(0, resamples, 256):
        index = rng.integers(0, len(scores), size=(min(256, resamples - start), len(scores)))  # chunk x items
        means.append((scores[index] * weights[index]).sum(axis=1) / weights[index].sum(axis=1))
    tail = 100 * (1 - level) / 2
    return tuple(np.percentile(np.concatenate(means), [tail, 100 - tail]))


@pytest.mark.parametrize(("count", "resamples", "level", "weighted"),
                         [(7, 1000, 0.95, False), (300, 1000, 0.95, True), (51, 777, 0.9, False)])
def test_scipy_bootstrap_draws_what_the_committed_results_drew(count, resamples, level, weighted):
    rng = np.random.default_rng(count)
    scores = (rng.random(count) < 0.3) + rng.random(count)
    weights = rng.integers(1, 6, count).astype(float) if weighted else np.ones(count)
    interval = bootstrap_ci(scores, resamples, level, seed=3, weights=weights if weighted else None)
    assert (interval.low, interval.high) == pytest.approx(resampled_interval(scores, weights, resamples, level, 3),
                                                          rel=1e-12, abs=0)  # the same draws: equal up to sum order
    assert bootstrap_ci([0.25], 100) == bootstrap_ci([0.25], 100)
    assert (bootstrap_ci([0.25], 100).low, bootstrap_ci([0.25], 100).high) == (0.25, 0.25)  # one item: no spread


def test_t_quantiles_and_intervals_are_scipys():
    # printed tables (two-sided 95%): 12.706 (1 df), 4.303 (2), 2.571 (5), 2.042 (30), 1.984 (100); 1.960 at infinity
    for df, printed in [(1, 12.706), (2, 4.303), (5, 2.571), (30, 2.042), (100, 1.984), (10**7, 1.960)]:
        assert t_quantile(df) == pytest.approx(printed, abs=5e-4)
    assert t_quantile(4, level=0.9) == pytest.approx(2.132, abs=5e-4) and np.isnan(t_quantile(0))
    values = [0.61, 0.64, 0.58, None, float("nan"), 0.66]  # missing and non-finite runs are left out
    mean, low, high, n = t_interval(values)
    finite = np.array([0.61, 0.64, 0.58, 0.66])
    expected = scipy_stats.t.interval(0.95, len(finite) - 1, loc=finite.mean(), scale=scipy_stats.sem(finite))
    assert n == 4 and mean == pytest.approx(finite.mean()) and (low, high) == pytest.approx(expected, rel=1e-12)
    assert t_interval([0.5])[:2] == (0.5, pytest.approx(float("nan"), nan_ok=True)) and t_interval([])[3] == 0
