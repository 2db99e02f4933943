"""The training forward of a :class:`~mmgated.models.gates.ChannelGate` as one
autograd node.

The gating module is about twenty operations on tensors of a few hundred
values: pooling, ``FC(c_in -> 16)``, BN, ReLU, ``FC(16 -> c)``, the Binary
Concrete sample and the probabilities. Recorded one by one, their dispatch
and autograd bookkeeping cost many times their arithmetic: about 1 ms per
gate and training step on a 2-core CPU, 3-5 % of a ResNet-34 step. Here
they are one autograd node with a hand-written backward pass, each
direction one compiled call (:mod:`mmgated.ops.gate_training`) for float32
CPU tensors and a handful of PyTorch operations otherwise. For float32 CPU
tensors the node is the C++ one of :mod:`mmgated.ops.training_nodes` where
that extension builds, else ``_TrainingGate`` here; the C++ entry also
draws the logistic noise (the values :func:`logistic_noise` draws, from
the same generator) and advances the norm's batch counter, Python
operations that cost some 30 µs each between two convolutions. The
results equal those of the module-by-module computation in
:meth:`ChannelGate.forward <mmgated.models.gates.ChannelGate.forward>`,
values, gradients and running statistics (``tests/test_training_ops.py``).
"""
import torch
from torch.autograd.function import once_differentiable

from ..ops.gate_training import gate_train_backward, gate_train_forward
from ..ops.training_nodes import training_nodes
from .folding import count_training_batch, norm_sources


def logistic_noise(shape, like: torch.Tensor) -> torch.Tensor:
    """Logistic(0, 1) noise ``log(u) - log(1 - u)`` of ``shape``, with the
    dtype and device of ``like``."""
    # logit(u) = log(u) - log(1 - u), with u kept in [1e-6, 1 - 1e-6]; in
    # place, as it runs for every gate of every training step.
    return torch.rand(shape, dtype=like.dtype,
                      device=like.device).logit_(eps=1e-6)


def _sigmoid_grad(s):
    return s * (1 - s)


def relaxed_sample_grad(grad_gates, grad_relaxed, relaxed, tau: float):
    """Gradient at the logits of a Binary Concrete sample, from those of its
    hard gates and relaxed values (either may be None): both are the
    relaxed sample's, ``sigmoid((logits + noise) / tau)`` (the hard gates'
    by the straight-through estimator). None if neither has one."""
    upstream = [g for g in (grad_gates, grad_relaxed) if g is not None]
    if not upstream:
        return None
    grad = upstream[0] if len(upstream) == 1 else upstream[0] + upstream[1]
    return grad * (_sigmoid_grad(relaxed) * (1.0 / tau))


class _TrainingGate(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, noise, fc1_weight, norm_weight, norm_bias,
                fc2_weight, fc2_bias, running_mean, running_var, momentum,
                eps, tau):
        ctx.set_materialize_grads(False)
        ctx.input_shape = x.shape
        ctx.eps = eps
        ctx.tau = tau
        compiled = gate_train_forward(x, noise, fc1_weight, norm_weight,
                                      norm_bias, running_mean, running_var,
                                      momentum, eps, fc2_weight, fc2_bias,
                                      tau)
        ctx.compiled = compiled is not None
        if ctx.compiled:
            logits, probs, relaxed, gates, workspace = compiled
            # An intermediate, not an input or output: kept on ctx.
            ctx.workspace = workspace
            ctx.save_for_backward(probs, relaxed, fc1_weight, norm_weight,
                                  fc2_weight)
            return logits, probs, relaxed, gates
        height, width = x.shape[2:]
        # As the module path pools: sum * 1/(H*W), so that both agree to
        # the last bit.
        pooled = x.sum(dim=(2, 3)) * (1.0 / (height * width))
        hidden = pooled.mm(fc1_weight.t())
        # native_batch_norm updates the running statistics as
        # F.batch_norm does.
        normed, save_mean, save_invstd = torch.native_batch_norm(
            hidden, norm_weight, norm_bias, running_mean, running_var, True,
            momentum, eps)
        active = normed.relu()
        logits = torch.addmm(fc2_bias, active, fc2_weight.t())
        probs = torch.sigmoid(logits)
        noisy = logits + noise
        relaxed = torch.sigmoid(noisy / tau)
        gates = (noisy > 0).to(logits.dtype)
        # The running statistics are not saved: the backward of a batch
        # norm in training uses the batch's, and the next forward may
        # update them before this backward runs.
        ctx.save_for_backward(probs, relaxed, pooled, hidden, active,
                              save_mean, save_invstd, fc1_weight,
                              norm_weight, fc2_weight)
        return logits, probs, relaxed, gates

    @staticmethod
    @once_differentiable
    def backward(ctx, *output_grads):
        needs = ctx.needs_input_grad
        grads = [None] * 12
        if all(g is None for g in output_grads):
            return tuple(grads)
        saved = ctx.saved_tensors
        fc1_weight, norm_weight, fc2_weight = saved[-3:]
        n, c, height, width = ctx.input_shape
        wanted = (needs[0], needs[2], needs[3], needs[4], needs[5], needs[6])
        if ctx.compiled:
            # The compiled backward applies wherever the forward did.
            computed = gate_train_backward(output_grads, *saved[:2],
                                           ctx.workspace, fc1_weight,
                                           norm_weight, fc2_weight, ctx.tau,
                                           ctx.input_shape, wanted)
        else:
            computed = _backward_torch(ctx, output_grads, saved, wanted)
        grad_pooled, grads[2], grads[3], grads[4], grads[5], grads[6] = \
            computed
        if grad_pooled is not None:
            # A broadcast view, as the backward of a sum returns.
            grads[0] = grad_pooled[:, :, None, None].expand(
                n, c, height, width)
        return tuple(grads)


def _backward_torch(ctx, output_grads, saved, wanted):
    """The backward pass with PyTorch operations."""
    grad_logits, grad_probs, grad_relaxed, grad_gates = output_grads
    probs, relaxed = saved[:2]
    fc1_weight, norm_weight, fc2_weight = saved[-3:]
    grad = grad_logits
    if grad_probs is not None:
        term = grad_probs * _sigmoid_grad(probs)
        grad = term if grad is None else grad + term
    term = relaxed_sample_grad(grad_gates, grad_relaxed, relaxed, ctx.tau)
    if term is not None:
        grad = term if grad is None else grad + term
    pooled, hidden, active, save_mean, save_invstd = saved[2:7]
    results = [None] * 6
    results[5] = grad.sum(0) if wanted[5] else None
    results[4] = grad.t().mm(active) if wanted[4] else None
    if not any(wanted[:4]):
        return results
    grad = grad.mm(fc2_weight).masked_fill_(active <= 0, 0)
    grad_hidden, results[2], results[3] = \
        torch.ops.aten.native_batch_norm_backward(
            grad, hidden, norm_weight, None, None, save_mean, save_invstd,
            True, ctx.eps, [wanted[0] or wanted[1], wanted[2], wanted[3]])
    if wanted[1]:
        results[1] = grad_hidden.t().mm(pooled)
    if wanted[0]:
        _, _, height, width = ctx.input_shape
        results[0] = grad_hidden.mm(fc1_weight) * (1.0 / (height * width))
    return results


def _modules_fuse(gate) -> bool:
    """Whether ``gate``'s layers are those the fused node computes: a plain
    (not synchronised) batch norm and ``fc1`` without bias."""
    # From the modules' dicts, as in fused_training_gate.
    modules = gate._modules
    norm = modules['norm']
    return (isinstance(norm, torch.nn.modules.batchnorm._BatchNorm)
            and not isinstance(norm, torch.nn.SyncBatchNorm)
            and modules['fc1']._parameters.get('bias') is None)


def _input_fuses(x: torch.Tensor) -> bool:
    """Whether the fused node takes ``x``: more than one sample (the batch
    variance), no autocast and no tracing (the MAC counters count the
    layers). The C++ entry checks the same."""
    return (x.dim() == 4 and x.shape[0] > 1
            and not torch.is_autocast_enabled(x.device.type)
            and not torch.jit.is_tracing())


def fused_training_gate(gate, x: torch.Tensor):
    """The training forward of ``gate`` on ``x`` as one autograd node,
    where it applies: a plain (not synchronised) batch norm, ``fc1``
    without bias, more than one sample, no autocast and no tracing. The
    running statistics of its norm are updated.

    Args:
        gate (ChannelGate): A gate in training mode.
        x (Tensor): Block input ``(N, C_in, H, W)``.

    Returns:
        tuple[Tensor, Tensor, Tensor, Tensor] | None: logits,
        probabilities, relaxed sample and hard gates (with the
        straight-through gradient), as
        :class:`~mmgated.models.gates.GateOutput` holds them; None where
        the node does not apply (nothing is drawn or updated then).
    """
    if not _modules_fuse(gate):
        return None
    # Parameters and buffers straight from the modules' dicts:
    # nn.Module.__getattr__ costs about a microsecond a name, a dozen names
    # for every gate of every training step.
    modules = gate._modules
    norm = modules['norm']
    fc2 = modules['fc2']._parameters
    running_mean, running_var, norm_weight, norm_bias = norm_sources(norm)
    batches = None
    if norm.track_running_stats:
        batches = norm._buffers.get('num_batches_tracked')
    else:
        running_mean = running_var = None
    fc1_weight = modules['fc1']._parameters['weight']
    nodes = training_nodes()
    if nodes is not None:
        # The C++ entry also draws the noise and advances the batch
        # counter: each Python operation here costs several times its
        # work, right after a convolution.
        outputs = nodes.training_gate(x, None, fc1_weight, norm_weight,
                                      norm_bias, fc2['weight'], fc2['bias'],
                                      running_mean, running_var, batches,
                                      norm.momentum, norm.eps, gate.tau)
        if outputs is not None:
            return outputs
    if not _input_fuses(x):
        return None
    noise = logistic_noise((x.shape[0], gate.out_channels), x)
    momentum = count_training_batch(norm)
    return _TrainingGate.apply(x, noise, fc1_weight, norm_weight, norm_bias,
                               fc2['weight'], fc2['bias'], running_mean,
                               running_var, momentum, norm.eps, gate.tau)
