"""Statistics of a study over seeds: means with confidence intervals, rank
correlation, and the accuracy of a static baseline at a given MAC ratio.

Used by ``tools/analysis_tools/paper_study.py``.
"""
import math
from typing import Optional, Sequence, Tuple

import numpy as np

Interval = Tuple[float, Optional[float], Optional[float]]


def mean_interval(values: Sequence[float],
                  confidence: float = 0.95,
                  limits: Optional[Tuple[float, float]] = None) -> Interval:
    """Mean of ``values`` with the Student-t confidence interval.

    Args:
        values (Sequence[float]): Independent observations (e.g. one per
            seed); NaNs are left out.
        confidence (float): Coverage, in (0, 1). Default: 0.95.
        limits (tuple[float, float], optional): The range the quantity
            cannot leave (a percentage, a share): the interval is cut to
            it. Default: None.

    Returns:
        tuple: ``(mean, low, high)``; the bounds are None for fewer than two
        values. ``mean`` is NaN for none.
    """
    from scipy.stats import t
    if not 0 < confidence < 1:
        raise ValueError(f'confidence must lie in (0, 1), got {confidence!r}')
    values = np.asarray([v for v in values if v is not None], dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float('nan'), None, None
    mean = float(values.mean())
    if values.size < 2:
        return mean, None, None
    half = float(t.ppf(0.5 + confidence / 2, values.size - 1) *
                 values.std(ddof=1) / math.sqrt(values.size))
    low, high = mean - half, mean + half
    if limits is not None:
        low, high = max(low, limits[0]), min(high, limits[1])
    return mean, low, high


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation of ``x`` and ``y`` (ties get their mean
    rank); None when either is constant or there are fewer than 3 pairs."""
    from scipy.stats import rankdata
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def interpolate(points: Sequence[Tuple[float, float]],
                at: float) -> Optional[float]:
    """Linear interpolation of ``(x, y)`` points at ``x = at``; None
    outside their range."""
    points = sorted(points)
    if not points or not points[0][0] <= at <= points[-1][0]:
        return None
    xs, ys = zip(*points)
    return float(np.interp(at, xs, ys))


def format_interval(value: Interval, digits: int = 2,
                    scale: float = 1.0) -> str:
    """``'mean [low, high]'`` (``'mean'`` without an interval)."""
    mean, low, high = value
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return '-'
    text = f'{mean * scale:.{digits}f}'
    if low is not None:
        text += f' [{low * scale:.{digits}f}, {high * scale:.{digits}f}]'
    return text
