"""Histograms of gate outputs during training (the paper's Fig. 1b)."""
import os
import os.path as osp
from numbers import Integral
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine.dist import all_reduce, is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop

from mmgated.models.gates import collect_gates, gate_modules


def _short(name: str) -> str:
    return name[len('backbone.'):] if name.startswith('backbone.') else name


@HOOKS.register_module()
class GateHistogramHook(Hook):
    """Record the output distribution of selected gates while training.

    After every training iteration the hook reads the gate probabilities
    ``sigmoid(logit)`` (``GateOutput.probs`` from
    :func:`~mmgated.models.collect_gates`) of the selected gates and adds
    them to a histogram of ``bins`` bins on [0, 1]. A histogram covers one
    epoch (epoch-based loops) or ``interval`` iterations (iteration-based
    loops); only the counts are kept, so memory does not grow with the
    batch or the dataset. After each period (every ``interval`` epochs for
    epoch-based loops) the hook draws a Fig. 1b-style figure, one row per
    gate and one column per recorded period (at most ``max_columns``,
    spread evenly, always with the first and the latest), passes it to
    ``runner.visualizer.add_image`` (``vis_image/`` of LocalVisBackend,
    TensorBoard when configured) and saves it as a PNG under
    ``<work_dir>/<out_dirname>/``::

        custom_hooks = [dict(type='GateHistogramHook', gates=4)]
        custom_hooks = [dict(type='GateHistogramHook',
                             gates=['backbone.layer1.0.gate:3',
                                    'backbone.layer3.2.gate:17'])]

    The recorded histograms start afresh when a run is resumed.

    Args:
        gates (int | Sequence[str]): The number of gates to follow, picked
            evenly over all gate channels of the model in module order
            (deterministic), or a list of ``'module_name:channel'`` such as
            ``'backbone.layer2.1.gate:5'``. Default: 4.
        bins (int): Histogram bins on [0, 1]. Default: 20.
        interval (int, optional): Epoch-based loops: draw every
            ``interval`` epochs (each column still covers one epoch).
            Iteration-based loops: the iterations one histogram covers.
            Default: 1 epoch, or a tenth of the training iterations.
        by_epoch (bool, optional): Whether periods are epochs. Default:
            None: iterations for an ``IterBasedTrainLoop``, else epochs.
        max_columns (int): Most periods drawn in one figure. Default: 6.
        name (str): Image name for the visualizer and file prefix.
            Default: ``'gate_histograms'``.
        out_dirname (str): Folder under the work dir for the PNG files.
            Default: ``'gate_histograms'``.
    """

    priority = 'LOW'

    def __init__(self,
                 gates: Union[int, Sequence[str]] = 4,
                 bins: int = 20,
                 interval: Optional[int] = None,
                 by_epoch: Optional[bool] = None,
                 max_columns: int = 6,
                 name: str = 'gate_histograms',
                 out_dirname: str = 'gate_histograms'):
        if isinstance(gates, bool) or not (isinstance(gates, Integral)
                                           or isinstance(gates,
                                                         (list, tuple))):
            raise ValueError('gates must be a number of gates or a list of '
                             f"'module_name:channel', got {gates!r}")
        if isinstance(gates, Integral) and gates < 1:
            raise ValueError(f'gates must be >= 1, got {gates!r}')
        if not isinstance(gates, Integral):
            if not gates:
                raise ValueError('gates must name at least one gate')
            self._parse_specs(gates)  # fail on malformed entries early
        for key, value in (('bins', bins), ('max_columns', max_columns)):
            if isinstance(value, bool) or not isinstance(
                    value, Integral) or value < 1:
                raise ValueError(f'{key} must be an integer >= 1, got '
                                 f'{value!r}')
        if interval is not None and (isinstance(interval, bool)
                                     or not isinstance(interval, Integral)
                                     or interval < 1):
            raise ValueError(f'interval must be an integer >= 1 or None, '
                             f'got {interval!r}')
        self.gates_arg = gates
        self.bins = int(bins)
        self.interval = interval
        self.by_epoch = by_epoch
        self.max_columns = int(max_columns)
        self.name = name
        self.out_dirname = out_dirname
        self.edges = np.linspace(0.0, 1.0, self.bins + 1)
        self.selected: List[Tuple[str, int]] = []
        self.current: Optional[torch.Tensor] = None
        self.history: List[Tuple[str, int, np.ndarray]] = []
        self._drawn_step = None
        self.device = torch.device('cpu')

    @staticmethod
    def _parse_specs(specs: Sequence[str]) -> List[Tuple[str, int]]:
        parsed = []
        for spec in specs:
            name, sep, channel = str(spec).rpartition(':')
            if not sep or not name or not channel.isdigit():
                raise ValueError(f"gate {spec!r} is not 'module_name:channel'"
                                 ", e.g. 'backbone.layer1.0.gate:3'")
            parsed.append((name, int(channel)))
        return parsed

    def _select(self, model) -> List[Tuple[str, int]]:
        modules = gate_modules(model)
        if not modules:
            raise ValueError(f'{type(model).__name__} has no ChannelGate; '
                             'GateHistogramHook needs a gated model')
        if isinstance(self.gates_arg, Integral):
            channels = [(name, c) for name, m in modules.items()
                        for c in range(m.out_channels)]
            if self.gates_arg > len(channels):
                raise ValueError(f'gates={self.gates_arg} but the model has '
                                 f'only {len(channels)} gates')
            picks = np.linspace(0, len(channels) - 1, self.gates_arg)
            return [channels[int(i)] for i in np.round(picks)]
        selected = self._parse_specs(self.gates_arg)
        for name, channel in selected:
            if name not in modules:
                known = ', '.join(list(modules)[:4])
                raise ValueError(f'gate module {name!r} does not exist; the '
                                 f'model has {len(modules)} gate modules, '
                                 f'e.g. {known}')
            size = modules[name].out_channels
            if channel >= size:
                raise ValueError(f'{name} has channels 0..{size - 1}, got '
                                 f'channel {channel}')
        return selected

    def before_train(self, runner) -> None:
        """Pick the gates and the period of the histograms."""
        self.selected = self._select(runner.model)
        if self.by_epoch is None:
            # IterBasedTrainLoop has a max_epochs too (1), so test the type.
            self.by_epoch = not isinstance(runner.train_loop,
                                           IterBasedTrainLoop)
        if self.interval is None:
            self.interval = 1 if self.by_epoch else max(
                1, runner.max_iters // 10)
        self.current = None
        self.history = []
        self._drawn_step = None
        param = next(iter(gate_modules(runner.model).values())).fc2.weight
        self.device = param.device

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch=None,
                         outputs=None) -> None:
        """Add the gate probabilities of this iteration to the histogram;
        close the period at the end of an iteration-based interval."""
        recorded = collect_gates(runner.model)
        values = []
        for name, channel in self.selected:
            output = recorded.get(name)
            if output is None:
                values = None  # a gate did not run (e.g. a frozen stage)
                break
            values.append(output.probs[:, channel].detach().float())
        if values:
            probs = torch.stack(values)  # (gates, batch)
            index = (probs * self.bins).long().clamp_(0, self.bins - 1)
            counts = torch.zeros(
                len(self.selected), self.bins, dtype=torch.float64,
                device=probs.device)
            counts.scatter_add_(1, index, torch.ones_like(counts[:, :1]
                                                          ).expand_as(index))
            # Stays on the device until the period ends: no sync per iter.
            self.current = counts if self.current is None else \
                self.current + counts
        if not self.by_epoch and self.every_n_train_iters(
                runner, self.interval):
            self._close_period(runner, f'iter {runner.iter + 1}',
                               runner.iter + 1)

    def after_train_epoch(self, runner) -> None:
        """Close the epoch's histogram; draw every ``interval`` epochs."""
        if not self.by_epoch:
            return
        self._close_period(
            runner, f'epoch {runner.epoch + 1}', runner.epoch + 1,
            draw=self.every_n_epochs(runner, self.interval))

    def after_train(self, runner) -> None:
        """Close a last, unfinished period and draw what was not drawn."""
        if self.current is not None:
            # Training stopped inside a period (mid-epoch, or the iterations
            # after the last full interval).
            unit = 'epoch' if self.by_epoch else 'iter'
            step = runner.epoch + 1 if self.by_epoch else runner.iter
            self._close_period(runner, f'{unit} {step} (partial)', step)
        elif self.history and self.history[-1][1] != self._drawn_step:
            self._draw(runner, self.history[-1][1])

    def _close_period(self, runner, label: str, step: int,
                      draw: bool = True) -> None:
        counts = self.current
        if counts is None:
            counts = torch.zeros(len(self.selected), self.bins,
                                 dtype=torch.float64, device=self.device)
        # Sum over processes (a no-op in one process); every rank gets here
        # at the same iteration.
        counts = counts.clone()
        all_reduce(counts, op='sum')
        self.history.append((label, step, counts.cpu().numpy()))
        self.current = None
        if draw:
            self._draw(runner, step)

    def columns(self) -> List[int]:
        """Indices of the recorded periods drawn: at most ``max_columns``,
        evenly spread, first and latest included."""
        count = len(self.history)
        if count <= self.max_columns:
            return list(range(count))
        picks = np.linspace(0, count - 1, self.max_columns)
        return sorted(set(int(i) for i in np.round(picks)))

    def figure(self):
        """The Fig. 1b figure of the periods recorded so far."""
        from mmgated.analysis.plots import plot_gate_histograms
        cols = self.columns()
        counts = np.stack([self.history[c][2] for c in cols], axis=1)
        return plot_gate_histograms(
            counts, self.edges,
            [f'{_short(n)}:{c}' for n, c in self.selected],
            [self.history[c][0] for c in cols],
            title='Gate output distributions (P(open) of each gate)')

    def _draw(self, runner, step: int) -> None:
        self._drawn_step = step
        if not is_main_process() or not self.history:
            return
        from mmgated.analysis.plots import figure_to_array, save_figure
        fig = self.figure()
        unit = 'epoch' if self.by_epoch else 'iter'
        out_dir = osp.join(runner.work_dir, self.out_dirname)
        os.makedirs(out_dir, exist_ok=True)
        save_figure(fig, osp.join(out_dir, f'{self.name}_{unit}_{step}.png'))
        runner.visualizer.add_image(self.name, figure_to_array(fig),
                                    step=step)
