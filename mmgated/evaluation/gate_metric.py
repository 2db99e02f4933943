"""Validation metric of conditional compute: MAC ratio and gate categories.
"""
import logging
import re
from collections import OrderedDict
from numbers import Real
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log

from ..registry import register_metric

CATEGORIES = ('always_on', 'conditional', 'always_off')


def _check_threshold(threshold) -> float:
    if (isinstance(threshold, bool) or not isinstance(threshold, Real)
            or not 0.5 <= threshold < 1):
        raise ValueError(f'threshold must be a number in [0.5, 1), got '
                         f'{threshold!r}')
    return float(threshold)


def gate_categories(open_rate: np.ndarray,
                    threshold: float = 0.99,
                    closed_rate: Optional[np.ndarray] = None
                    ) -> Dict[str, np.ndarray]:
    """Classify gates as in the paper's Fig. 4.

    A gate is *always on* (*always off*) if it is on (off) for more than
    ``threshold`` of the inputs, and *conditional* otherwise.

    Args:
        open_rate (ndarray): Fraction of the inputs for which each gate was
            open.
        threshold (float): See above. Default: 0.99.
        closed_rate (ndarray, optional): Fraction of the inputs for which
            each gate was closed. Default: ``1 - open_rate``; pass it when
            it is known exactly (``closed / n``), because ``1 - open / n`` is
            not always the same float, and a gate off for exactly 99 % of
            the inputs would then count as always off.

    Returns:
        dict: ``always_on``, ``conditional`` and ``always_off`` boolean
        masks over the gates.
    """
    threshold = _check_threshold(threshold)
    open_rate = np.asarray(open_rate, dtype=np.float64)
    if closed_rate is None:
        closed_rate = 1.0 - open_rate
    always_on = open_rate > threshold
    always_off = np.asarray(closed_rate, dtype=np.float64) > threshold
    return OrderedDict(
        always_on=always_on,
        conditional=~(always_on | always_off),
        always_off=always_off)


def stage_of(gate_name: str) -> str:
    """The stage of a gate from its module name, e.g. ``'layer3'``."""
    match = re.search(r'(layer\d+)', gate_name)
    return match.group(1) if match else 'other'


def _as_array(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64).reshape(-1)


def gate_open_counts(records: Sequence[dict]
                     ) -> Tuple['OrderedDict[str, np.ndarray]', int]:
    """How often each gate was open in a set of per-sample records.

    Args:
        records (Sequence[dict]): Per sample ``gate_open``, a dict of gate
            module name to the sample's 0/1 decisions.

    Returns:
        tuple: ``(counts, n)``; ``counts`` maps each gate module name to the
        number of samples for which each of its channels was open, ``n`` is
        the number of samples.

    Raises:
        ValueError: No records, or records with different gates.
    """
    if not records:
        raise ValueError('no gate records: the model is not a gated model, '
                         'or its predictions carry no gate_open (sliding-'
                         "window inference, test_cfg mode='slide', records "
                         'none; use whole-image inference)')
    names = list(records[0]['gate_open'])
    counts = OrderedDict((n, np.zeros(0)) for n in names)
    for i, record in enumerate(records):
        gate_open = record['gate_open']
        if list(gate_open) != names:
            raise ValueError(f'gate record {i} has the gates '
                             f'{sorted(gate_open)}, record 0 has '
                             f'{sorted(names)}')
        for name in names:
            value = _as_array(gate_open[name])
            counts[name] = value if i == 0 else counts[name] + value
    return counts, len(records)


def layer_categories(counts: Dict[str, np.ndarray], n: int,
                     threshold: float = 0.99) -> 'OrderedDict[str, dict]':
    """Fig. 4 categories of the gates of every gate module ("layer").

    Args:
        counts (dict): Gate module name to per-channel open counts, see
            :func:`gate_open_counts`.
        n (int): Number of samples the counts are over.
        threshold (float): See :func:`gate_categories`.

    Returns:
        OrderedDict: Gate module name to a dict with ``num_gates``,
        ``open_rate`` (mean over channels and samples) and the fractions of
        its gates that are ``always_on``, ``conditional`` and
        ``always_off``.
    """
    layers = OrderedDict()
    for name, count in counts.items():
        cats = gate_categories(count / n, threshold, (n - count) / n)
        layers[name] = dict(
            num_gates=int(count.size),
            open_rate=float(count.mean() / n),
            **{key: float(mask.mean()) for key, mask in cats.items()})
    return layers


def summarize_gate_records(records: Sequence[dict],
                           threshold: float = 0.99) -> OrderedDict:
    """The metrics of :class:`GateMetric` from per-sample records.

    Args:
        records (Sequence[dict]): Per sample ``gate_open`` (name to a 0/1
            vector), ``conditional_macs`` and ``dense_macs``.
        threshold (float): See :func:`gate_categories`.

    Returns:
        OrderedDict: ``mac_ratio`` (mean of conditional / dense MACs),
        ``mac_ratio_std`` (population standard deviation over the samples),
        ``mac_ratio_min``, ``mac_ratio_max``, ``mean_macs``, ``dense_macs``,
        ``gate_open_rate``, the fractions of all gates (channels) that are
        ``gates_always_on``, ``gates_conditional`` and ``gates_always_off``,
        and the same fractions per stage as ``<stage>/gates_always_on``
        etc. (``layer1`` ... from the gate module names).
    """
    threshold = _check_threshold(threshold)
    counts, n = gate_open_counts(records)
    macs = np.array([float(r['conditional_macs']) for r in records])
    dense = np.array([float(r['dense_macs']) for r in records])
    ratios = macs / dense
    metrics = OrderedDict(
        mac_ratio=float(ratios.mean()),
        mac_ratio_std=float(ratios.std()),
        mac_ratio_min=float(ratios.min()),
        mac_ratio_max=float(ratios.max()),
        mean_macs=float(macs.mean()),
        dense_macs=float(dense.mean()))
    names = list(counts)
    if not names:
        return metrics  # a compact model whose channels are all static
    all_counts = np.concatenate([counts[name] for name in names])
    metrics['gate_open_rate'] = float(all_counts.mean() / n)
    cats = gate_categories(all_counts / n, threshold, (n - all_counts) / n)
    for key, mask in cats.items():
        metrics[f'gates_{key}'] = float(mask.mean())
    stages = OrderedDict()
    for name in names:
        stages.setdefault(stage_of(name), []).append(counts[name])
    for stage, stage_counts in stages.items():
        stage_counts = np.concatenate(stage_counts)
        cats = gate_categories(stage_counts / n, threshold,
                               (n - stage_counts) / n)
        for key, mask in cats.items():
            metrics[f'{stage}/gates_{key}'] = float(mask.mean())
    return metrics


@register_metric
class GateMetric(BaseMetric):
    """Conditional-compute metrics of a gated model on a validation set.

    Reads the gate records that :class:`GatedEncoderDecoder` and
    :class:`GatedImageClassifier` attach to their predictions, counts their
    MACs with the model that :class:`~mmgated.engine.GateMetricHook` gives
    it (add that hook to ``custom_hooks``), and reports
    the mean MAC ratio (conditional / dense MACs of the inference network),
    its spread, and the fractions of gates that are always on, always off
    (on/off for more than ``threshold`` of the inputs, paper Fig. 4) or
    conditional, overall and per stage (see :func:`summarize_gate_records`
    for the keys; each is prefixed with ``gates/``). Use it next to the task
    metric::

        val_evaluator = [dict(type='IoUMetric', iou_metrics=['mIoU']),
                         dict(type='GateMetric')]

    Args:
        threshold (float): Category threshold in [0.5, 1). Default: 0.99.
        collect_device (str): 'cpu' or 'gpu'. Default: 'cpu'.
        prefix (str, optional): Metric name prefix. Default: None, which
            means ``'gates'``.
    """

    default_prefix = 'gates'

    def __init__(self,
                 threshold: float = 0.99,
                 collect_device: str = 'cpu',
                 prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.threshold = _check_threshold(threshold)
        # A callable from a record to its MACs (mmgated.analysis.MacCounter),
        # set by GateMetricHook before each evaluation.
        self.mac_counter = None

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        """Keep the gate record of every sample that has one.

        Args:
            data_batch: The batch (unused).
            data_samples (Sequence[dict]): Predictions as dicts; samples
                without ``gate_open`` (e.g. sliding-window inference) are
                skipped.
        """
        for sample in data_samples:
            if 'gate_open' not in sample:
                continue
            # Bool arrays: 1 byte per gate and sample, the smallest exact
            # record that can be gathered across processes.
            self.results.append(
                dict(
                    gate_open={
                        k: (v.cpu().numpy() if isinstance(v, torch.Tensor)
                            else np.asarray(v)).astype(bool)
                        for k, v in sample['gate_open'].items()
                    },
                    gate_input_sizes=sample['gate_input_sizes'],
                    model_input_shape=sample['model_input_shape'],
                    img_shape=sample.get('img_shape')))

    def compute_metrics(self, results: List[dict]) -> dict:
        """See :func:`summarize_gate_records`; each record's MACs are
        counted by the ``mac_counter`` that :class:`GateMetricHook` set."""
        if self.mac_counter is None:
            raise RuntimeError(
                'GateMetric counts MACs with the model, which '
                "GateMetricHook gives it: add dict(type='GateMetricHook') "
                'to custom_hooks')
        _warn_padded(results)
        records = [dict(r, **self.mac_counter(r)) for r in results]
        return dict(summarize_gate_records(records, self.threshold))


def _warn_padded(results: List[dict]) -> None:
    """Say when samples ran zero-padded to their batch's size: their MACs,
    conditional and dense, are those of the padded input, which is what the
    network computed, but more than the image alone would need."""
    padded = [r for r in results if r.get('img_shape') is not None and tuple(
        r['img_shape'][:2]) != tuple(r['model_input_shape'][1:])]
    if padded:
        example = padded[0]
        print_log(
            f'GateMetric: {len(padded)} of {len(results)} samples ran '
            'zero-padded to their batch\'s size (e.g. an image of '
            f'{tuple(example["img_shape"][:2])} in a batch of '
            f'{tuple(example["model_input_shape"][1:])}); their conditional '
            'and dense MACs are counted at the padded size. Use batch size '
            '1 for validation, or images of one size, to count each image '
            'at its own size.',
            logger='current', level=logging.WARNING)
