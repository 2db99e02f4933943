"""benchmarks/paired_stats.py: the median's distribution-free interval
against exact binomial sums, the paired ratios and the verdicts."""
import importlib.util
import math
import os.path as osp
import random

import pytest

_PATH = osp.join(osp.dirname(osp.dirname(__file__)), 'benchmarks',
                 'paired_stats.py')
_spec = importlib.util.spec_from_file_location('paired_stats', _PATH)
paired_stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paired_stats)


def _coverage(n, j):
    """P(x(j) <= median <= x(n + 1 - j)) = 1 - 2 P(B <= j - 1), summed
    exactly."""
    below = sum(math.comb(n, k) for k in range(j)) / 2**n
    return 1 - 2 * below


@pytest.mark.parametrize('n', [1, 5, 6, 7, 10, 20, 30, 31, 100])
@pytest.mark.parametrize('confidence', [0.9, 0.95, 0.99])
def test_interval_is_the_narrowest_with_the_coverage(n, confidence):
    values = [float(v) for v in range(n)]
    random.Random(n).shuffle(values)
    median, low, high = paired_stats.median_interval(values, confidence)
    assert median == pytest.approx((n - 1) / 2)
    if low is None:
        # Even the widest interval, min to max, covers too little.
        assert high is None and _coverage(n, 1) < confidence
        return
    j = int(low) + 1  # values are 0 .. n-1: x(j) = j - 1
    assert high == n - j
    assert _coverage(n, j) >= confidence
    assert j == (n + 1) // 2 or _coverage(n, j + 1) < confidence


def test_interval_of_a_known_case():
    # n = 30 at 95 %: the 10th and 21st values (textbook tables).
    values = list(range(100, 130))
    assert paired_stats.median_interval(values) == (114.5, 109, 120)


def test_interval_rejects_bad_input():
    with pytest.raises(ValueError, match='at least one'):
        paired_stats.median_interval([])
    with pytest.raises(ValueError, match=r'\(0, 1\), got 1.5'):
        paired_stats.median_interval([1.0, 2.0], 1.5)


def test_paired_ratios():
    assert paired_stats.paired_ratios([2.0, 6.0], [1.0, 3.0], 0.5) == [
        1.0, 1.0
    ]
    with pytest.raises(ValueError, match='got 2 and 1'):
        paired_stats.paired_ratios([1.0, 2.0], [1.0])
    # A machine that slows down over a run: each round's pair slows alike,
    # so the paired ratios stay put.
    slowdown = [1.0 + 0.1 * i for i in range(12)]
    assert paired_stats.paired_ratios(
        [10.0 * f for f in slowdown], [6.0 * f for f in slowdown],
        0.5) == pytest.approx([10.0 / 6.0 * 0.5] * 12)


@pytest.mark.parametrize('low,high,at_most,expected', [
    (1.01, 1.04, True, 'met'),
    (1.01, 1.05, True, 'met'),
    (1.04, 1.06, True, 'undecided'),
    (1.051, 1.09, True, 'not met'),
    (0.81, 0.9, False, 'met'),
    (0.79, 0.81, False, 'undecided'),
    (0.7, 0.79, False, 'not met'),
    (None, None, True, 'undecided'),
])
def test_verdict(low, high, at_most, expected):
    limit = 1.05 if at_most else 0.8
    assert paired_stats.verdict(low, high, limit, at_most) == expected


def test_format_interval():
    assert paired_stats.format_interval(1.0624, 1.051, 1.07) == \
        '1.062 [1.051, 1.070]'
    assert paired_stats.format_interval(0.8, None, None, 2) == '0.80'
    row = dict(share=0.004, share_low=0.003, share_high=None)
    assert paired_stats.format_row_interval(row, 'share', 2, 100) == '0.40'
    row['share_high'] = 0.005
    assert paired_stats.format_row_interval(row, 'share', 2, 100) == \
        '0.40 [0.30, 0.50]'
