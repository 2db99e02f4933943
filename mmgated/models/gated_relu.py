"""``relu(x) * gates``, the activation of a gated map, as one autograd node.

In mask execution a gated block computes ``relu(norm(conv(x)))`` and then
multiplies each sample's channels by its 0/1 gates. As two autograd nodes,
the backward pass reads and writes the full-size map three times more than
the dense block does: ``grad * gates`` for the map, ``grad * relu(x)`` and its
sum for the gates, then the ReLU's own backward. Fused, each direction is
one pass over the map (compiled, :mod:`mmgated.ops.gate_training`, for
contiguous float32 CPU maps): the forward writes ``relu(x)`` in place and
the product; the backward gives the map's gradient (``grad`` where ``x > 0``
and the gate is open) and the gates' (``sum_hw grad * relu(x)``) together.
Elsewhere the map's gradient is one ``threshold_backward`` against the
gated output, the call the dense block's ReLU makes, plus the gates'
product and sum.
"""
import torch

from ..ops.gate_training import gated_relu_backward, gated_relu_forward


class _GatedReLU(torch.autograd.Function):
    """ReLU in place on ``x``, then ``x * gates`` as a new tensor."""

    @staticmethod
    def forward(ctx, x, gates):
        ctx.set_materialize_grads(False)
        ctx.gates_dtype = gates.dtype
        gates = gates.to(x.dtype)
        out = gated_relu_forward(x, gates)  # one compiled pass
        if out is None:
            out = x.clamp_min_(0) * gates.view(*gates.shape, 1, 1)
        active = x
        # The activation is x, changed in place (as the dense block's
        # in-place ReLU does): autograd must know, and returned it must be.
        ctx.mark_dirty(x)
        ctx.save_for_backward(active, out, gates)
        return active, out

    @staticmethod
    def backward(ctx, grad_active, grad_out):
        if grad_active is not None:
            raise RuntimeError('gated_relu: the in-place activation is not '
                               'an output one may differentiate')
        if grad_out is None:
            return None, None
        active, out, gates = ctx.saved_tensors
        needs = ctx.needs_input_grad
        compiled = gated_relu_backward(grad_out, active, gates, needs[0],
                                       needs[1])
        if compiled is not None:
            grad_x, grad_gates = compiled
            return grad_x, None if grad_gates is None else grad_gates.to(
                ctx.gates_dtype)
        grad_x = grad_gates = None
        if needs[0]:
            grad_x = torch.ops.aten.threshold_backward(grad_out, out, 0)
        if needs[1]:
            grad_gates = (grad_out * active).sum((2, 3)).to(ctx.gates_dtype)
        return grad_x, grad_gates


def gated_relu(x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``relu(x) * gates[:, :, None, None]``, with ``x`` overwritten.

    Args:
        x (Tensor): ``(N, C, H, W)`` pre-activation map. Its values are
            replaced by ``relu(x)``, as an in-place ReLU does; no backward
            pass needs the pre-activation of a ReLU.
        gates (Tensor): ``(N, C)`` 0/1 gates, of any float dtype.

    Returns:
        Tensor: The gated activation, a new tensor of ``x``'s dtype. Its
        gradient reaches ``x`` and ``gates`` as that of the unfused
        expression does.
    """
    if x.dim() != 4 or gates.shape != x.shape[:2]:
        raise ValueError(f'gated_relu needs x of shape (N, C, H, W) and '
                         f'gates of shape (N, C); got {tuple(x.shape)} and '
                         f'{tuple(gates.shape)}')
    if torch.is_grad_enabled() and (x.requires_grad or gates.requires_grad):
        return _GatedReLU.apply(x, gates)[1]
    return x.clamp_min_(0).mul_(gates.to(x.dtype).view(*gates.shape, 1, 1))
