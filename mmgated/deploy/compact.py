"""A compact model: a trained gated model without its static channels.

:func:`count_open_gates` measures how often each gate opens on calibration
data; :func:`static_channels` sorts the channels into always on, always off
and conditional; :func:`compact_model` rewrites a copy of the model: the
always-off channels leave their convolutions, the always-on ones lose their
gate (see :mod:`mmgated.models.compact`). With the default threshold 1 (a
channel is static only if it was open, or closed, on every calibration
sample) the compact model computes the same outputs as the gated model on
the calibration data.
"""
import copy
from collections import OrderedDict
from numbers import Real
from typing import Dict, Iterable, Mapping, Tuple

import torch
import torch.nn as nn
from mmengine.model import is_model_wrapper

from ..models.compact import (check_compactable, gated_map_index,
                              shrink_gated_map)
from ..models.gates import gate_modules


def check_threshold(threshold) -> float:
    """``threshold`` as a float, or ``ValueError`` unless in [0.5, 1]."""
    if (isinstance(threshold, bool) or not isinstance(threshold, Real)
            or not 0.5 <= threshold <= 1):
        raise ValueError(f'threshold must be a number in [0.5, 1], got '
                         f'{threshold!r}')
    return float(threshold)


def _backbone(model: nn.Module) -> Tuple[nn.Module, str]:
    """The gated backbone of a model and its name prefix (``'backbone.'``,
    or ``''`` for a bare backbone)."""
    model = model.module if is_model_wrapper(model) else model
    backbone = getattr(model, 'backbone', None)
    if backbone is not None and hasattr(backbone, 'channel_layout'):
        return backbone, 'backbone.'
    if hasattr(model, 'channel_layout'):
        return model, ''
    raise ValueError(f'{type(model).__name__} has no gated backbone '
                     '(GatedResNet, GatedResNetV1c, GatedResNetCifar) to '
                     'compact')


@torch.no_grad()
def count_open_gates(model: nn.Module, batches: Iterable
                     ) -> Dict[str, Tuple[torch.Tensor, int]]:
    """How often each gate of ``model`` opens while ``batches`` run.

    A forward hook on every gating module counts its decisions, so each
    run of a gate counts once: a sliding-window segmentor counts every crop.

    Args:
        model (nn.Module): A gated model.
        batches (Iterable): Iterated to run the model (for example
            :func:`~mmgated.analysis.inference.iterate_predictions`); what
            it yields is ignored.

    Returns:
        OrderedDict[str, tuple[Tensor, int]]: Gate module name to the
        ``(C, )`` int64 number of runs each channel was open in and the
        number of runs.
    """
    counts = OrderedDict()

    def hook(name):
        def count(module, inputs, gates):
            opened = (gates > 0).sum(0).cpu()
            total, runs = counts.get(name, (0, 0))
            counts[name] = (opened + total, runs + gates.shape[0])
        return count

    handles = [gate.register_forward_hook(hook(name))
               for name, gate in gate_modules(model).items()]
    try:
        for _ in batches:
            pass
    finally:
        for handle in handles:
            handle.remove()
    return counts


def static_channels(open_rate: torch.Tensor, threshold: float = 1.0
                    ) -> Dict[str, torch.Tensor]:
    """Sort the channels of one gate by how often they opened.

    A channel is *always on* if it opened for at least ``threshold`` of the
    inputs, *always off* if it was closed for at least ``threshold`` of them
    (and is not always on; at 0.5 every channel is static) and
    *conditional* otherwise. With threshold 1, static means on (off) for
    every input.

    Args:
        open_rate (Tensor): ``(C, )`` fraction of the inputs each channel
            was open for.
        threshold (float): In [0.5, 1]. Default: 1.

    Returns:
        dict: ``always_on``, ``conditional``, ``always_off``: bool masks.
    """
    threshold = check_threshold(threshold)
    open_rate = torch.as_tensor(open_rate, dtype=torch.float64)
    always_on = open_rate >= threshold
    always_off = (1 - open_rate >= threshold) & ~always_on
    return OrderedDict(
        always_on=always_on,
        conditional=~(always_on | always_off),
        always_off=always_off)


def _check_open_rates(gates: Mapping, open_rates: Mapping) -> dict:
    missing = [name for name in gates if name not in open_rates]
    unknown = [name for name in open_rates if name not in gates]
    if missing or unknown:
        raise ValueError(
            'open_rates must name every gate of the model, by module name: '
            f'missing {missing[:3]}, unknown {unknown[:3]}; the gates are '
            f'{list(gates)[:3]}, ...')
    rates = {}
    for name, gate in gates.items():
        rate = torch.as_tensor(open_rates[name], dtype=torch.float64)
        rate = rate.detach().cpu().reshape(-1)
        if rate.numel() != gate.out_channels or not bool(
                ((rate >= 0) & (rate <= 1)).all()):
            raise ValueError(
                f'open_rates[{name!r}] must hold {gate.out_channels} '
                f'fractions in [0, 1], got {rate.numel()} values in '
                f'[{float(rate.min()) if rate.numel() else None}, '
                f'{float(rate.max()) if rate.numel() else None}]')
        rates[name] = rate
    return rates


def check_model_compactable(model: nn.Module) -> None:
    """Raise ``ValueError`` unless :func:`compact_model` can rewrite every
    block of ``model`` that has a gate (see
    :func:`~mmgated.models.compact.check_compactable`)."""
    _backbone(model)
    names = {name.rpartition('.')[0] for name in gate_modules(model)}
    model = model.module if is_model_wrapper(model) else model
    for name in sorted(names):
        check_compactable(model.get_submodule(name), name)


def compact_model(model: nn.Module,
                  open_rates: Mapping[str, torch.Tensor],
                  threshold: float = 1.0) -> nn.Module:
    """A copy of a gated model without its static channels.

    Each gate's channels are sorted by :func:`static_channels`; the always
    off ones are removed, the always-on ones kept without gate, the
    conditional ones keep their learned gate. A gate whose channels are all
    off keeps one channel whose input weights in the next convolution are
    zero (a convolution needs a channel; its output is the same). The copy's
    backbone records the result in ``channel_layout``, which a config needs
    to build the compact model.

    Args:
        model (nn.Module): A gated classifier, segmentor or backbone,
            unchanged by the call.
        open_rates (Mapping[str, Tensor]): Gate module name (as
            :func:`~mmgated.models.gate_modules` names it) to the ``(C, )``
            fraction of the calibration inputs each channel was open for;
            from :func:`count_open_gates`.
        threshold (float): See :func:`static_channels`. Default: 1.

    Returns:
        nn.Module: The compact model, in the input's training mode.

    Raises:
        ValueError: The model has no gate, a block the compaction cannot
            rewrite (see :func:`~mmgated.models.compact.check_compactable`),
            or ``open_rates`` or ``threshold`` do not fit.
    """
    threshold = check_threshold(threshold)
    _, prefix = _backbone(model)
    gates = gate_modules(model)
    if not gates:
        raise ValueError(f'{type(model).__name__} has no gate left to '
                         'compact')
    rates = _check_open_rates(gates, open_rates)
    check_model_compactable(model)
    compact = copy.deepcopy(model.module if is_model_wrapper(model) else
                            model)
    backbone, _ = _backbone(compact)
    layout = OrderedDict(backbone.channel_layout)
    for name, rate in rates.items():
        block_name, _, gate_name = name.rpartition('.')
        block = compact.get_submodule(block_name)
        kind = static_channels(rate, threshold)
        conditional = torch.nonzero(kind['conditional']).flatten()
        keep = torch.cat([conditional,
                          torch.nonzero(kind['always_on']).flatten()])
        all_off = keep.numel() == 0
        if all_off:
            keep = torch.zeros(1, dtype=torch.long)
        consumer = f'conv{gated_map_index(block, gate_name) + 2}'
        shrink_gated_map(block, gate_name, keep, conditional.numel())
        if all_off:
            getattr(block, consumer).weight.data.zero_()
        layout[name[len(prefix):]] = [keep.numel(), conditional.numel()]
    backbone.channel_layout = dict(layout)
    return compact


def open_rates_from_counts(counts: Mapping[str, Tuple[torch.Tensor, int]]
                           ) -> Dict[str, torch.Tensor]:
    """Open rates from :func:`count_open_gates`: ``open / runs``."""
    rates = OrderedDict()
    for name, (opened, runs) in counts.items():
        if runs < 1:
            raise ValueError(f'gate {name!r} never ran')
        rates[name] = opened.double() / runs
    return rates
