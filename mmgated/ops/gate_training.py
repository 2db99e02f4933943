"""Compiled training forward and backward of the gating module and of the
gated ReLU (``csrc/gate_training.c``).

These are the inner loops of :mod:`mmgated.models.fused_gate` and
:mod:`mmgated.models.gated_relu`, which hold the autograd functions and
compute the same with PyTorch operations wherever these return None: no
compiled library, tensors that are not contiguous float32 on the CPU.
Arguments are not validated beyond that: the callers build them.
"""
import ctypes
from typing import Optional, Tuple

import torch

from .native import native_function, pointer

_P, _L, _D, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_double, ctypes.c_int

_SIGNATURES = dict(
    gate_train_forward=([_P, _L, _L, _L, _P, _L, _P, _P, _P, _P, _D, _D, _P,
                         _P, _L, _P, _D] + [_P] * 7 + [_I], ctypes.c_int),
    gate_train_backward=([_L] * 5 + [_P] * 13 + [_D] + [_P] * 7, None),
    gated_relu_forward=([_P, _P, _L, _L, _P, _I], None),
    gated_relu_backward=([_P, _P, _P, _L, _L, _P, _P, _I], None),
    argsort_columns=([_P, _L, _L, _P, _P], None),
)
# Largest batch argsort_columns sorts: its network makes N * N / 2
# compare-exchanges, torch.sort about N * log(N) comparisons.
ARGSORT_MAX_ROWS = 64


def _function(name: str, *tensors):
    """The compiled function ``name`` if every given tensor (None allowed)
    is a contiguous float32 CPU tensor, else None."""
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type
                              != 'cpu' or not t.is_contiguous()):
            return None
    return native_function(name, *_SIGNATURES[name])


def gate_train_forward(x, noise, fc1_weight, norm_weight, norm_bias,
                       running_mean, running_var, momentum: float, eps: float,
                       fc2_weight, fc2_bias, tau: float
                       ) -> Optional[Tuple[torch.Tensor, ...]]:
    """One compiled call of the gating module's training forward.

    Returns:
        tuple[Tensor, ...] | None: ``(logits, probs, relaxed, gates)`` and
        what the backward needs, ``(pooled, xhat, active, invstd)``; None
        where the compiled version does not apply.
    """
    function = _function('gate_train_forward', x, noise, fc1_weight,
                         norm_weight, norm_bias, running_mean, running_var,
                         fc2_weight, fc2_bias)
    if function is None or x.dim() != 4 or x.shape[0] < 2:
        return None
    n, c, height, width = x.shape
    hidden, out = fc1_weight.shape[0], fc2_weight.shape[0]
    # Separate tensors (not views of one): they become autograd outputs.
    pooled = x.new_empty((n, c))
    xhat, active = (x.new_empty((n, hidden)) for _ in range(2))
    invstd = x.new_empty(hidden)
    logits, relaxed, gates = (x.new_empty((n, out)) for _ in range(3))
    status = function(
        pointer(x), n, c, height * width, pointer(fc1_weight), hidden,
        pointer(norm_weight), pointer(norm_bias), pointer(running_mean),
        pointer(running_var), momentum, eps, pointer(fc2_weight),
        pointer(fc2_bias), out, pointer(noise), tau, pointer(pooled),
        pointer(xhat), pointer(active), pointer(invstd), pointer(logits),
        pointer(relaxed), pointer(gates), torch.get_num_threads())
    if status != 0:
        return None
    # PyTorch's vectorised sigmoid beats a scalar expf in C.
    probs = torch.sigmoid(logits)
    relaxed.sigmoid_()
    return logits, probs, relaxed, gates, pooled, xhat, active, invstd


def gate_train_backward(grads, saved, fc1_weight, norm_weight, fc2_weight,
                        tau: float, input_hw: int, needs):
    """The compiled backward of :func:`gate_train_forward`.

    Args:
        grads (tuple): Gradients of logits, probs, relaxed and gates (any
            may be None).
        saved (tuple): ``(probs, relaxed, pooled, xhat, active, invstd)``.
        needs (tuple[bool]): Whether the gradients of pooled x, fc1 weight,
            norm weight, norm bias, fc2 weight and fc2 bias are needed.

    Returns:
        list[Tensor | None]: Those six gradients (the first one already
        divided by H*W).
    """
    probs, relaxed, pooled, xhat, active, invstd = saved
    grads = [None if g is None else g.float().contiguous() for g in grads]
    function = _function('gate_train_backward', *grads)
    n, c = pooled.shape
    hidden, out = xhat.shape[1], probs.shape[1]
    shapes = ((n, c), (hidden, c), (hidden, ), (hidden, ), (out, hidden),
              (out, ))
    results = [pooled.new_empty(s) if need else None
               for s, need in zip(shapes, needs)]
    scratch = pooled.new_empty(n * (out + 2 * hidden))
    function(n, c, input_hw, hidden, out, *map(pointer, grads),
             pointer(pooled), pointer(xhat), pointer(active), pointer(invstd),
             pointer(probs), pointer(relaxed), pointer(fc1_weight),
             pointer(norm_weight), pointer(fc2_weight), tau, pointer(scratch),
             *map(pointer, results))
    return results


def gated_relu_forward(x, gates) -> Optional[torch.Tensor]:
    """``x <- relu(x)`` in place and ``x * gates`` in one compiled pass;
    None where the compiled version does not apply."""
    function = _function('gated_relu_forward', x, gates)
    if function is None:
        return None
    out = torch.empty_like(x)
    n, c, height, width = x.shape
    function(pointer(x), pointer(gates), n * c, height * width, pointer(out),
             torch.get_num_threads())
    return out


def gated_relu_backward(grad_out, active, gates, need_x: bool,
                        need_gates: bool):
    """``(grad_x, grad_gates)`` of :func:`gated_relu_forward` in one
    compiled pass (None for what is not needed); None where the compiled
    version does not apply."""
    grad_out = grad_out.contiguous()
    function = _function('gated_relu_backward', grad_out, active, gates)
    if function is None:
        return None
    n, c, height, width = active.shape
    grad_x = torch.empty_like(active) if need_x else None
    grad_gates = gates.new_empty((n, c)) if need_gates else None
    function(pointer(grad_out), pointer(active), pointer(gates), n * c,
             height * width, pointer(grad_x), pointer(grad_gates),
             torch.get_num_threads())
    return grad_x, grad_gates


def sort_columns(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(x, dim=0)`` (values and indices, no gradient) of a 2-d
    tensor; for a few rows (a CPU batch of at most ``ARGSORT_MAX_ROWS``)
    one compiled sorting network, several times faster than ``torch.sort``
    along the first dimension. (Columns with NaN are not ordered as
    ``torch.sort`` orders them; a loss over them is NaN either way.)"""
    function = None
    if x.dim() == 2 and 0 < x.shape[0] <= ARGSORT_MAX_ROWS:
        function = _function('argsort_columns', x)
    if function is None:
        values, order = torch.sort(x.detach(), dim=0)
        return values, order
    order = torch.empty(x.shape, dtype=torch.long)
    # The network leaves the sorted values in the first half of its work.
    work = x.new_empty((2, ) + x.shape)
    function(pointer(x), x.shape[0], x.shape[1], pointer(work),
             pointer(order))
    return work[0], order
