"""Conditional MAC accounting of gated networks.

The dense network is counted by mmengine's complexity analyzer
(``mmengine.analysis.FlopAnalyzer``, which counts one multiply-accumulate as
one "flop", and a BatchNorm in eval mode as 2 per element), so the dense
figure of a gated model is the analyzer's figure of its dense counterpart.
The analyzer always traces the ``'mask'`` execution of the gated blocks (all
channels computed); the per-sample figures below hold for ``'skip'``
execution as well, which computes exactly the open channels.

The gating modules are counted by the same analyzer plus their global
average pooling (one addition per pooled element), which the analyzer
ignores (``aten::mean`` has no handle) but the paper includes in its
0.018 % - 0.087 % overhead per block.

The per-sample savings of the gates are computed from the convolution shapes
of the gated blocks, the recorded gate decisions and the recorded input size
of each gate (:class:`~mmgated.models.GateOutput`); nothing here runs inside
a model's forward. A convolution between an
input gate and an output gate costs
``open_in * open_out * kh * kw * H_out * W_out / groups`` MACs for a sample,
and a BatchNorm right after a convolution with gated outputs is skipped for
the closed channels (2 MACs per element, as the analyzer counts it; other
norm layers are conservatively left in). Elementwise
work that the analyzer does not count (ReLU, the gate multiplication) is not
counted either.
"""
from collections import Counter
from contextlib import contextmanager
from typing import Dict, List, Mapping

import torch
import torch.nn as nn
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape
from mmengine.model import is_model_wrapper

from ..models.blocks import conv_output_size, is_gated_block
from ..models.gates import clear_gates, collect_gates, gate_modules

# Key under which the gates' global average pooling is counted.
POOL_OP = 'gate_pool'


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def _mean_handle(inputs: List, outputs: List) -> Counter:
    # One addition per reduced element; the final division per channel is
    # negligible and left out, as for average pooling in the analyzer.
    shape = get_shape(inputs[0])
    numel = 1
    for size in shape or ():
        numel *= size
    return Counter({POOL_OP: numel})


def _analyze(module: nn.Module, inputs: tuple,
             count_mean: bool = False) -> FlopAnalyzer:
    analyzer = FlopAnalyzer(module, inputs)
    if count_mean:
        analyzer.set_op_handle('aten::mean', _mean_handle)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    return analyzer


@contextmanager
def _mask_execution(model: nn.Module):
    """Run gated blocks in ``'mask'`` execution for the analyzer's trace.

    In ``'skip'`` execution a block computes only the open channels of the
    traced batch, so the analyzer would count a conditional network as the
    dense one (and the savings would then be taken off twice).
    """
    switched = [(block, block.skip_runner) for block in model.modules()
                if is_gated_block(block) and block.skip_runner is not None]
    for block, _ in switched:
        block.skip_runner = None
    try:
        yield
    finally:
        for block, runner in switched:
            block.skip_runner = runner


def _check_inputs(inputs) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        shape = tuple(inputs.shape) if isinstance(inputs,
                                                  torch.Tensor) else None
        raise ValueError('inputs must be a (N, C, H, W) tensor, got '
                         f'{type(inputs).__name__} of shape {shape}')
    if inputs.shape[0] < 1:
        raise ValueError('inputs must hold at least one sample, got an '
                         'empty batch')


def dense_macs(model: nn.Module, inputs: torch.Tensor) -> Dict[str, float]:
    """MACs per sample of a model's inference forward, by mmengine's
    analyzer.

    The model is traced in eval mode and ``'mask'`` execution; both are
    restored afterwards.

    Args:
        model (nn.Module): A backbone, classifier or segmentor; called as
            ``model(inputs)`` (mode ``'tensor'`` for mm* models).
        inputs (Tensor): ``(N, 3, H, W)``.

    Returns:
        dict: ``total`` (the dense network plus the gating modules, per
        sample), ``gating`` (the share of the gating modules, their global
        average pooling included) and ``dense`` (``total - gating``: what
        the analyzer counts for the dense counterpart of the model).
    """
    _check_inputs(inputs)
    model = _unwrap(model)
    # Eval mode: the inference network, and a trace that leaves the BN
    # running statistics alone.
    was_training = model.training
    model.eval()
    try:
        with _mask_execution(model), torch.no_grad():
            analyzer = _analyze(model, (inputs, ), count_mean=True)
            by_module = analyzer.by_module_and_operator()
    finally:
        model.train(was_training)
    n = inputs.shape[0]
    gates = list(gate_modules(model))
    gating = sum(sum(by_module.get(name, Counter()).values())
                 for name in gates)
    # Means outside the gates are not counted by the analyzer's defaults;
    # leave them out so that the dense figure stays the analyzer's.
    other_means = by_module.get('', Counter()).get(POOL_OP, 0) - sum(
        by_module.get(name, Counter()).get(POOL_OP, 0) for name in gates)
    total = analyzer.total() - other_means
    return dict(total=total / n, gating=gating / n,
                dense=(total - gating) / n)


def _norm_macs_per_element(norm: nn.Module) -> float:
    # What the analyzer counts for an eval-mode BatchNorm; other norms are
    # not taken off (conservative), see the module docstring.
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return 2.0 if norm.affine else 1.0
    return 0.0


def savings_from_counts(model: nn.Module,
                        open_counts: Mapping[str, torch.Tensor],
                        input_sizes: Mapping[str, tuple]) -> torch.Tensor:
    """Per-sample MACs that closed gates save.

    Args:
        model (nn.Module): A gated model.
        open_counts (Mapping[str, Tensor]): Gate module name (as
            :func:`~mmgated.models.collect_gates` names it) to the ``(N, )``
            number of open channels of each sample.
        input_sizes (Mapping[str, tuple]): Gate module name to the ``(H, W)``
            of the block input the gate saw.

    Returns:
        Tensor: ``(N, )`` float64, on the CPU.

    Raises:
        ValueError: The model has no gated block.
        KeyError: A gate of a gated block has no record.
    """
    savings, gated_any = None, False
    for block_name, block in _unwrap(model).named_modules():
        if not is_gated_block(block):
            continue
        prefix = f'{block_name}.' if block_name else ''
        gated_any = True
        names = [n for n in block.gate_names if hasattr(block, n)]
        if not names:
            continue  # a compact block whose channels are all static
        missing = [prefix + n for n in names if prefix + n not in open_counts]
        if missing:
            raise KeyError(f'no gate record of {missing}; run a forward pass '
                           'of the model first')
        sizes = block.gated_map_sizes(input_sizes[prefix + names[0]])
        for index, (conv, in_gate, out_gate) in enumerate(block.gated_convs()):
            if in_gate is None and out_gate is None:
                continue
            n_in = open_counts[prefix + in_gate].double() if in_gate \
                else float(conv.in_channels)
            n_out = open_counts[prefix + out_gate].double() if out_gate \
                else float(conv.out_channels)
            out_h, out_w = sizes[out_gate] if out_gate else \
                conv_output_size(conv, *sizes[in_gate])
            kh, kw = conv.kernel_size
            unit = kh * kw * out_h * out_w / conv.groups
            saved = (conv.in_channels * conv.out_channels - n_in * n_out) \
                * unit
            if out_gate is not None:
                # The norm after this conv is skipped for closed channels.
                norm = getattr(block, f'norm{index + 1}', None)
                per_element = _norm_macs_per_element(norm)
                saved = saved + (conv.out_channels - n_out) \
                    * per_element * out_h * out_w
            savings = saved if savings is None else savings + saved
    if savings is None and gated_any:
        rows = next(iter(open_counts.values())).shape[0] if open_counts \
            else 1
        return torch.zeros(rows, dtype=torch.float64)
    if savings is None:
        raise ValueError(f'{type(_unwrap(model)).__name__} has no gated '
                         'block; its MAC savings need a gated model')
    return savings.cpu()


def gated_savings(model: nn.Module) -> torch.Tensor:
    """Per-sample MACs that the closed gates of the model's last forward
    pass saved (:func:`savings_from_counts` of what
    :func:`~mmgated.models.collect_gates` reads).

    Returns:
        Tensor: ``(N, )`` float64, on the CPU.
    """
    gates = collect_gates(model)
    return savings_from_counts(
        model, {n: g.gates.detach().sum(1) for n, g in gates.items()},
        {n: g.input_size for n, g in gates.items()})


class MacCounter:
    """MACs of a gated model's predictions, from their gate records.

    The dense figure is counted by one trace of the model per input shape
    (cached); each sample's conditional figure is that minus the savings of
    its closed gates (:func:`savings_from_counts`).

    Args:
        model (nn.Module): The gated model whose predictions are counted.
    """

    def __init__(self, model: nn.Module):
        self.model = _unwrap(model)
        self._dense = {}

    def dense(self, input_shape) -> Dict[str, float]:
        """:func:`dense_macs` for one input of shape ``(C, H, W)``."""
        input_shape = tuple(int(s) for s in input_shape)
        if input_shape not in self._dense:
            param = next(self.model.parameters())
            inputs = torch.zeros((1, ) + input_shape, device=param.device,
                                 dtype=param.dtype)
            self._dense[input_shape] = dense_macs(self.model, inputs)
        return self._dense[input_shape]

    def __call__(self, record: Mapping) -> Dict[str, float]:
        """The MACs of one prediction.

        Args:
            record (Mapping): Its ``gate_open`` (gate name to 0/1 vector),
                ``gate_input_sizes`` and ``model_input_shape``, as
                :meth:`GateLossMixin.predict` records them.

        Returns:
            dict: ``conditional_macs`` and ``dense_macs`` (float).
        """
        counted = self.dense(record['model_input_shape'])
        counts = {
            name: torch.as_tensor(value).reshape(1, -1).double().sum(1)
            for name, value in record['gate_open'].items()
        }
        saved = savings_from_counts(self.model, counts,
                                    record['gate_input_sizes'])
        return dict(conditional_macs=float(counted['total'] - saved[0]),
                    dense_macs=float(counted['dense']))


def _batch_size(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.shape[0]
    if isinstance(value, (tuple, list)) and value:
        return _batch_size(value[0])
    raise ValueError('cannot tell the batch size of an input of type '
                     f'{type(value).__name__}; pass batch_size')


@torch.no_grad()
def analyzer_macs(module: nn.Module, inputs, batch_size=None) -> float:
    """What mmengine's ``FlopAnalyzer`` counts for ``module(inputs)``, per
    sample, with its warnings silenced.

    Args:
        module (nn.Module): Any module.
        inputs (Tensor | tuple): Its input: a tensor, or a tuple of
            positional arguments (tensors or lists of tensors, such as the
            feature tuple of a head).
        batch_size (int, optional): Samples in ``inputs``. Default: the
            first dimension of the first tensor found.

    Returns:
        float
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs, )
    n = batch_size if batch_size is not None else _batch_size(inputs)
    return _analyze(module, inputs).total() / n


def aux_heads(model: nn.Module) -> List[nn.Module]:
    """The auxiliary heads of a segmentor (none for other models)."""
    aux = getattr(model, 'auxiliary_head', None)
    if aux is None:
        return []
    return list(aux) if isinstance(aux, nn.ModuleList) else [aux]


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
              modules) per sample, inference path only; equal to mmengine's
              ``FlopAnalyzer`` figure of the dense counterpart.
            - ``gating`` (float): MACs of the gating modules per sample,
              their global average pooling included.
            - ``per_sample`` (Tensor): ``(N, )`` float64 conditional MACs of
              each sample, gating modules included; with all gates open it
              is ``dense + gating``.
            - ``ratio`` (Tensor): ``per_sample / dense``.
            - ``aux_head`` (float): MACs per sample of a segmentor's
              auxiliary head(s), which run in training only (absent
              otherwise).

    Raises:
        ValueError: ``inputs`` is not a 4-D batch, or the model has no
            gates.
    """
    _check_inputs(inputs)
    model = _unwrap(model)
    if not gate_modules(model):
        raise ValueError(f'{type(model).__name__} has no ChannelGate; '
                         'count a dense model with mmengine.analysis.'
                         'FlopAnalyzer instead')
    was_training = model.training
    model.eval()
    try:
        counted = dense_macs(model, inputs)
        clear_gates(model)
        model(inputs)
        per_sample = counted['total'] - gated_savings(model)
        result = dict(
            dense=counted['dense'],
            gating=counted['gating'],
            per_sample=per_sample,
            ratio=per_sample / counted['dense'])
        heads = aux_heads(model)
        if heads and hasattr(model, 'extract_feat'):
            feats = model.extract_feat(inputs)
            result['aux_head'] = sum(
                _analyze(head, (feats, )).total()
                for head in heads) / inputs.shape[0]
    finally:
        model.train(was_training)
    return result


@torch.no_grad()
def block_gate_overhead(model: nn.Module,
                        inputs: torch.Tensor) -> List[dict]:
    """MACs of the gating modules of every gated block, against the block.

    The quantity of the paper's "between 0.018 % - 0.087 % of a ResNet block
    multiply-accumulate (MAC) usage" (section 4.1).

    Args:
        model (nn.Module): A gated model; run in eval mode on ``inputs``.
        inputs (Tensor): ``(N, 3, H, W)``.

    Returns:
        list[dict]: One row per gated block, in forward order: ``block``
        (module name), ``block_macs`` (dense block: convolutions, norms,
        downsample), ``gate_macs`` (its gating modules, pooling included),
        ``gate_fc_macs`` (the same without the pooling, i.e. what the
        analyzer counts by default), ``overhead`` (``gate_macs /
        block_macs``) and ``overhead_fc``; all MACs per sample.
    """
    _check_inputs(inputs)
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    try:
        with _mask_execution(model):
            analyzer = _analyze(model, (inputs, ), count_mean=True)
            by_module = analyzer.by_module_and_operator()
    finally:
        model.train(was_training)
    n = inputs.shape[0]
    rows = []
    for name, block in model.named_modules():
        if not is_gated_block(block):
            continue
        gate_names = [f'{name}.{g}' for g in block.gate_names
                      if hasattr(block, g)]
        gate_ops = sum((by_module.get(g, Counter()) for g in gate_names),
                       Counter())
        gate = sum(gate_ops.values()) / n
        gate_fc = gate - gate_ops.get(POOL_OP, 0) / n
        block_macs = sum(by_module.get(name, Counter()).values()) / n - gate
        rows.append(
            dict(
                block=name,
                block_macs=block_macs,
                gate_macs=gate,
                gate_fc_macs=gate_fc,
                overhead=gate / block_macs,
                overhead_fc=gate_fc / block_macs))
    return rows
