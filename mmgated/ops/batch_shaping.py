"""Compiled inner loops of the batch-shaping loss
(``csrc/batch_shaping.c``): the column-wise sort of the gate values over
the batch, the Beta prior's CDF with its density, and Eq. (2) with its
gradient from those.

Each returns what its PyTorch counterpart returns, and the callers
(:func:`mmgated.models.losses.batch_shaping_loss.cramer_von_mises`,
:meth:`mmgated.models.losses.priors.BetaPrior.cdf_and_pdf`) fall back to
PyTorch operations wherever the compiled versions do not apply: no compiled
library, tensors that are not contiguous float32 on the CPU.
"""
import ctypes
import functools
import math
from typing import Optional, Tuple

import torch

from .native import float32_function, pointer

_P, _L, _D, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_double, ctypes.c_int

_SIGNATURES = dict(
    argsort_columns=([_P, _L, _L, _P, _P], None),
    beta_cdf_pdf=([_P, _L, _P, _L] + [ctypes.c_float] * 7 + [_P, _P, _I],
                  None),
    cramer_von_mises_sorted=([_P, _P, _P, _L, _L, _D, _P], _D),
)
# Largest batch argsort_columns sorts: its network makes N * N / 2
# compare-exchanges, torch.sort about N * log(N) comparisons.
ARGSORT_MAX_ROWS = 64


def sort_columns(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(x, dim=0)`` (values and indices, no gradient) of a 2-d
    tensor; for a few rows (a CPU batch of at most ``ARGSORT_MAX_ROWS``)
    one compiled sorting network, several times faster than ``torch.sort``
    along the first dimension. (Columns with NaN are not ordered as
    ``torch.sort`` orders them; a loss over them is NaN either way.)"""
    function = None
    if x.dim() == 2 and 0 < x.shape[0] <= ARGSORT_MAX_ROWS:
        function = float32_function(_SIGNATURES, 'argsort_columns', x)
    if function is None:
        values, order = torch.sort(x.detach(), dim=0)
        return values, order
    order = torch.empty(x.shape, dtype=torch.long)
    # The network leaves the sorted values in the first half of its work.
    work = x.new_empty((2, ) + x.shape)
    function(pointer(x), x.shape[0], x.shape[1], pointer(work),
             pointer(order))
    return work[0], order


@functools.lru_cache(maxsize=None)
def _density_ends(a: float, b: float, log_beta: float, eps: float):
    """The ends of [eps, 1 - eps] as float32 (the input's clamp rounds them
    so) and the Beta density there, in float64: constants of a prior,
    computed once rather than at every loss."""
    low, high = torch.tensor([eps, 1.0 - eps], dtype=torch.float32).tolist()
    return (low, high) + tuple(
        math.exp((a - 1.0) * math.log(p) + (b - 1.0) * math.log1p(-p) -
                 log_beta) for p in (low, high))


def beta_cdf_pdf(x: torch.Tensor, table: torch.Tensor, a: float, b: float,
                 log_beta: float, eps: float
                 ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The Beta(a, b) CDF and density at ``x`` in one compiled pass (no
    gradient).

    Args:
        x (Tensor): Values, float32; those beyond [0, 1] get the CDF of the
            nearest end and density 0.
        table (Tensor): :func:`~mmgated.models.losses.priors.betainc_table`
            of (a, b), float32 on the CPU.
        a, b (float): The shape parameters.
        log_beta (float): ``log B(a, b)``.
        eps (float): The density is evaluated on ``[eps, 1 - eps]``.

    Returns:
        tuple[Tensor, Tensor] | None: CDF and density, shaped like ``x``;
        None where the compiled version does not apply.
    """
    function = float32_function(_SIGNATURES, 'beta_cdf_pdf', x, table)
    if function is None:
        return None
    low, high, pdf_low, pdf_high = _density_ends(a, b, log_beta, eps)
    cdf, pdf = torch.empty_like(x), torch.empty_like(x)
    function(pointer(x), x.numel(), pointer(table), table.shape[1], a, b,
             log_beta, low, high, pdf_low, pdf_high, pointer(cdf),
             pointer(pdf), torch.get_num_threads())
    return cdf, pdf


def cramer_von_mises_sorted(cdf: torch.Tensor, pdf: torch.Tensor,
                            order: torch.Tensor, scale: float,
                            with_gradient: bool
                            ) -> Optional[Tuple[torch.Tensor,
                                                Optional[torch.Tensor]]]:
    """Eq. (2) (lambda = 1) over the columns of sorted values, and its
    gradient, in one compiled pass.

    Args:
        cdf (Tensor): ``(N, C)`` prior CDF at each column's sorted values,
            float32.
        pdf (Tensor): ``(N, C)`` prior density there, float32.
        order (Tensor): ``(N, C)`` rows the sorted values came from (as
            ``torch.sort`` gives them), int64.
        scale (float): Factor of the sum over the columns (1 to sum them,
            1 / C to average).
        with_gradient (bool): Whether to compute the gradient.

    Returns:
        tuple[Tensor, Tensor | None] | None: The value (a float32 scalar)
        and the ``(N, C)`` gradient with respect to the unsorted values
        (None without ``with_gradient``); None where the compiled version
        does not apply.
    """
    function = float32_function(_SIGNATURES, 'cramer_von_mises_sorted', cdf,
                                pdf)
    if function is None or order.dtype != torch.long \
            or order.device.type != 'cpu' or not order.is_contiguous():
        return None
    gradient = torch.empty_like(cdf) if with_gradient else None
    n, columns = cdf.shape
    value = function(pointer(cdf), pointer(pdf), pointer(order), n, columns,
                     scale, pointer(gradient))
    return torch.tensor(value, dtype=cdf.dtype), gradient
