"""Per-sample gate statistics of a gated model over a dataset.

:class:`GateStatsCollector` takes the predictions of
:class:`~mmgated.models.GatedImageClassifier` or
:class:`~mmgated.models.GatedEncoderDecoder` (with their ``gate_open``,
gate records) batch by batch, counts their MACs with a
:class:`~mmgated.analysis.MacCounter`, and builds
the report of ``tools/analysis_tools/gate_stats.py``: MACs, the
:class:`~mmgated.evaluation.GateMetric` numbers, Fig. 4 categories per
layer, per-sample losses and gate usage per class.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluation.gate_metric import (gate_open_counts, layer_categories,
                                      summarize_gate_records)


def _get(sample, key, default=None):
    if isinstance(sample, dict):
        return sample.get(key, default)
    return sample.get(key, default) if hasattr(sample, 'get') else getattr(
        sample, key, default)


def _data(field):
    # PixelData / LabelData or a tensor.
    return getattr(field, 'data', field)


def classification_loss(sample) -> float:
    """Cross-entropy of one classification prediction, in nats.

    Args:
        sample: A ``DataSample`` (or its dict) with ``pred_score`` (class
            probabilities) and ``gt_label``.

    Returns:
        float: ``-log(pred_score[gt_label])``; NaN without a label.
    """
    score = _get(sample, 'pred_score')
    label = _get(sample, 'gt_label')
    if score is None or label is None:
        return float('nan')
    label = torch.as_tensor(label).reshape(-1)
    if label.numel() != 1:
        return float('nan')  # multi-label samples have no single CE
    prob = torch.as_tensor(score).reshape(-1)[int(label)].double()
    return float(-torch.log(prob.clamp_min(1e-12)))


def segmentation_loss(sample, ignore_index: int = 255) -> float:
    """Mean cross-entropy over the valid pixels of one image, in nats.

    Args:
        sample: A ``SegDataSample`` (or its dict) with ``seg_logits``
            ``(C, H, W)`` and ``gt_sem_seg`` ``(1, H, W)`` at the same size.
        ignore_index (int): Label of the pixels left out. Default: 255.

    Returns:
        float: The loss; NaN when the image has no valid pixel or no
        logits.
    """
    logits = _get(sample, 'seg_logits')
    gt = _get(sample, 'gt_sem_seg')
    if logits is None or gt is None:
        return float('nan')
    logits = torch.as_tensor(_data(logits)).float()
    gt = torch.as_tensor(_data(gt)).long().reshape(logits.shape[-2:])
    valid = gt != ignore_index
    if not valid.any() or logits.shape[0] < 2:
        return float('nan')
    loss = F.cross_entropy(
        logits[None], gt[None], ignore_index=ignore_index, reduction='sum')
    return float(loss / valid.sum())


def sample_classes(sample, task: str, num_classes: int,
                   ignore_index: int = 255) -> List[int]:
    """The classes a sample counts for in the per-class gate usage.

    Classification: its label. Segmentation: every class present in its
    ground truth.
    """
    if task == 'classification':
        label = _get(sample, 'gt_label')
        if label is None:
            return []
        labels = torch.as_tensor(label).reshape(-1).tolist()
    else:
        gt = _get(sample, 'gt_sem_seg')
        if gt is None:
            return []
        labels = torch.unique(torch.as_tensor(_data(gt))).tolist()
    return [int(c) for c in labels
            if c != ignore_index and 0 <= c < num_classes]


class GateStatsCollector:
    """Accumulate gate statistics from predictions, batch by batch.

    Args:
        task (str): ``'classification'`` or ``'segmentation'``.
        class_names (Sequence[str]): The dataset's classes.
        mac_counter (callable): From a prediction's gate record to its
            ``conditional_macs`` and ``dense_macs``: a
            :class:`~mmgated.analysis.MacCounter` of the model.
        threshold (float): Fig. 4 category threshold. Default: 0.99.
        ignore_index (int): Segmentation label left out. Default: 255.
    """

    TASKS = ('classification', 'segmentation')

    def __init__(self,
                 task: str,
                 class_names: Sequence[str],
                 mac_counter,
                 threshold: float = 0.99,
                 ignore_index: int = 255):
        if task not in self.TASKS:
            raise ValueError(f'task {task!r} is not one of {self.TASKS}')
        if not class_names:
            raise ValueError('class_names must name at least one class')
        self.task = task
        self.class_names = [str(c) for c in class_names]
        self.mac_counter = mac_counter
        self.threshold = threshold
        self.ignore_index = ignore_index
        self.records: List[dict] = []
        self.rows: List[dict] = []
        self.class_sums: Optional[np.ndarray] = None
        self.class_counts = np.zeros(len(self.class_names), dtype=np.int64)
        self.gate_spans = None

    def __len__(self) -> int:
        return len(self.records)

    def _init_gates(self, gate_open: Dict[str, torch.Tensor]) -> None:
        spans, start = [], 0
        for name, value in gate_open.items():
            size = int(torch.as_tensor(value).numel())
            spans.append((name, start, start + size))
            start += size
        self.gate_spans = spans
        self.class_sums = np.zeros((len(self.class_names), start))

    def add(self, samples: Sequence) -> None:
        """Add the predictions of one batch.

        Args:
            samples (Sequence): Data samples returned by the model's
                ``predict`` (or ``val_step``).

        Raises:
            ValueError: A sample carries no gate record.
        """
        for sample in samples:
            gate_open = _get(sample, 'gate_open')
            if gate_open is None:
                raise ValueError(
                    'a prediction carries no gate_open: the model must be '
                    'a GatedImageClassifier or GatedEncoderDecoder with '
                    "whole-image inference (test_cfg mode='whole')")
            if self.gate_spans is None:
                self._init_gates(gate_open)
            gate_open = OrderedDict(
                (k, torch.as_tensor(v).detach().cpu().numpy().astype(bool))
                for k, v in gate_open.items())
            counted = self.mac_counter(
                dict(gate_open=gate_open,
                     gate_input_sizes=_get(sample, 'gate_input_sizes'),
                     model_input_shape=_get(sample, 'model_input_shape')))
            macs, dense = counted['conditional_macs'], counted['dense_macs']
            self.records.append(
                dict(gate_open=gate_open, conditional_macs=macs,
                     dense_macs=dense))
            if self.task == 'classification':
                loss = classification_loss(sample)
                label = _get(sample, 'gt_label')
                pred = _get(sample, 'pred_label')
                correct = None
                if label is not None and pred is not None:
                    correct = bool(
                        torch.equal(
                            torch.as_tensor(label).reshape(-1).cpu(),
                            torch.as_tensor(pred).reshape(-1).cpu()))
            else:
                loss = segmentation_loss(sample, self.ignore_index)
                correct = None
            classes = sample_classes(sample, self.task,
                                     len(self.class_names),
                                     self.ignore_index)
            vector = np.concatenate(list(gate_open.values()))
            for c in classes:
                self.class_sums[c] += vector
                self.class_counts[c] += 1
            self.rows.append(
                dict(
                    index=len(self.rows),
                    img_path=str(_get(sample, 'img_path', '')),
                    conditional_macs=macs,
                    mac_ratio=macs / dense,
                    loss=loss,
                    correct=correct,
                    classes=' '.join(self.class_names[c] for c in classes)))

    def class_usage(self) -> np.ndarray:
        """``(num_classes, num_gates)`` mean open fraction per class (NaN
        for classes without samples)."""
        if self.class_sums is None:
            raise ValueError('no samples were added')
        with np.errstate(invalid='ignore', divide='ignore'):
            return self.class_sums / self.class_counts[:, None]

    def report(self) -> OrderedDict:
        """The JSON report.

        Returns:
            OrderedDict: ``num_samples``, ``dense_macs``, ``mean_macs``,
            ``mac_ratio``, ``mac_ratio_std``, ``mean_loss``,
            ``gate_metric`` (every :class:`GateMetric` number),
            ``per_layer`` (gate module name to its ``num_gates``,
            ``open_rate`` and category fractions), ``per_class_usage``
            (class name to its sample count and the open rate of each gate
            module) and ``threshold``.
        """
        if not self.records:
            raise ValueError('no samples were added')
        metric = summarize_gate_records(self.records, self.threshold)
        counts, n = gate_open_counts(self.records)
        losses = np.array([r['loss'] for r in self.rows])
        usage = self.class_usage()
        per_class = OrderedDict()
        for c, name in enumerate(self.class_names):
            count = int(self.class_counts[c])
            per_class[name] = dict(
                num_samples=count,
                gates=OrderedDict(
                    (gate, float(usage[c, s:e].mean()) if count else None)
                    for gate, s, e in self.gate_spans))
        report = OrderedDict(
            task=self.task,
            num_samples=n,
            dense_macs=metric['dense_macs'],
            mean_macs=metric['mean_macs'],
            mac_ratio=metric['mac_ratio'],
            mac_ratio_std=metric['mac_ratio_std'],
            mean_loss=float(np.nanmean(losses))
            if np.isfinite(losses).any() else None,
            threshold=self.threshold,
            gate_metric=metric,
            per_layer=layer_categories(counts, n, self.threshold),
            per_class_usage=per_class)
        return report
