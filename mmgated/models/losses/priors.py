"""Prior distributions for the batch-shaping loss, as differentiable CDFs.

A prior is built from a dict such as ``dict(type='beta', a=0.6, b=0.4)``
through the ``PRIORS`` registry. Register your own with
``@PRIORS.register_module()`` on a :class:`Prior` subclass; it needs a
``support`` (low, high) and a ``cdf(x)`` that is differentiable in ``x``.
"""
import math
from numbers import Real

import torch
from mmengine.registry import Registry

PRIORS = Registry('batch-shaping prior')


def _check(name, value, condition, allowed):
    if not isinstance(value, Real) or isinstance(value, bool) \
            or not math.isfinite(value) or not condition(value):
        raise ValueError(f'prior parameter {name}={value!r} is invalid; '
                         f'allowed: {allowed}')
    return float(value)


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
            x = torch.where(x < low, torch.full_like(x, low), x)
        if high < math.inf:
            x = torch.where(x > high, torch.full_like(x, high), x)
        return self.cdf(x)


def _betainc_cf(x, a, b, iterations):
    """Continued fraction of I_x(a, b) (modified Lentz), fixed iteration
    count so that no host synchronisation is needed to test convergence."""
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


class _BetaCDF(torch.autograd.Function):
    """Regularised incomplete beta function I_x(a, b) with the analytic
    derivative, the Beta pdf, evaluated inside [eps, 1 - eps] so that it is
    finite at 0 and 1 where the pdf is singular for a < 1 or b < 1."""

    @staticmethod
    def forward(ctx, x, a, b, log_beta, iterations, eps):
        x64 = x.double()
        # Use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the continued
        # fraction of the other side converges faster.
        flip = x64 > (a + 1.0) / (a + b + 2.0)
        xs = torch.where(flip, 1.0 - x64, x64)
        aa = torch.where(flip, torch.full_like(x64, b), torch.full_like(x64, a))
        bb = torch.where(flip, torch.full_like(x64, a), torch.full_like(x64, b))
        xs_safe = xs.clamp(min=1e-300)
        front = torch.exp(aa * torch.log(xs_safe) + bb * torch.log1p(-xs)
                          - log_beta) / aa
        cf = _betainc_cf(xs, aa, bb, iterations)
        value = torch.where(xs <= 0, torch.zeros_like(xs), front * cf)
        value = torch.where(flip, 1.0 - value, value).clamp(0.0, 1.0)
        ctx.save_for_backward(x)
        ctx.params = (a, b, log_beta, eps)
        return value.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, = ctx.saved_tensors
        a, b, log_beta, eps = ctx.params
        xc = x.double().clamp(eps, 1.0 - eps)
        pdf = torch.exp((a - 1.0) * torch.log(xc) + (b - 1.0) *
                        torch.log1p(-xc) - log_beta)
        return (grad_output * pdf).to(x.dtype), None, None, None, None, None


@PRIORS.register_module('beta')
class BetaPrior(Prior):
    """Beta(a, b) prior; the paper's gate prior is Beta(0.6, 0.4).

    The CDF is computed in float64 by a continued fraction (matches
    ``scipy.special.betainc`` to 1e-6) on the input's device. Its derivative
    is the Beta pdf evaluated on ``[eps, 1 - eps]``: finite at 0 and 1.

    Args:
        a (float): First shape parameter, > 0.
        b (float): Second shape parameter, > 0.
        eps (float): Distance from 0 and 1 at which the pdf is evaluated for
            the gradient of samples at or beyond the ends. Default: 1e-6.
    """

    support = (0.0, 1.0)

    def __init__(self, a: float = 0.6, b: float = 0.4, eps: float = 1e-6):
        self.a = _check('a', a, lambda v: v > 0, 'a > 0')
        self.b = _check('b', b, lambda v: v > 0, 'b > 0')
        self.eps = _check('eps', eps, lambda v: 0 < v < 0.5, '0 < eps < 0.5')
        self.log_beta = (math.lgamma(self.a) + math.lgamma(self.b) -
                         math.lgamma(self.a + self.b))
        # The continued fraction converges in O(sqrt(max(a, b))) steps;
        # this count reaches float64 round-off (< 1e-13 against scipy for
        # a, b in [0.2, 500]) without testing convergence on the device.
        self.iterations = 16 + int(1.5 * math.sqrt(max(self.a, self.b)))

    def cdf(self, x):
        return _BetaCDF.apply(x, self.a, self.b, self.log_beta,
                              self.iterations, self.eps)


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
