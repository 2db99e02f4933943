"""The inference of a gating module (pool, FC, ReLU, FC, decisions) in one
call.

:func:`gate_logits` computes, for an input ``x`` of shape ``(N, C, H, W)``,
``logits = relu(mean_hw(x) @ W1.T + b1) @ W2.T + b2`` and the hard gates
``logits > 0``, where ``W1, b1`` are the first FC with the BN of the hidden
layer folded in (see :meth:`mmgated.models.ChannelGate.forward`). Inside a
network the module's half dozen small PyTorch operations cost several times
their arithmetic; the compiled version (``csrc/gate_logits.c``, built on
first use, see :mod:`mmgated.ops.native`) is one call.
:func:`gate_logits_reference` computes the same with PyTorch operations, the
fallback without a compiler and for inputs the compiled version does not take
(not float32 or not on the CPU).
"""
import ctypes
from typing import Tuple

import torch

from .native import check_tensor, native_function, pointer


# The compiled function's argument types, in the order of its C signature.
_ARGTYPES = [
    ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
    ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.c_int
]


def gate_logits_reference(x: torch.Tensor, fc1_weight: torch.Tensor,
                          fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
                          fc2_bias: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`gate_logits` with PyTorch operations."""
    # The pooling's 1/(H*W) goes into the product.
    hidden = torch.addmm(fc1_bias, x.sum(dim=(2, 3)), fc1_weight.t(),
                         alpha=1.0 / (x.shape[2] * x.shape[3]))
    logits = torch.addmm(fc2_bias, hidden.relu_(), fc2_weight.t())
    return logits, (logits > 0).to(logits.dtype)


def gate_logits(x: torch.Tensor, fc1_weight: torch.Tensor,
                fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
                fc2_bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and hard 0/1 gates of a gating module at inference.

    Args:
        x (Tensor): Block input ``(N, C, H, W)``.
        fc1_weight (Tensor): ``(hidden, C)``, the first FC with the hidden
            layer's BN folded in.
        fc1_bias (Tensor): ``(hidden, )``.
        fc2_weight (Tensor): ``(out, hidden)``.
        fc2_bias (Tensor): ``(out, )``.

    Returns:
        tuple[Tensor, Tensor]: Logits ``(N, out)`` and gates ``(N, out)``
        (1.0 where the logit is > 0, else 0.0).

    Raises:
        ValueError: Shapes that do not fit together.
    """
    n, c = x.shape[:2] if x.dim() == 4 else (0, 0)
    hidden, out = fc1_weight.shape[0], fc2_weight.shape[0]
    if x.dim() != 4 or fc1_weight.shape != (hidden, c) \
            or fc1_bias.shape != (hidden, ) \
            or fc2_weight.shape != (out, hidden) \
            or fc2_bias.shape != (out, ):
        raise ValueError(
            f'gate_logits: x {tuple(x.shape)}, fc1 {tuple(fc1_weight.shape)} '
            f'+ {tuple(fc1_bias.shape)}, fc2 {tuple(fc2_weight.shape)} + '
            f'{tuple(fc2_bias.shape)} do not fit (N, C, H, W), (hidden, C), '
            '(hidden, ), (out, hidden), (out, )')
    # What the compiled version reads; the PyTorch one takes any layout.
    if x.device.type == 'cpu' and x.dtype == torch.float32 \
            and native_function('gate_logits', _ARGTYPES) is not None:
        for name, tensor, dim in (('fc1_weight', fc1_weight, 2),
                                  ('fc1_bias', fc1_bias, 1),
                                  ('fc2_weight', fc2_weight, 2),
                                  ('fc2_bias', fc2_bias, 1)):
            check_tensor('gate_logits', name, tensor, torch.float32, dim)
    return gate_logits_unchecked(x, fc1_weight, fc1_bias, fc2_weight,
                                 fc2_bias)


def gate_logits_unchecked(x: torch.Tensor, fc1_weight: torch.Tensor,
                          fc1_bias: torch.Tensor, fc2_weight: torch.Tensor,
                          fc2_bias: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`gate_logits` for arguments known to fit: the shapes agree and
    the weights are contiguous (as a gating module's folded weights are).
    Inside a network the checks of :func:`gate_logits` cost a fifth of the
    call."""
    function = None
    if x.device.type == 'cpu' and x.dtype == torch.float32 \
            and fc1_weight.dtype == torch.float32 \
            and fc1_weight.device.type == 'cpu':
        function = native_function('gate_logits', _ARGTYPES)
    if function is None:
        return gate_logits_reference(x, fc1_weight, fc1_bias, fc2_weight,
                                     fc2_bias)
    x = x.contiguous()
    n, c, height, width = x.shape
    hidden, out = fc2_weight.shape[1], fc2_weight.shape[0]
    logits = x.new_empty((n, out))
    gates = x.new_empty((n, out))
    function(pointer(x), n, c, height * width, pointer(fc1_weight),
             pointer(fc1_bias), hidden, pointer(fc2_weight),
             pointer(fc2_bias), out, pointer(logits), pointer(gates),
             torch.get_num_threads())
    return logits, gates
