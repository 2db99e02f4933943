"""The paper's plots of gated networks, drawn with matplotlib's Agg canvas.

Every function returns a :class:`matplotlib.figure.Figure` on its own Agg
canvas: nothing goes through ``pyplot``, so the functions do not touch the
global backend or figure registry of the calling process (training hooks,
notebooks, the demo) and need no display. Save a figure with
:func:`save_figure` or turn it into an RGB array with :func:`figure_to_array`
(for ``Visualizer.add_image``).
"""
import os
import os.path as osp
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

# Fig. 4 colours: always on, conditional, always off.
CATEGORY_STYLE = (
    ('always_on', 'always on', '#2b83ba'),
    ('conditional', 'conditional', '#fdae61'),
    ('always_off', 'always off', '#bababa'),
)


def new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    """A figure of ``width x height`` inches with an Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str) -> str:
    """Write ``fig`` as PNG to ``path`` (directories are created).

    Returns:
        str: ``path``.
    """
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format='png', bbox_inches='tight')
    return path


def figure_to_array(fig: Figure) -> np.ndarray:
    """The rendered figure as an ``(H, W, 3)`` uint8 RGB array."""
    canvas = fig.canvas
    if not isinstance(canvas, FigureCanvasAgg):
        canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def mac_unit(value: float) -> Tuple[float, str]:
    """A readable unit for a number of MACs.

    Returns:
        tuple: ``(scale, name)``, e.g. ``(1e9, 'GMACs')``; divide by
        ``scale``.
    """
    for scale, name in ((1e12, 'TMACs'), (1e9, 'GMACs'), (1e6, 'MMACs'),
                        (1e3, 'KMACs')):
        if abs(value) >= scale:
            return scale, name
    return 1.0, 'MACs'


def _ratio_axis(ax, scale: float, dense_macs: float) -> None:
    # A top axis in MAC ratio, so absolute and relative cost read together.
    factor = scale / dense_macs
    top = ax.secondary_xaxis(
        'top', functions=(lambda x: x * factor, lambda r: r / factor))
    top.set_xlabel('MACs relative to the dense network')
    top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:.4g}'))
    top.xaxis.set_major_locator(MaxNLocator(5))


def _readable_x(ax, values: np.ndarray) -> None:
    # Plain tick labels (no offset like '1e-5+5.09e-1') and at least a
    # 2 % wide range, so a model whose samples cost nearly the same still
    # gets legible ticks.
    ax.ticklabel_format(axis='x', useOffset=False, style='plain')
    ax.xaxis.set_major_locator(MaxNLocator(5))
    low, high = float(np.min(values)), float(np.max(values))
    centre = (low + high) / 2
    if high - low < 0.02 * abs(centre):
        half = 0.01 * abs(centre) or 1.0
        ax.set_xlim(centre - half, centre + half)


def _short_gate_name(name: str) -> str:
    # 'backbone.layer3.2.gate2' -> 'layer3.2.gate2'
    return name[len('backbone.'):] if name.startswith('backbone.') else name


def plot_gate_categories(layers: Dict[str, dict],
                         title: str = 'Gate activation patterns per layer',
                         threshold: float = 0.99) -> Figure:
    """Fig. 4: gates always on / conditional / always off, per layer.

    Args:
        layers (dict): Gate module name to a dict with the fractions
            ``always_on``, ``conditional``, ``always_off`` and
            ``num_gates`` (see
            :func:`mmgated.evaluation.layer_categories`).
        title (str): Figure title.
        threshold (float): The category threshold, named in the legend.

    Returns:
        Figure: Stacked bars, one per gate module, in percent of its gates.
    """
    if not layers:
        raise ValueError('plot_gate_categories needs at least one layer')
    names = list(layers)
    fig = new_figure(max(6.0, 0.35 * len(names) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for key, label, color in CATEGORY_STYLE:
        values = np.array([100.0 * layers[n][key] for n in names])
        ax.bar(x, values, bottom=bottom, color=color, label=label,
               edgecolor='white', linewidth=0.5)
        bottom += values
    ax.set_xticks(x)
    ax.set_xticklabels([
        f'{_short_gate_name(n)} ({layers[n]["num_gates"]})' for n in names
    ], rotation=90, fontsize=7)
    ax.set_xlabel('gated layer (number of gates)')
    ax.set_ylabel('gates of the layer (%)')
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_title(title)
    ax.legend(title=f'on/off for > {threshold:.0%} of inputs',
              loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return fig


def plot_mac_histogram(macs: Sequence[float],
                       dense_macs: float,
                       title: str = 'Conditional MACs per sample',
                       bins: int = 40) -> Figure:
    """Histogram of the per-sample conditional MACs.

    Args:
        macs (Sequence[float]): Conditional MACs of every sample.
        dense_macs (float): MACs of the dense network; the top axis shows
            the MAC ratio.
        title (str): Figure title.
        bins (int): Number of bins.

    Returns:
        Figure
    """
    macs = np.asarray(macs, dtype=np.float64)
    if macs.size == 0:
        raise ValueError('plot_mac_histogram needs at least one sample')
    scale, unit = mac_unit(dense_macs)
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    low, high = macs.min() / scale, macs.max() / scale
    span = None
    if high - low < 0.02 * abs(high):
        half = 0.01 * abs(high) or 1.0
        span = ((low + high) / 2 - half, (low + high) / 2 + half)
    ax.hist(macs / scale, bins=bins, range=span, color='#2b83ba', alpha=0.85,
            label=f'samples (n={macs.size})')
    _readable_x(ax, macs / scale)
    mean = macs.mean()
    # The dense figure is named rather than drawn: a line at 1.0 would
    # squeeze the histogram of a sparse model into a few pixels.
    ax.axvline(mean / scale, color='#d7191c', linestyle='--',
               label=f'mean {mean / scale:.4g} {unit} '
               f'({mean / dense_macs:.1%} of dense '
               f'{dense_macs / scale:.4g} {unit})')
    _ratio_axis(ax, scale, dense_macs)
    ax.set_xlabel(f'conditional MACs per sample ({unit})')
    ax.set_ylabel('number of samples')
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_macs_vs_loss(macs: Sequence[float],
                      losses: Sequence[float],
                      dense_macs: float,
                      correct: Optional[Sequence[bool]] = None,
                      loss_name: str = 'cross-entropy loss (nats)',
                      title: str = 'Per-sample MACs vs loss') -> Figure:
    """Scatter plot of per-sample conditional MACs against the task loss.

    Args:
        macs (Sequence[float]): Conditional MACs of every sample.
        losses (Sequence[float]): Loss of every sample (NaN ones are left
            out).
        dense_macs (float): MACs of the dense network; the top axis shows
            the MAC ratio.
        correct (Sequence[bool], optional): Whether each sample was
            classified correctly; colours the points when given.
        loss_name (str): The y-axis label, with its unit.
        title (str): Figure title.

    Returns:
        Figure
    """
    macs = np.asarray(macs, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if macs.shape != losses.shape:
        raise ValueError(f'{macs.size} MAC values but {losses.size} losses')
    valid = np.isfinite(losses)
    scale, unit = mac_unit(dense_macs)
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    if correct is not None:
        correct = np.asarray(correct, dtype=bool)
        for mask, label, color in ((correct, 'correct', '#1a9641'),
                                   (~correct, 'wrong', '#d7191c')):
            mask = mask & valid
            ax.scatter(macs[mask] / scale, losses[mask], s=10, alpha=0.6,
                       color=color, label=f'{label} (n={mask.sum()})')
    else:
        ax.scatter(macs[valid] / scale, losses[valid], s=10, alpha=0.6,
                   color='#2b83ba', label=f'samples (n={valid.sum()})')
    if valid.sum() >= 2 and np.ptp(macs[valid]) > 0 \
            and np.ptp(losses[valid]) > 0:
        r = np.corrcoef(macs[valid], losses[valid])[0, 1]
        title = f'{title} (Pearson r = {r:.2f})'
    _readable_x(ax, macs / scale)
    _ratio_axis(ax, scale, dense_macs)
    ax.set_xlabel(f'conditional MACs per sample ({unit})')
    ax.set_ylabel(loss_name)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_class_gate_usage(usage: np.ndarray,
                          class_names: Sequence[str],
                          gate_spans: Sequence[Tuple[str, int, int]],
                          title: str = 'Gate usage per class',
                          ylabel: str = 'class') -> Figure:
    """Heatmap of how often each gate is open for each class.

    Args:
        usage (ndarray): ``(num_classes, num_gates)`` open fractions in
            [0, 1]; rows of classes without samples are NaN (drawn blank).
        class_names (Sequence[str]): One name per row.
        gate_spans (Sequence[tuple]): ``(gate module name, first column,
            end column)`` of each gate module, to label the x axis.
        title (str): Figure title.
        ylabel (str): The y-axis label, saying which samples a class row
            averages. Default: ``'class'``.

    Returns:
        Figure
    """
    usage = np.asarray(usage, dtype=np.float64)
    if usage.ndim != 2 or usage.shape[0] != len(class_names):
        raise ValueError(f'usage of shape {usage.shape} does not match '
                         f'{len(class_names)} class names')
    num_classes = usage.shape[0]
    fig = new_figure(10, min(2.0 + 0.22 * num_classes, 30))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(usage), aspect='auto',
                      interpolation='nearest', cmap='viridis', vmin=0,
                      vmax=1)
    cbar = fig.colorbar(image, ax=ax)
    cbar.set_label('fraction of samples with the gate open')
    if num_classes <= 60:
        ax.set_yticks(np.arange(num_classes))
        ax.set_yticklabels(class_names, fontsize=7)
    ax.set_ylabel(ylabel)
    # One tick per gate module when they fit, else one per stage.
    spans = list(gate_spans)
    if len(spans) > 40:
        stages = {}
        for name, start, end in spans:
            stage = name.split('.')[1] if name.count('.') >= 2 else name
            first, last = stages.get(stage, (start, end))
            stages[stage] = (min(first, start), max(last, end))
        spans = [(name, s, e) for name, (s, e) in stages.items()]
    for _, start, _ in spans[1:]:
        ax.axvline(start - 0.5, color='white', linewidth=0.5)
    ax.set_xticks([(start + end - 1) / 2 for _, start, end in spans])
    ax.set_xticklabels([_short_gate_name(n) for n, _, _ in spans],
                       rotation=90, fontsize=7)
    ax.set_xlabel('gate (channel), grouped by gated layer')
    ax.set_title(title)
    return fig


def plot_gate_histograms(counts: np.ndarray,
                         bin_edges: np.ndarray,
                         gate_labels: Sequence[str],
                         period_labels: Sequence[str],
                         title: str = 'Gate output distributions during '
                         'training') -> Figure:
    """Fig. 1b: histograms of gate outputs, one row per gate, one column per
    training period (epoch or interval).

    Args:
        counts (ndarray): ``(num_gates, num_periods, num_bins)`` counts.
        bin_edges (ndarray): ``(num_bins + 1, )`` edges on [0, 1].
        gate_labels (Sequence[str]): Row labels.
        period_labels (Sequence[str]): Column titles, e.g. ``'epoch 3'``.
        title (str): Figure title.

    Returns:
        Figure
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[:2] != (len(gate_labels),
                                                 len(period_labels)):
        raise ValueError(f'counts of shape {counts.shape} do not match '
                         f'{len(gate_labels)} gates x '
                         f'{len(period_labels)} periods')
    rows, cols = counts.shape[:2]
    fig = new_figure(1.0 + 2.0 * cols, 0.8 + 1.5 * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    widths = np.diff(bin_edges)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            total = counts[r, c].sum()
            density = counts[r, c] / (total * widths) if total else \
                np.zeros_like(widths)
            ax.bar(bin_edges[:-1], density, width=widths, align='edge',
                   color='#2b83ba')
            ax.set_xlim(bin_edges[0], bin_edges[-1])
            ax.tick_params(labelsize=6)
            if r == 0:
                ax.set_title(period_labels[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(f'{gate_labels[r]}\ndensity', fontsize=7)
            if r == rows - 1:
                ax.set_xlabel('P(gate open)', fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_tradeoff(runs: Sequence[dict],
                  metric_name: str,
                  title: str = 'Accuracy vs computation') -> Figure:
    """Fig. 3: task metric against the MAC ratio, one series per label.

    Args:
        runs (Sequence[dict]): Each with ``label``, ``mac_ratio`` (None for
            a dense baseline, drawn at 1.0 with a star) and ``metric``.
        metric_name (str): The y-axis label, e.g. ``'accuracy/top1 (%)'``.
        title (str): Figure title.

    Returns:
        Figure
    """
    if not runs:
        raise ValueError('plot_tradeoff needs at least one run')
    fig = new_figure(6.4, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    labels = list(dict.fromkeys(run['label'] for run in runs))
    colors = [f'C{i % 10}' for i in range(len(labels))]
    for label, color in zip(labels, colors):
        gated = sorted((r['mac_ratio'], r['metric']) for r in runs
                       if r['label'] == label and r['mac_ratio'] is not None)
        dense = [r['metric'] for r in runs
                 if r['label'] == label and r['mac_ratio'] is None]
        if gated:
            x, y = zip(*gated)
            ax.plot(x, y, marker='o', color=color, label=label)
        if dense:
            ax.scatter([1.0] * len(dense), dense, marker='*', s=160,
                       color=color, edgecolor='black', zorder=3,
                       label=f'{label} (dense)' if gated else
                       f'{label} (dense baseline)')
    ax.set_xlabel('MACs relative to the dense network (mean MAC ratio)')
    ax.set_ylabel(metric_name)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig
