"""Bootstrap confidence intervals (dtplib.measure.stats): the interval holds the estimate, narrows with more items, is
seeded, weights make a ratio of sums, a paired comparison of identical scores is exactly 0 with [0, 0], and the draws
are those of the hand-written resampling the committed results used. Student-t intervals over seeds: SciPy's. The
tests over seeds (Holm, the paired t-test, TOST, degenerate intervals) against hand-computed values, and the
bootstrap over seeds and items against the exact distribution, enumerated."""

import itertools
import time

import numpy as np
import pytest
from scipy import stats as scipy_stats

from dtplib.measure.stats import (
    bootstrap_ci,
    degenerate,
    hierarchical_ci,
    hierarchical_paired_ci,
    holm,
    paired_ci,
    paired_t_pvalue,
    t_interval,
    t_quantile,
    tost,
)


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


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04; step-down keeps the running maximum: 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2, 0.6]) == pytest.approx([0.4, 0.6]) and holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped
    adjusted = holm([0.01, float("nan"), 0.02])  # a NaN stays NaN and still counts in m = 3
    assert adjusted[0] == pytest.approx(0.03) and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    p = np.random.default_rng(0).random(12) ** 3
    order, m = np.argsort(p), len(p)
    by_definition = np.empty(m)  # the i-th smallest: max over j <= i of min(1, (m - j + 1) p_(j)), 1-based
    for i in range(m):
        by_definition[order[i]] = max(min(1.0, (m - j) * p[order[j]]) for j in range(i + 1))
    assert holm(p) == pytest.approx(by_definition, rel=1e-12)
    assert (holm(p) >= p).all() and (np.diff(holm(p)[order]) >= 0).all()


def test_paired_t_and_degenerate_intervals():
    # differences 0.1, 0.3, 0.2: t = 0.2 / (0.1 / sqrt 3) = 2 sqrt 3; with 2 df, F(t) = 1/2 + t / (2 sqrt(t^2 + 2))
    t = 2 * np.sqrt(3)
    assert paired_t_pvalue([0.1, 0.3, 0.2]) == pytest.approx(2 * (0.5 - t / (2 * np.sqrt(t * t + 2))), rel=1e-9)
    same = [0.011 - 0.006, 0.012 - 0.007]  # two seeds that moved alike, to rounding: a zero-width interval
    mean, low, high, _ = t_interval(same)
    assert high - low == pytest.approx(0, abs=1e-12) and degenerate(same) and np.isnan(paired_t_pvalue(same))
    assert degenerate([0.3]) and degenerate([]) and not degenerate([0.1, 0.1 + 1e-6])
    assert tost(same, 0.1) == (pytest.approx(float("nan"), nan_ok=True), False)


def test_tost_is_the_90_interval_inside_the_margin():
    differences = np.array([0.012, -0.004, 0.006, 0.010, -0.002])
    mean, se = differences.mean(), differences.std(ddof=1) / np.sqrt(5)
    half = scipy_stats.t.ppf(0.95, 4) * se  # the (1 - 2 alpha) t-interval
    for margin in (0.005, 0.01, 0.015, 0.02, 0.05):
        p, equivalent = tost(differences, margin)
        assert equivalent == (mean - half > -margin and mean + half < margin), margin
        lower = 1 - scipy_stats.t.cdf((mean + margin) / se, 4)  # H0: mean <= -margin
        upper = scipy_stats.t.cdf((mean - margin) / se, 4)  # H0: mean >= margin
        assert p == pytest.approx(max(lower, upper), rel=1e-9)
    with pytest.raises(ValueError, match="margin must be > 0"):
        tost(differences, 0)


def exact_interval(statistics: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of an enumerated, equally likely distribution, where a bootstrap of thousands of
    draws lands on the same atoms: each quantile's cumulative share at least 0.03 away from its level."""
    atoms, counts = np.unique(np.round(statistics, 12), return_counts=True)
    cdf, tail = np.cumsum(counts) / counts.sum(), (1 - level) / 2
    low, high = atoms[np.searchsorted(cdf, tail)], atoms[np.searchsorted(cdf, 1 - tail)]
    assert np.abs(cdf - tail).min() > 0.03 and np.abs(cdf - (1 - tail)).min() > 0.03, "pick another level"
    return float(low), float(high)


def test_hierarchical_bootstrap_with_alike_items_is_the_bootstrap_over_seeds():
    run_means = np.array([0.2, 0.3, 0.7])
    table = np.repeat(run_means[:, None], 50, axis=1)  # 3 runs x 50 items, each run's items alike
    every_draw = [run_means[list(draw)].mean() for draw in itertools.product(range(3), repeat=3)]  # 27 draws
    expected = exact_interval(np.array(every_draw), 0.8)  # by hand: 0.2333 (cdf 4/27) and 0.5667
    assert expected == pytest.approx((0.7 / 3, 1.7 / 3))
    interval = hierarchical_ci(table, resamples=4000, level=0.8, seed=1)
    assert (interval.low, interval.high) == pytest.approx(expected, abs=1e-12)
    assert interval.value == pytest.approx(run_means.mean()) and interval.items == 50
    one_item = hierarchical_ci(run_means[:, None], resamples=4000, level=0.8, seed=2)  # seeds alone
    assert (one_item.low, one_item.high) == pytest.approx(expected, abs=1e-12)


def test_hierarchical_bootstrap_with_alike_seeds_is_the_bootstrap_over_items():
    items = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    table = np.tile(items, (4, 1))  # 4 runs that scored every item alike
    every_draw = items[np.array(list(itertools.product(range(6), repeat=6)))].mean(axis=1)  # 6^6 draws
    expected = exact_interval(every_draw, 0.9)  # Binomial(6, 2/3) / 6: cdf 0.018, 0.100 around 5%: 2/6; and 1
    assert expected == pytest.approx((1 / 3, 1.0))
    interval = hierarchical_ci(table, resamples=4000, level=0.9, seed=3)
    assert (interval.low, interval.high) == pytest.approx(expected, abs=1e-12)
    over_items = bootstrap_ci(items, resamples=4000, level=0.9, seed=3)  # the item bootstrap of one run
    assert (over_items.low, over_items.high) == pytest.approx(expected, abs=1e-12)


def test_hierarchical_bootstrap_against_every_draw():
    """2 runs x 3 weighted items: every one of the 2^2 x 3^3 equally likely (runs, items) draws enumerated, one item
    draw for both chosen runs (the items are the same test set)."""
    scores = np.array([[0.0, 1.0, 0.5], [1.0, 1.0, 0.0]])
    weights = np.array([1.0, 2.0, 3.0])
    statistics = []
    for runs in itertools.product(range(2), repeat=2):
        for items in itertools.product(range(3), repeat=3):
            w = weights[list(items)]
            statistics.append(np.mean([(scores[r, list(items)] * w).sum() / w.sum() for r in runs]))
    statistics = np.array(statistics)
    for level in (0.8, 0.95):  # many close atoms: each end where the exact distribution has its quantile, to 1%
        interval = hierarchical_ci(scores, weights, resamples=20000, level=level, seed=4)
        for end, share in ((interval.low, (1 - level) / 2), (interval.high, (1 + level) / 2)):
            assert (statistics < end - 1e-12).mean() <= share + 0.01 and (statistics <= end + 1e-12).mean() >= \
                share - 0.01, (level, end)
    value = np.mean([(row * weights).sum() / weights.sum() for row in scores])
    assert hierarchical_ci(scores, weights, resamples=10).value == pytest.approx(value)


def test_hierarchical_paired_contrast():
    rng = np.random.default_rng(5)
    a = (rng.random((5, 200)) < 0.3).astype(float)
    b = (rng.random((5, 200)) < 0.25).astype(float)
    paired = hierarchical_paired_ci(a, b, resamples=500, seed=6)
    alone = hierarchical_ci(a - b, resamples=500, seed=6)  # the same draws; the statistic is linear in the scores
    assert (paired.value, paired.low, paired.high) == pytest.approx((alone.value, alone.low, alone.high), rel=1e-12)
    assert paired.value == pytest.approx(a.mean() - b.mean())
    shifted = hierarchical_paired_ci(a, a - 0.1, resamples=200)  # every draw differs by 0.1
    assert (shifted.low, shifted.high) == pytest.approx((0.1, 0.1))
    two = np.stack([a, b])  # components: a metric that averages two per-item metrics of the same items
    weights = np.stack([np.ones(200), rng.integers(1, 6, 200).astype(float)])
    both = hierarchical_paired_ci(two, two[::-1], weights, resamples=300)
    expected = np.mean([(two[k] * weights[k]).sum(1).mean() / weights[k].sum() for k in (0, 1)]) - np.mean(
        [(two[1 - k] * weights[k]).sum(1).mean() / weights[k].sum() for k in (0, 1)])
    assert both.value == pytest.approx(expected) and both.low <= both.value <= both.high
    with pytest.raises(ValueError, match="same seeds and items"):
        hierarchical_paired_ci(a, b[:4])
    with pytest.raises(ValueError, match="one positive weight per item"):
        hierarchical_ci(a, np.ones(3))


def test_hierarchical_bootstrap_is_fast():
    rng = np.random.default_rng(7)
    scores = np.stack([(rng.random((5, 1000)) < p).astype(float) for p in (0.08, 0.09)])  # 2 components
    weights = np.stack([np.ones(1000), rng.integers(1, 6, 1000).astype(float)])
    start = time.perf_counter()
    interval = hierarchical_paired_ci(scores, scores[:, ::-1], weights, resamples=2000)
    elapsed = time.perf_counter() - start
    assert interval.low <= interval.value <= interval.high
    assert elapsed < 2.0  # about 0.4 s on a 2-core CPU; the bound leaves room for a busy one
