"""Prior distributions for the batch-shaping loss, as differentiable CDFs.

A prior is built from a dict such as ``dict(type='beta', a=0.6, b=0.4)``
through the ``PRIORS`` registry. Register your own with
``@PRIORS.register_module()`` on a :class:`Prior` subclass; it needs a
``support`` (low, high) and a ``cdf(x)`` that is differentiable in ``x``.
"""
import math
from typing import Optional

import torch
from mmengine.registry import Registry

from ...utils.checks import check_number

PRIORS = Registry('batch-shaping prior')


def _check(name, value, condition, allowed):
    return check_number(f'prior parameter {name}', value, allowed, condition)


class Prior:
    """Base class of the priors: a CDF on a support interval.

    ``cdf`` receives values already clamped to ``support``; values beyond
    it are clamped (and get no gradient), values at its ends keep theirs.
    """

    support = (-math.inf, math.inf)

    def cdf(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.support
        # Unlike Tensor.clamp, keep the gradient of values exactly at an end
        # of the support (gates saturate at 0 and 1); values beyond are
        # clamped and get none.
        if low > -math.inf:
            x = torch.where(x < low, low, x)
        if high < math.inf:
            x = torch.where(x > high, high, x)
        return self.cdf(x)


def _betainc_cf(x, a, b, iterations):
    """Continued fraction of I_x(a, b) (modified Lentz) with a fixed
    iteration count; ``a`` and ``b`` may be tensors shaped like ``x``."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = torch.ones_like(x)
    d = 1.0 - qab * x / qap
    d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
    d = 1.0 / d
    h = d
    for m in range(1, iterations + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
            c = 1.0 + aa / c
            c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
            d = 1.0 / d
            h = h * d * c
    return h


# Nodes of the cubic fitted on each interval of the CDF table.
_CUBIC_NODES = (0.0, 1 / 3, 2 / 3, 1.0)


def betainc_table(a: float, b: float) -> torch.Tensor:
    """Piecewise-cubic table of the regularised incomplete beta function.

    ``I_x(a, b) = x^a (1 - x)^b / B(a, b) * g(x)``, where the power factor
    holds the singularities at 0 and 1 and ``g`` is smooth: ``H_ab(x) / a``
    left of the switch point ``(a + 1) / (a + b + 2)`` and
    ``1 / x^a (1 - x)^b B - H_ba(1 - x) / b`` right of it, with ``H`` the
    continued fraction of I (Numerical Recipes' ``betacf``), which converges
    fast on either side. The table splits [0, 1] into ``K`` intervals
    (the switch point moved to the nearest interval end) and holds, per
    interval, the value of I where the power factor vanishes (0 on the
    left, 1 on the right) and the coefficients of the cubic in
    ``t = K x - i`` through four exact values of ``±H / a`` (see
    :func:`evaluate_betainc_table`). ``K = 1024 + 32 * ceil(a + b)`` keeps
    the error below 1e-10 against ``scipy.special.betainc`` for ``a, b`` in
    [0.05, 1000].

    Args:
        a (float): First shape parameter, > 0.
        b (float): Second shape parameter, > 0.

    Returns:
        Tensor: ``(5, K)`` float64: the rows ``base, c0, c1, c2, c3``.
    """
    f64 = dict(dtype=torch.float64)
    intervals = 1024 + 32 * math.ceil(a + b)
    switch = round((a + 1.0) / (a + b + 2.0) * intervals)
    # Twice the count that reaches float64 round-off (see BetaPrior).
    iterations = 2 * (16 + int(1.5 * math.sqrt(max(a, b))))
    index = torch.arange(intervals, **f64)
    t = torch.tensor(_CUBIC_NODES, **f64)
    nodes = (index[:, None] + t) / intervals
    left = (index < switch)[:, None]
    p = torch.where(left, torch.tensor(a, **f64), torch.tensor(b, **f64))
    q = torch.where(left, torch.tensor(b, **f64), torch.tensor(a, **f64))
    h = _betainc_cf(torch.where(left, nodes, 1.0 - nodes), p.expand_as(nodes),
                    q.expand_as(nodes), iterations)
    values = torch.where(left, h / a, -h / b)
    vandermonde = t[:, None]**torch.arange(4, **f64)
    coefficients = torch.linalg.solve(vandermonde, values.T).T
    return torch.cat([(~left).to(torch.float64), coefficients],
                     dim=1).t().contiguous()


def evaluate_betainc_table(x: torch.Tensor,
                           table: torch.Tensor,
                           a: float,
                           b: float,
                           log_beta: float,
                           eps: Optional[float] = None):
    """I_x(a, b) from :func:`betainc_table` for ``x`` in [0, 1], in the
    dtype of ``table``, and with ``eps`` its derivative, the Beta(a, b) pdf
    evaluated on ``[eps, 1 - eps]``: about twenty elementwise operations
    whatever ``a`` and ``b``, instead of a continued fraction per value.

    Returns:
        tuple[Tensor, Tensor | None]: I_x(a, b) and the pdf (None without
        ``eps``).
    """
    intervals = table.shape[1]
    u = x * intervals
    # NaN reads row 0 and stays NaN through t.
    index = u.floor().nan_to_num_(0.0).clamp_(0, intervals - 1)
    t = u.sub_(index)
    # The table is stored column-wise: five contiguous gathers' worth in one.
    base, c0, c1, c2, c3 = table.index_select(
        1, index.flatten().long()).view((5, ) + x.shape).unbind(0)
    cubic = c0.addcmul(t, c1.addcmul(t, c2.addcmul(t, c3)))
    # x^a (1 - x)^b / B(a, b), exactly 0 at x = 0 and x = 1, and the pdf
    # share the two logarithms. (log(1 - x) rather than log1p(-x), four
    # times slower on the CPU: the absolute error of log(1 - x) is all the
    # product needs.)
    log_x, log_1mx = torch.log(x), torch.log(1.0 - x)
    power = torch.exp(log_x * a + log_1mx * b - log_beta)
    pdf = None if eps is None else _beta_pdf_of_logs(log_x, log_1mx, a, b,
                                                     log_beta, eps)
    return base.addcmul(power, cubic).clamp_(0.0, 1.0), pdf


class _BetaCDF(torch.autograd.Function):
    """Regularised incomplete beta function I_x(a, b) with the analytic
    derivative, the Beta pdf, evaluated inside [eps, 1 - eps] so that it is
    finite at 0 and 1 where the pdf is singular for a < 1 or b < 1."""

    @staticmethod
    def forward(ctx, x, table, a, b, log_beta, eps):
        # The pdf shares the CDF's logarithms: computed here if needed.
        cdf, pdf = evaluate_betainc_table(
            x, table, a, b, log_beta, eps if ctx.needs_input_grad[0] else None)
        ctx.save_for_backward(pdf)
        return cdf

    @staticmethod
    def backward(ctx, grad_output):
        pdf, = ctx.saved_tensors
        return grad_output * pdf, None, None, None, None, None


def _beta_pdf_of_logs(log_x, log_1mx, a, b, log_beta, eps):
    """The Beta(a, b) density from ``log(x)`` and ``log(1 - x)``, evaluated
    on [eps, 1 - eps] (the logarithms clamped to [log eps, log(1 - eps)])
    so that it is finite at 0 and 1."""
    low, high = math.log(eps), math.log1p(-eps)
    return torch.exp(log_x.clamp(low, high) * (a - 1.0) +
                     log_1mx.clamp(low, high) * (b - 1.0) - log_beta)


def _beta_pdf(x, a, b, log_beta, eps):
    """The Beta(a, b) density of ``x`` clamped to [0, 1], evaluated on
    [eps, 1 - eps] so that it is finite at 0 and 1."""
    x = x.clamp(0.0, 1.0)
    return _beta_pdf_of_logs(torch.log(x), torch.log(1.0 - x), a, b,
                             log_beta, eps)


@PRIORS.register_module('beta')
class BetaPrior(Prior):
    """Beta(a, b) prior; the paper's gate prior is Beta(0.6, 0.4).

    The CDF comes from a piecewise-cubic table of the smooth part of the
    incomplete beta function (:func:`betainc_table`), built once in float64
    by a continued fraction and then evaluated in about twenty elementwise
    operations on the input's device and dtype (float32, or float64 for
    float64 input): within 1e-10 of ``scipy.special.betainc`` in float64,
    within float32 rounding in float32. Its derivative is the Beta pdf
    evaluated on ``[eps, 1 - eps]``: finite at 0 and 1.

    Args:
        a (float): First shape parameter, > 0.
        b (float): Second shape parameter, > 0.
        eps (float): Distance from 0 and 1 at which the pdf is evaluated for
            the gradient of samples at or beyond the ends. Default: 1e-6.
    """

    support = (0.0, 1.0)

    def __init__(self, a: float = 0.6, b: float = 0.4, eps: float = 1e-6):
        # The CDF table grows with a + b (see betainc_table); past 1000 its
        # construction takes minutes.
        self.a = _check('a', a, lambda v: 0 < v <= 1000, '0 < a <= 1000')
        self.b = _check('b', b, lambda v: 0 < v <= 1000, '0 < b <= 1000')
        self.eps = _check('eps', eps, lambda v: 0 < v < 0.5, '0 < eps < 0.5')
        self.log_beta = (math.lgamma(self.a) + math.lgamma(self.b) -
                         math.lgamma(self.a + self.b))
        # Built here, outside any training step: built lazily inside a step
        # that torch.compile traces, its continued fraction would be
        # compiled too (minutes of inductor time).
        cpu_table = betainc_table(self.a, self.b)
        self._tables = {(torch.device('cpu'), torch.float64): cpu_table}

    def table(self, device, dtype) -> torch.Tensor:
        """The CDF table (see :func:`betainc_table`) on a device/dtype,
        copied from the float64 CPU table once per device and dtype."""
        key = (torch.device(device), dtype)
        if key not in self._tables:
            cpu_table = self._tables[(torch.device('cpu'), torch.float64)]
            self._tables[key] = cpu_table.to(device=device, dtype=dtype)
        return self._tables[key]

    def cdf(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        table = self.table(x.device, dtype)
        return _BetaCDF.apply(x.to(dtype), table, self.a, self.b,
                              self.log_beta, self.eps).to(x.dtype)

    def pdf(self, x):
        return _beta_pdf(x, self.a, self.b, self.log_beta, self.eps)


@PRIORS.register_module('gaussian')
class GaussianPrior(Prior):
    """Normal(mean, std) prior, e.g. to make activations Gaussian.

    Args:
        mean (float): Mean. Default: 0.
        std (float): Standard deviation, > 0. Default: 1.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean = _check('mean', mean, lambda v: True, 'a finite number')
        self.std = _check('std', std, lambda v: v > 0, 'std > 0')

    def cdf(self, x):
        return torch.special.ndtr((x - self.mean) / self.std)


@PRIORS.register_module('uniform')
class UniformPrior(Prior):
    """Uniform(low, high) prior, e.g. for quantisation-friendly activations.

    Args:
        low (float): Lower end. Default: 0.
        high (float): Upper end, > low. Default: 1.
    """

    def __init__(self, low: float = 0.0, high: float = 1.0):
        self.low = _check('low', low, lambda v: True, 'a finite number')
        self.high = _check('high', high, lambda v: v > self.low,
                           f'high > low={self.low}')
        self.support = (self.low, self.high)

    def cdf(self, x):
        return (x - self.low) / (self.high - self.low)


def build_prior(cfg) -> Prior:
    """Build a prior from a config dict or return a :class:`Prior` as is."""
    if isinstance(cfg, Prior):
        return cfg
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise TypeError(f'prior must be a Prior or a dict with a "type" key, '
                        f'got {cfg!r}')
    args = dict(cfg)
    prior_type = args.pop('type')
    # Looked up directly: building through the registry would resolve the
    # caller's default scope (mmseg/mmpretrain), which has no priors.
    if prior_type not in PRIORS.module_dict:
        raise KeyError(f'unknown prior type {prior_type!r}; registered '
                       f'priors are {sorted(PRIORS.module_dict)}')
    return PRIORS.module_dict[prior_type](**args)
