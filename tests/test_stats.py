"""Bootstrap confidence intervals (dtplib.measure.stats): the interval holds the estimate, narrows with more items, is
seeded, weights make a ratio of sums, and a paired comparison of identical scores is exactly 0 with [0, 0]."""

import numpy as np
import pytest

from dtplib.measure.stats import bootstrap_ci, paired_ci


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
