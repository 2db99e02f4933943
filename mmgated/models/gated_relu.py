"""``relu(x) * gates``, the activation of a gated map, as one autograd node.

In mask execution a gated block computes ``relu(norm(conv(x)))`` and then
multiplies each sample's channels by its 0/1 gates. As two autograd nodes,
the backward pass reads and writes the full-size map three times more than
the dense block does: ``grad * gates`` for the map, ``grad * relu(x)`` and its
sum for the gates, then the ReLU's own backward. Fused, each direction is
one pass over the map (compiled, :mod:`mmgated.ops.gate_training`, for
contiguous float32 CPU maps): the forward reads ``x`` and writes the
product, and keeps ``x`` itself for the backward (the ReLU needs no copy of
its own); the backward gives the map's gradient (``grad`` where ``x > 0``
and the gate is open) and the gates' (``sum_hw grad * relu(x)``) together.
Elsewhere the map's gradient is one ``threshold_backward`` against the
gated output, the call the dense block's ReLU makes, plus the gates'
product and sum. Where the C++ nodes of :mod:`mmgated.ops.training_nodes`
build, float32 CPU maps take that node instead of ``_GatedReLU``: the same
kernels, without Python in the backward pass.

In training the map comes straight from a batch norm, and
:func:`batch_norm_gated_relu` computes the two as one node: the norm's
statistics, the normalisation, the ReLU and the gates in one compiled call
each way, where PyTorch's CPU batch norm alone takes several times as long
as the passes over the map it needs.
"""
import torch

from ..ops.gate_training import (batch_norm_gated_relu_backward,
                                 batch_norm_gated_relu_forward,
                                 gated_relu_backward, gated_relu_forward)
from ..ops.native import float32_readable, native_available
from ..ops.training_nodes import training_nodes
from .folding import count_training_batch, norm_sources


class _GatedReLU(torch.autograd.Function):
    """``relu(x) * gates`` as a new tensor; ``x`` is kept, unchanged, for
    the backward."""

    @staticmethod
    def forward(ctx, x, gates):
        ctx.set_materialize_grads(False)
        ctx.gates_dtype = gates.dtype
        gates = gates.to(x.dtype)
        out = gated_relu_forward(x, gates)  # one compiled pass
        if out is None:
            out = x.clamp_min(0).mul_(gates.view(*gates.shape, 1, 1))
        ctx.save_for_backward(x, out, gates)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None
        x, out, gates = ctx.saved_tensors
        needs = ctx.needs_input_grad
        compiled = gated_relu_backward(grad_out, x, gates, needs[0], needs[1])
        if compiled is not None:
            grad_x, grad_gates = compiled
            return grad_x, None if grad_gates is None else grad_gates.to(
                ctx.gates_dtype)
        grad_x = grad_gates = None
        if needs[0]:
            grad_x = torch.ops.aten.threshold_backward(grad_out, out, 0)
        if needs[1]:
            grad_gates = (grad_out * x.clamp_min(0)).sum(
                (2, 3)).to(ctx.gates_dtype)
        return grad_x, grad_gates


def gated_relu(x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``relu(x) * gates[:, :, None, None]``.

    Args:
        x (Tensor): ``(N, C, H, W)`` pre-activation map, consumed as an
            in-place ReLU consumes its input: without autograd it is
            overwritten with the result (no new tensor); with autograd it
            is kept unchanged for the backward pass.
        gates (Tensor): ``(N, C)`` 0/1 gates, of any float dtype.

    Returns:
        Tensor: The gated activation, of ``x``'s dtype. Its gradient reaches
        ``x`` and ``gates`` as that of the unfused expression does.
    """
    if x.dim() != 4 or gates.shape != x.shape[:2]:
        raise ValueError(f'gated_relu needs x of shape (N, C, H, W) and '
                         f'gates of shape (N, C); got {tuple(x.shape)} and '
                         f'{tuple(gates.shape)}')
    if torch.is_grad_enabled() and (x.requires_grad or gates.requires_grad):
        nodes = training_nodes()
        if nodes is not None:
            out = nodes.gated_relu(x, gates)
            if out is not None:
                return out
        return _GatedReLU.apply(x, gates)
    return x.clamp_min_(0).mul_(gates.to(x.dtype).view(*gates.shape, 1, 1))


class _BatchNormGatedReLU(torch.autograd.Function):
    """``relu(batch_norm(x)) * gates`` with the batch's statistics; ``x`` and
    the statistics are kept for the backward, as the batch norm keeps
    them."""

    @staticmethod
    def forward(ctx, x, weight, bias, gates, running_mean, running_var,
                factor, eps):
        ctx.set_materialize_grads(False)
        ctx.gates_dtype = gates.dtype
        gates = gates.to(x.dtype).contiguous()
        out, mean, invstd = batch_norm_gated_relu_forward(
            x, gates, weight, bias, running_mean, running_var, factor, eps)
        ctx.save_for_backward(x, weight, bias, gates, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None, ) * 8
        x, weight, bias, gates, mean, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias, grad_gates = \
            batch_norm_gated_relu_backward(grad_out, x, gates, weight, bias,
                                           mean, invstd,
                                           ctx.needs_input_grad[:4])
        if grad_gates is not None:
            grad_gates = grad_gates.to(ctx.gates_dtype)
        return grad_x, grad_weight, grad_bias, grad_gates, None, None, None, \
            None


def _is_plain_batch_norm(norm) -> bool:
    """A plain (not synchronised) affine batch norm in training: one that
    normalises with the batch's statistics, as the fused node does."""
    return (isinstance(norm, torch.nn.modules.batchnorm._BatchNorm)
            and not isinstance(norm, torch.nn.SyncBatchNorm)
            and norm.training and norm.affine)


def batch_norm_gated_relu(x: torch.Tensor, norm: torch.nn.Module,
                          gates: torch.Tensor) -> torch.Tensor:
    """``gated_relu(norm(x), gates)``, as one autograd node where ``norm``
    is a plain batch norm in training and autograd records.

    The node updates the norm's running statistics and batch counter as its
    forward would. Elsewhere (other norms, evaluation, no autograd, maps
    the compiled code does not read, no compiled library) it is
    ``gated_relu(norm(x), gates)``.

    Args:
        x (Tensor): ``(N, C, H, W)`` map, the input of ``norm``.
        norm (nn.Module): The norm layer of the map.
        gates (Tensor): ``(N, C)`` 0/1 gates, of any float dtype.

    Returns:
        Tensor: The gated activation. Its gradient reaches ``x``, the norm's
        weight and bias, and ``gates``.
    """
    if torch.is_grad_enabled() and _is_plain_batch_norm(norm):
        running_mean, running_var, weight, bias = norm_sources(norm)
        batches = norm._buffers.get('num_batches_tracked')
        if not norm.track_running_stats:
            running_mean = running_var = batches = None
        nodes = training_nodes()
        if nodes is not None:
            # The C++ entry also advances the batch counter: each Python
            # operation here costs several times its work, right after a
            # convolution.
            out = nodes.batch_norm_gated_relu(x, gates, weight, bias,
                                              running_mean, running_var,
                                              batches, norm.momentum,
                                              norm.eps)
            if out is not None:
                return out
        # One value per channel has no batch variance: the norm raises.
        elif (x.dim() == 4 and gates.shape == x.shape[:2]
              and x.shape[0] * x.shape[2] * x.shape[3] > 1
              and float32_readable(x, weight, bias, running_mean,
                                   running_var)
              and native_available()):
            factor = count_training_batch(norm)
            return _BatchNormGatedReLU.apply(x, weight, bias, gates,
                                             running_mean, running_var,
                                             factor, norm.eps)
    return gated_relu(norm(x), gates)
