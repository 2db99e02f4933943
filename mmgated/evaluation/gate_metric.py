"""Validation metric of conditional compute: MAC ratio and gate categories.
"""
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric

from ..registry import register_metric


def gate_categories(open_rate: np.ndarray, threshold: float = 0.99
                    ) -> Dict[str, np.ndarray]:
    """Classify gates as in the paper's Fig. 4.

    Args:
        open_rate (ndarray): Fraction of the inputs for which each gate was
            open.
        threshold (float): A gate open (closed) for more than this fraction
            of the inputs is always on (off). Default: 0.99.

    Returns:
        dict: ``always_on``, ``always_off`` and ``conditional`` boolean
        masks over the gates.
    """
    always_on = open_rate > threshold
    always_off = open_rate < 1 - threshold
    return dict(
        always_on=always_on,
        always_off=always_off,
        conditional=~(always_on | always_off))


def stage_of(gate_name: str) -> str:
    """The stage of a gate from its module name, e.g. ``'layer3'``."""
    match = re.search(r'(layer\d+)', gate_name)
    return match.group(1) if match else 'other'


def summarize_gate_records(records: Sequence[dict],
                           threshold: float = 0.99) -> OrderedDict:
    """The metrics of :class:`GateMetric` from per-sample records.

    Args:
        records (Sequence[dict]): Per sample ``gate_open`` (name to a 0/1
            vector), ``conditional_macs`` and ``dense_macs``.
        threshold (float): See :func:`gate_categories`.

    Returns:
        OrderedDict: ``mac_ratio`` (mean of conditional / dense MACs),
        ``mac_ratio_std``, ``mac_ratio_min``, ``mac_ratio_max``,
        ``mean_macs``, ``dense_macs``, ``gate_open_rate``, the fractions
        ``gates_always_on``, ``gates_always_off``, ``gates_conditional``,
        and the same fractions per stage as ``<stage>/gates_always_on`` etc.
    """
    if not records:
        raise ValueError('no gate records: the model is not a gated model '
                         'or its predictions carry no gate_open')
    ratios = np.array([r['conditional_macs'] / r['dense_macs']
                       for r in records])
    metrics = OrderedDict(
        mac_ratio=float(ratios.mean()),
        mac_ratio_std=float(ratios.std()),
        mac_ratio_min=float(ratios.min()),
        mac_ratio_max=float(ratios.max()),
        mean_macs=float(np.mean([r['conditional_macs'] for r in records])),
        dense_macs=float(records[0]['dense_macs']))
    names = list(records[0]['gate_open'])
    rates = {
        name: np.stack([np.asarray(r['gate_open'][name], dtype=np.float64)
                        for r in records]).mean(0)
        for name in names
    }
    all_rates = np.concatenate([rates[n] for n in names])
    metrics['gate_open_rate'] = float(all_rates.mean())
    for key, mask in gate_categories(all_rates, threshold).items():
        metrics[f'gates_{key}'] = float(mask.mean())
    stages = OrderedDict()
    for name in names:
        stages.setdefault(stage_of(name), []).append(rates[name])
    for stage, stage_rates in stages.items():
        cats = gate_categories(np.concatenate(stage_rates), threshold)
        for key, mask in cats.items():
            metrics[f'{stage}/gates_{key}'] = float(mask.mean())
    return metrics


@register_metric
class GateMetric(BaseMetric):
    """Conditional-compute metrics of a gated model on a validation set.

    Reads the gate records that :class:`GatedEncoderDecoder` and
    :class:`GatedImageClassifier` attach to their predictions and reports
    the mean MAC ratio (conditional / dense MACs of the inference network),
    its spread, and the fractions of gates that are always on, always off
    (on/off for more than ``threshold`` of the inputs, paper Fig. 4) or
    conditional, overall and per stage. Use it next to the task metric::

        val_evaluator = [dict(type='IoUMetric', iou_metrics=['mIoU']),
                         dict(type='GateMetric')]

    Args:
        threshold (float): Category threshold. Default: 0.99.
        collect_device (str): 'cpu' or 'gpu'. Default: 'cpu'.
        prefix (str, optional): Metric name prefix. Default: None.
    """

    default_prefix = 'gates'

    def __init__(self,
                 threshold: float = 0.99,
                 collect_device: str = 'cpu',
                 prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        if not 0.5 < threshold < 1:
            raise ValueError(f'threshold must be in (0.5, 1), got '
                             f'{threshold!r}')
        self.threshold = threshold

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            if 'gate_open' not in sample:
                continue
            self.results.append(
                dict(
                    gate_open={
                        k: v.numpy() if isinstance(v, torch.Tensor) else v
                        for k, v in sample['gate_open'].items()
                    },
                    conditional_macs=sample['conditional_macs'],
                    dense_macs=sample['dense_macs']))

    def compute_metrics(self, results: List[dict]) -> dict:
        return dict(summarize_gate_records(results, self.threshold))

