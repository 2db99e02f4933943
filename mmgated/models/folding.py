"""Inference-time folding of eval-mode BN layers, and the cache that keeps
the folded copies in step with the weights they come from."""
import torch
import torch.nn as nn


def is_foldable_bn(norm: nn.Module) -> bool:
    """Whether ``norm`` is a BN layer with running statistics, which
    :func:`bn_scale_shift` turns into a per-channel scale and shift."""
    return (isinstance(norm, nn.modules.batchnorm._BatchNorm)
            and norm.running_mean is not None)


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


def fold_bn(layer: nn.Module, norm: nn.Module):
    """Weight (contiguous) and bias of the one layer equal to
    ``norm(layer(x))``, for a convolution or linear layer followed by an
    eval-mode BN over its output channels."""
    scale, bias = bn_scale_shift(norm)
    if layer.bias is not None:
        bias = bias + layer.bias * scale
    scale = scale.view((-1, ) + (1, ) * (layer.weight.dim() - 1))
    return (layer.weight * scale).contiguous(), bias


def cached_fold_bn(layer: nn.Module, norm: nn.Module, name: str):
    """:func:`fold_bn` cached on ``layer`` under ``name`` (see
    :func:`cached_on`) until a weight or statistic of either changes."""
    # The modules' own dicts: nn.Module.__getattr__ costs about a
    # microsecond a name, and this runs for every folded layer of every
    # forward.
    params, buffers = layer._parameters, norm._buffers
    sources = (params['weight'], params.get('bias'),
               buffers.get('running_mean'), buffers.get('running_var'),
               norm._parameters.get('weight'), norm._parameters.get('bias'))
    return cached_on(layer, name, sources, lambda: fold_bn(layer, norm))
