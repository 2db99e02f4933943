"""Compiled training forward and backward of the gating module and of the
gated ReLU (``csrc/gate_training.c``), and of the batch norm and gated ReLU
of a gated map together (``csrc/batch_norm_gated_relu.c``).

These are the inner loops of :mod:`mmgated.models.fused_gate` and
:mod:`mmgated.models.gated_relu`, which hold the autograd functions and
compute the same with PyTorch operations wherever these return None: no
compiled library, tensors that are not contiguous float32 on the CPU.
Arguments are not validated beyond that: the callers build them.
"""
import ctypes
from typing import Optional, Tuple

import torch

from .native import float32_function, native_function, pointer

_P, _L, _D, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_double, ctypes.c_int

_SIGNATURES = dict(
    gate_train_workspace_size=([_L] * 4, _L),
    gate_train_forward=([_P, _L, _L, _L, _P, _L, _P, _P, _P, _P, _D, _D, _P,
                         _P, _L, _P, _D] + [_P] * 4 + [_I], ctypes.c_int),
    gate_train_backward=([_L] * 5 + [_P] * 10 + [_D] + [_P] * 6, None),
    gated_relu_forward=([_P, _P, _L, _L, _P, _I], None),
    gated_relu_backward=([_P, _P, _P, _L, _L, _P, _P, _I], None),
    bn_gated_relu_forward=([_P, _P, _L, _L, _L, _P, _P, _D, _P, _P, _D] +
                           [_P] * 3 + [_I], None),
    bn_gated_relu_backward=([_P, _P, _P, _L, _L, _L] + [_P] * 8 + [_I],
                            None),
)


def gate_train_forward(x, noise, fc1_weight, norm_weight, norm_bias,
                       running_mean, running_var, momentum: float, eps: float,
                       fc2_weight, fc2_bias, tau: float
                       ) -> Optional[Tuple[torch.Tensor, ...]]:
    """One compiled call of the gating module's training forward.

    Returns:
        tuple[Tensor, ...] | None: ``(logits, probs, relaxed, gates)`` and
        what the backward needs, a float32 workspace (see
        :func:`gate_train_backward`); None where the compiled version does
        not apply.
    """
    function = float32_function(_SIGNATURES, 'gate_train_forward', x, noise,
                                fc1_weight, norm_weight, norm_bias,
                                running_mean, running_var, fc2_weight,
                                fc2_bias)
    if function is None or x.dim() != 4 or x.shape[0] < 2:
        return None
    n, c, height, width = x.shape
    hidden, out = fc1_weight.shape[0], fc2_weight.shape[0]
    # What the backward needs, in one workspace laid out by the C code.
    workspace = x.new_empty(native_function(
        'gate_train_workspace_size',
        *_SIGNATURES['gate_train_workspace_size'])(n, c, hidden, out))
    # Separate tensors (not views of one): they become autograd outputs.
    logits, relaxed, gates = (x.new_empty((n, out)) for _ in range(3))
    status = function(
        pointer(x), n, c, height * width, pointer(fc1_weight), hidden,
        pointer(norm_weight), pointer(norm_bias), pointer(running_mean),
        pointer(running_var), momentum, eps, pointer(fc2_weight),
        pointer(fc2_bias), out, pointer(noise), tau, pointer(workspace),
        pointer(logits), pointer(relaxed), pointer(gates),
        torch.get_num_threads())
    if status != 0:
        return None
    # PyTorch's vectorised sigmoid beats a scalar expf in C.
    probs = torch.sigmoid(logits)
    relaxed.sigmoid_()
    return logits, probs, relaxed, gates, workspace


def gate_train_backward(grads, probs, relaxed, workspace, fc1_weight,
                        norm_weight, fc2_weight, tau: float, input_shape,
                        needs):
    """The compiled backward of :func:`gate_train_forward`.

    Args:
        grads (tuple): Gradients of logits, probs, relaxed and gates (any
            may be None).
        probs, relaxed (Tensor): The forward's outputs.
        workspace (Tensor): The forward's workspace.
        input_shape (tuple): ``(N, C, H, W)`` of the forward's input.
        needs (tuple[bool]): Whether the gradients of pooled x, fc1 weight,
            norm weight, norm bias, fc2 weight and fc2 bias are needed.

    Returns:
        list[Tensor | None]: Those six gradients (the first one already
        divided by H*W).
    """
    # The gradients of float32 CPU outputs are float32 CPU tensors: no
    # check of their type is needed, only of their layout.
    grads = [None if g is None else g.contiguous() for g in grads]
    function = native_function('gate_train_backward',
                               *_SIGNATURES['gate_train_backward'])
    n, c, height, width = input_shape
    hidden, out = fc1_weight.shape[0], fc2_weight.shape[0]
    shapes = ((n, c), (hidden, c), (hidden, ), (hidden, ), (out, hidden),
              (out, ))
    results = [probs.new_empty(s) if need else None
               for s, need in zip(shapes, needs)]
    function(n, c, height * width, hidden, out, *map(pointer, grads),
             pointer(workspace), pointer(probs), pointer(relaxed),
             pointer(fc1_weight), pointer(norm_weight), pointer(fc2_weight),
             tau, *map(pointer, results))
    return results


def gated_relu_forward(x, gates) -> Optional[torch.Tensor]:
    """``relu(x) * gates`` in one compiled pass (``x`` is only read); None
    where the compiled version does not apply."""
    function = float32_function(_SIGNATURES, 'gated_relu_forward', x, gates)
    if function is None:
        return None
    out = torch.empty_like(x)
    n, c, height, width = x.shape
    function(pointer(x), pointer(gates), n * c, height * width, pointer(out),
             torch.get_num_threads())
    return out


def gated_relu_backward(grad_out, x, gates, need_x: bool, need_gates: bool):
    """``(grad_x, grad_gates)`` of :func:`gated_relu_forward` in one
    compiled pass (None for what is not needed); None where the compiled
    version does not apply."""
    grad_out = grad_out.contiguous()
    function = float32_function(_SIGNATURES, 'gated_relu_backward', grad_out,
                                x, gates)
    if function is None:
        return None
    n, c, height, width = x.shape
    grad_x = torch.empty_like(x) if need_x else None
    grad_gates = gates.new_empty((n, c)) if need_gates else None
    function(pointer(grad_out), pointer(x), pointer(gates), n * c,
             height * width, pointer(grad_x), pointer(grad_gates),
             torch.get_num_threads())
    return grad_x, grad_gates


def batch_norm_gated_relu_forward(x, gates, weight, bias, running_mean,
                                  running_var, factor: float, eps: float
                                  ) -> Optional[Tuple[torch.Tensor, ...]]:
    """``relu(batch_norm(x)) * gates`` with the batch's statistics, in one
    compiled call that also moves the running statistics (if given) by
    ``factor``.

    Returns:
        tuple[Tensor, Tensor, Tensor] | None: The output, the batch mean and
        the inverse standard deviation (what the backward needs, with
        ``x``); None where the compiled version does not apply.
    """
    function = float32_function(_SIGNATURES, 'bn_gated_relu_forward', x,
                                gates, weight, bias, running_mean,
                                running_var)
    if function is None or x.dim() != 4:
        return None
    n, c, height, width = x.shape
    out = torch.empty_like(x)
    mean, invstd = x.new_empty(c), x.new_empty(c)
    function(pointer(x), pointer(gates), n, c, height * width,
             pointer(weight), pointer(bias), eps, pointer(running_mean),
             pointer(running_var), factor, pointer(mean), pointer(invstd),
             pointer(out), torch.get_num_threads())
    return out, mean, invstd


def batch_norm_gated_relu_backward(grad_out, x, gates, weight, bias, mean,
                                   invstd, needs):
    """The compiled backward of :func:`batch_norm_gated_relu_forward`.

    Args:
        needs (tuple[bool]): Whether the gradients of ``x``, ``weight``,
            ``bias`` and ``gates`` are needed.

    Returns:
        list[Tensor | None]: Those four gradients (None where not needed).
    """
    grad_out = grad_out.contiguous()
    function = native_function('bn_gated_relu_backward',
                               *_SIGNATURES['bn_gated_relu_backward'])
    n, c, height, width = x.shape
    grads = [x.new_empty(t.shape) if need else None
             for t, need in zip((x, weight, bias, gates), needs)]
    function(pointer(grad_out), pointer(x), pointer(gates), n, c,
             height * width, pointer(weight), pointer(bias), pointer(mean),
             pointer(invstd), *map(pointer, grads), torch.get_num_threads())
    return grads
