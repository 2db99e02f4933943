"""Conditional MAC accounting of gated networks.

The dense network is counted by mmengine's complexity analyzer
(``mmengine.analysis.FlopAnalyzer``, which counts one multiply-accumulate as
one "flop"); the per-sample savings of the gates are computed from the
convolution shapes of the gated blocks and the recorded gate decisions:
a convolution between an input gate and an output gate costs
``open_in * open_out * kh * kw * H_out * W_out`` MACs for a sample.
Elementwise work on closed channels (BN, ReLU) is still counted, as the
analyzer counts it, so the conditional figure is slightly conservative.
"""
from typing import Dict

import torch
import torch.nn as nn
from mmengine.analysis import FlopAnalyzer
from mmengine.model import is_model_wrapper

from ..models.blocks import conv_output_size, is_gated_block
from ..models.gates import clear_gates, gate_modules


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def _analyze(module: nn.Module, inputs: tuple) -> FlopAnalyzer:
    analyzer = FlopAnalyzer(module, inputs)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    return analyzer


def dense_macs(model: nn.Module, inputs: torch.Tensor) -> Dict[str, float]:
    """MACs per sample of a model's inference forward, by mmengine's
    analyzer.

    Args:
        model (nn.Module): A backbone, classifier or segmentor; called as
            ``model(inputs)`` (mode ``'tensor'`` for mm* models).
        inputs (Tensor): ``(N, 3, H, W)``.

    Returns:
        dict: ``total`` (everything the forward ran, per sample) and
        ``gating`` (the share of the gating modules).
    """
    model = _unwrap(model)
    analyzer = _analyze(model, (inputs, ))
    by_module = analyzer.by_module()
    n = inputs.shape[0]
    gating = sum(by_module.get(name, 0) for name in gate_modules(model))
    return dict(total=analyzer.total() / n, gating=gating / n)


def gated_savings(model: nn.Module) -> torch.Tensor:
    """Per-sample MACs the closed gates of the last forward pass saved.

    Args:
        model (nn.Module): A model whose gated blocks ran a forward pass.

    Returns:
        Tensor: ``(N, )`` float64, on the CPU.
    """
    savings = None
    for block in _unwrap(model).modules():
        if not is_gated_block(block):
            continue
        for conv, in_gate, out_gate in block.gated_convs():
            if in_gate is None and out_gate is None:
                continue
            gates = {}
            for role, name in (('in', in_gate), ('out', out_gate)):
                if name is not None:
                    gate = getattr(block, name)
                    if gate.output is None:
                        raise RuntimeError(f'gate {name} of a block did not '
                                           'run; run a forward pass first')
                    gates[role] = gate
            if out_gate is not None:
                out_h, out_w = gates['out'].map_size
            else:
                out_h, out_w = conv_output_size(conv,
                                                *gates['in'].map_size)
            kh, kw = conv.kernel_size
            unit = kh * kw * out_h * out_w / conv.groups
            n_in = gates['in'].output.gates.detach().double().sum(1).cpu() \
                if 'in' in gates else float(conv.in_channels)
            n_out = gates['out'].output.gates.detach().double().sum(1).cpu() \
                if 'out' in gates else float(conv.out_channels)
            dense = conv.in_channels * conv.out_channels * unit
            saved = dense - n_in * n_out * unit
            savings = saved if savings is None else savings + saved
    if savings is None:
        raise ValueError('the model has no gated block')
    return savings


@torch.no_grad()
def count_macs(model: nn.Module, inputs: torch.Tensor) -> dict:
    """Dense and per-sample conditional MACs of a gated model.

    The model runs in eval mode (deterministic gates) on ``inputs``; its
    training mode is restored afterwards. Gates forced with
    :func:`mmgated.models.force_gates` are counted as forced.

    Args:
        model (nn.Module): A gated backbone, classifier or segmentor.
        inputs (Tensor): ``(N, 3, H, W)`` input batch (already normalised as
            the model expects).

    Returns:
        dict:
            - ``dense`` (float): MACs of the dense network (no gating
              modules) per sample, inference path only.
            - ``gating`` (float): MACs of the gating modules per sample.
            - ``per_sample`` (Tensor): ``(N, )`` conditional MACs of each
              sample, gating modules included.
            - ``ratio`` (Tensor): ``per_sample / dense``.
            - ``aux_head`` (float): MACs per sample of a segmentor's
              auxiliary head, which runs in training only (absent
              otherwise).
    """
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    try:
        counted = dense_macs(model, inputs)
        clear_gates(model)
        model(inputs)
        savings = gated_savings(model)
        dense = counted['total'] - counted['gating']
        per_sample = dense + counted['gating'] - savings
        result = dict(
            dense=dense,
            gating=counted['gating'],
            per_sample=per_sample,
            ratio=per_sample / dense)
        aux = getattr(model, 'auxiliary_head', None)
        if aux is not None and hasattr(model, 'extract_feat'):
            feats = model.extract_feat(inputs)
            result['aux_head'] = _analyze(
                aux, (feats, )).total() / inputs.shape[0]
    finally:
        model.train(was_training)
    return result
