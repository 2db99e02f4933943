"""Paired ratios with distribution-free confidence intervals for their median.

The benchmarks time two networks side by side, alternating every round. On a
shared or throttled machine the time of a whole run drifts by more than the
differences they measure, so a ratio of two medians can land on either side
of a target from one run to the next. A round's two timings are seconds
apart and see the same load: the ratio within each round cancels the drift,
and the median of the per-round ratios comes with an interval that says
whether a run decides the target at all.

The interval is the classic order-statistic one: for ``n`` independent
values with median ``m``, sorted as ``x(1) <= ... <= x(n)``,
``P(x(j) <= m <= x(n + 1 - j)) = 1 - 2 * P(B < j)`` with ``B ~ Binomial(n,
1/2)``, whatever their distribution; ``j`` is the largest index that keeps
the coverage at least the confidence asked for.
"""
import statistics
from typing import Optional, Sequence, Tuple

from scipy.stats import binom


def median_interval(values: Sequence[float], confidence: float = 0.95
                    ) -> Tuple[float, Optional[float], Optional[float]]:
    """Median of ``values`` and a distribution-free confidence interval for
    it.

    Args:
        values (Sequence[float]): Independent observations.
        confidence (float): Coverage of the interval, in (0, 1).

    Returns:
        tuple[float, float | None, float | None]: The median and the
        interval's bounds; the bounds are None when there are too few values
        for any interval of that coverage (fewer than 6 at 95 %).

    Raises:
        ValueError: No values, or a confidence outside (0, 1).
    """
    if not values:
        raise ValueError('median_interval needs at least one value')
    if not 0 < confidence < 1:
        raise ValueError(
            f'confidence must lie in (0, 1), got {confidence!r}')
    ordered = sorted(values)
    n = len(ordered)
    tail = (1 - confidence) / 2
    # Largest j with P(B <= j - 1) <= tail: the bounds are x(j), x(n+1-j).
    j = int(binom.ppf(tail, n, 0.5))
    if binom.cdf(j, n, 0.5) <= tail:
        j += 1  # ppf rounds up to where the cdf first reaches tail
    median = statistics.median(ordered)
    if j < 1:
        return median, None, None
    return median, ordered[j - 1], ordered[n - j]


def paired_ratios(numerators: Sequence[float],
                  denominators: Sequence[float],
                  scale: float = 1.0) -> list:
    """``scale * a / b`` for each round's pair ``(a, b)``.

    Raises:
        ValueError: Sequences of different lengths (timings that are not
            paired by round).
    """
    if len(numerators) != len(denominators):
        raise ValueError(
            f'paired timings need as many rounds on each side, got '
            f'{len(numerators)} and {len(denominators)}')
    return [scale * a / b for a, b in zip(numerators, denominators)]


def verdict(low: Optional[float], high: Optional[float], limit: float,
            at_most: bool) -> str:
    """Whether a confidence interval decides a target.

    Args:
        low, high (float | None): The interval (None: no interval).
        limit (float): The target's bound.
        at_most (bool): True for a target ``value <= limit``, False for
            ``value >= limit``.

    Returns:
        str: ``'met'`` if the whole interval satisfies the target, ``'not
        met'`` if none of it does, ``'undecided'`` otherwise.
    """
    if low is None or high is None:
        return 'undecided'
    if at_most:
        return 'met' if high <= limit else 'not met' if low > limit \
            else 'undecided'
    return 'met' if low >= limit else 'not met' if high < limit \
        else 'undecided'


def format_interval(median: float, low: Optional[float],
                    high: Optional[float], digits: int = 3) -> str:
    """``'1.062 [1.051, 1.070]'``, or the median alone without bounds."""
    if low is None or high is None:
        return f'{median:.{digits}f}'
    return f'{median:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]'


def format_row_interval(row: dict, key: str, digits: int = 3,
                        scale: float = 1.0) -> str:
    """:func:`format_interval` of ``row[key]`` and its bounds
    ``row[key + '_low']``, ``row[key + '_high']``, each times ``scale``."""
    values = [row[key], row[f'{key}_low'], row[f'{key}_high']]
    return format_interval(
        *(None if v is None else v * scale for v in values), digits=digits)
