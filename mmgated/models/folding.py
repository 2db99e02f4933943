"""Inference-time folding of eval-mode BN layers, and the cache that keeps
the folded copies in step with the weights they come from."""
import torch
import torch.nn as nn


def bn_scale_shift(norm: nn.Module):
    """``(scale, shift)`` with ``norm(x) == x * scale + shift`` per channel,
    for a BN layer in eval mode (running statistics)."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def norm_sources(norm: nn.Module):
    """``(running_mean, running_var, weight, bias)`` of a BN layer (each
    possibly None): what a copy with the BN folded in depends on, and what
    the fused training gate updates and reads. Read from the module's own
    dicts: ``nn.Module.__getattr__`` costs about a microsecond a name, and
    these are read for every gate and gated layer of every forward."""
    buffers, params = norm._buffers, norm._parameters
    return (buffers.get('running_mean'), buffers.get('running_var'),
            params.get('weight'), params.get('bias'))


def count_training_batch(norm: nn.Module) -> float:
    """Advance the batch counter of a BN layer as its forward in training
    does and return the factor by which its running statistics then move:
    its momentum, or ``1 / batches`` for a cumulative average (0 where it
    tracks none). For the fused training paths, which update the running
    statistics themselves."""
    momentum = 0.0 if norm.momentum is None else norm.momentum
    batches = norm._buffers.get('num_batches_tracked') \
        if norm.track_running_stats else None
    if batches is not None:
        batches.add_(1)
        if norm.momentum is None:
            momentum = 1.0 / float(batches)
    return momentum


def cached_on(module: nn.Module, name: str, sources, build):
    """``build()`` cached on ``module`` (not in its state dict) under
    ``name`` until one of the tensors ``sources`` changes: an in-place
    update (optimizer step, ``load_state_dict``) bumps its version, a move
    or cast changes its storage. Built without gradient."""
    # A move, cast or replacement gives a tensor new storage; checked about
    # 50 times per forward of a skip-executed ResNet-34, so kept minimal.
    key = [None if t is None else (t.data_ptr(), t._version) for t in sources]
    cached = module.__dict__.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = module.__dict__[name] = (key, build())
    return cached[1]
