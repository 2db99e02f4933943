"""Gate statistics and the paper's plots of a trained gated model.

Runs the validation (or test) dataloader of a config through the model and
writes, into ``--out-dir``:

* ``gate_stats.json``: ``dense_macs``, ``mean_macs``, ``mac_ratio`` (and
  its std), the :class:`~mmgated.evaluation.GateMetric` numbers
  (``gate_metric``), the Fig. 4 category fractions of every gated layer
  (``per_layer``) and the gate usage per class (``per_class_usage``);
* ``per_sample.csv``: conditional MACs, MAC ratio and loss of every sample;
* ``class_gate_usage.npz``: the full classes x gates usage matrix;
* ``gate_categories.png`` (Fig. 4), ``mac_histogram.png``,
  ``macs_vs_loss.png`` and ``class_gate_usage.png``.

Example::

    python tools/analysis_tools/gate_stats.py \
        configs/resnet20_bas_cifar10.py work_dirs/r20/epoch_500.pth \
        --out-dir work_dirs/r20/gate_stats --max-samples 2000

An ``--out-dir`` that exists and is not empty is refused unless ``--force``.
"""
import argparse
import csv
import json
import os
import os.path as osp

import numpy as np
from mmengine.config import DictAction

import mmgated  # noqa: F401  shims and registration
from mmgated.analysis import plots
from mmgated.analysis.gate_stats import GateStatsCollector
from mmgated.analysis.inference import (build_eval_dataloader, build_model,
                                        class_names, default_device,
                                        iterate_predictions, task_of)
from mmgated.analysis.macs import MacCounter, dense_macs
from mmgated.models import gate_modules
from mmgated.utils.outputs import check_output_free
from mmgated.utils.run_config import check_config_data, load_run_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Gate statistics and plots of a gated model')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--out-dir',
        help='output directory (default: <work_dir>/gate_stats)')
    parser.add_argument(
        '--force',
        action='store_true',
        help='write into an --out-dir that is not empty, overwriting the '
        'files of an earlier run')
    parser.add_argument(
        '--split', default='val', choices=['val', 'test'],
        help='which dataloader of the config to run')
    parser.add_argument(
        '--max-samples', type=int, help='stop after this many samples')
    parser.add_argument(
        '--batch-size', type=int, help="override the dataloader's batch size")
    parser.add_argument(
        '--num-workers', type=int, help="override the dataloader's workers")
    parser.add_argument(
        '--threshold', type=float, default=0.99,
        help='a gate on (off) for more than this fraction of the inputs is '
        'always on (off), paper Fig. 4')
    parser.add_argument(
        '--device', default=None, help='cuda or cpu (default: cuda if any)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value pairs')
    args = parser.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f'--max-samples must be >= 1, got {args.max_samples}')
    if not 0.5 <= args.threshold < 1:
        parser.error(f'--threshold must be in [0.5, 1), got {args.threshold}')
    if not osp.isfile(args.checkpoint):
        parser.error(f'checkpoint {args.checkpoint!r} does not exist')
    return args


def _ignore_index(model) -> int:
    head = getattr(model, 'decode_head', None)
    return int(getattr(head, 'ignore_index', 255))


def collect(model, dataloader, task, names, threshold, max_samples=None):
    """Run the model and collect its gate statistics.

    Returns:
        tuple: ``(collector, gating_macs)``; the gating MACs per sample at
        the resolution of the first batch.
    """
    collector = GateStatsCollector(
        task, names, MacCounter(model), threshold=threshold,
        ignore_index=_ignore_index(model))
    gating = None
    for inputs, samples in iterate_predictions(model, dataloader,
                                               max_samples):
        if gating is None:
            gating = dense_macs(model, inputs[:1])['gating']
        collector.add(samples)
    if not len(collector):
        raise RuntimeError('the dataloader yielded no sample')
    return collector, gating


def write_csv(rows, path):
    fields = ['index', 'img_path', 'conditional_macs', 'mac_ratio', 'loss',
              'correct', 'classes']
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in fields})


def write_plots(collector, report, out_dir, title):
    """Draw the four figures; returns their paths."""
    rows = collector.rows
    macs = [r['conditional_macs'] for r in rows]
    losses = [r['loss'] for r in rows]
    dense = report['dense_macs']
    correct = None
    if collector.task == 'classification' and all(
            r['correct'] is not None for r in rows):
        correct = [r['correct'] for r in rows]
    loss_name = ('cross-entropy loss (nats)'
                 if collector.task == 'classification' else
                 'mean pixel cross-entropy (nats)')
    figures = {
        'gate_categories.png':
        plots.plot_gate_categories(
            report['per_layer'],
            title=f'Gate activation patterns per layer\n{title}',
            threshold=collector.threshold),
        'mac_histogram.png':
        plots.plot_mac_histogram(
            macs, dense, title=f'Conditional MACs per sample\n{title}'),
        'macs_vs_loss.png':
        plots.plot_macs_vs_loss(
            macs, losses, dense, correct=correct, loss_name=loss_name,
            title=f'Per-sample MACs vs loss\n{title}'),
        'class_gate_usage.png':
        plots.plot_class_gate_usage(
            collector.class_usage(), collector.class_names,
            collector.gate_spans, title=f'Gate usage per class\n{title}',
            ylabel='class (mean over its samples)'
            if collector.task == 'classification' else
            'class (mean over the images containing it)'),
    }
    paths = []
    for name, fig in figures.items():
        paths.append(plots.save_figure(fig, osp.join(out_dir, name)))
    return paths


def main(argv=None):
    args = parse_args(argv)
    cfg = load_run_config(args.config, args.cfg_options)
    check_config_data(cfg, splits=(args.split, ))
    out_dir = args.out_dir or osp.join(cfg.work_dir, 'gate_stats')
    check_output_free(out_dir, args.force, '--out-dir')
    os.makedirs(out_dir, exist_ok=True)
    device = args.device or default_device()

    model = build_model(cfg, args.checkpoint, device)
    if not gate_modules(model):
        raise ValueError(f'{type(model).__name__} of {args.config} has no '
                         'gates; gate_stats needs a gated model')
    dataloader = build_eval_dataloader(cfg, args.split, args.batch_size,
                                       args.num_workers)
    task = task_of(model)
    names = class_names(dataloader, model)
    collector, gating = collect(model, dataloader, task, names,
                                args.threshold, args.max_samples)

    report = collector.report()
    report['gating_macs'] = gating
    report['config'] = args.config
    report['checkpoint'] = args.checkpoint
    report['split'] = args.split
    with open(osp.join(out_dir, 'gate_stats.json'), 'w') as f:
        json.dump(report, f, indent=2)
    write_csv(collector.rows, osp.join(out_dir, 'per_sample.csv'))
    np.savez_compressed(
        osp.join(out_dir, 'class_gate_usage.npz'),
        usage=collector.class_usage(),
        class_counts=collector.class_counts,
        class_names=np.array(collector.class_names),
        gate_names=np.array([n for n, _, _ in collector.gate_spans]),
        gate_starts=np.array([s for _, s, _ in collector.gate_spans]))
    title = osp.splitext(osp.basename(args.config))[0]
    write_plots(collector, report, out_dir, title)
    print(f'{report["num_samples"]} samples: mean MACs '
          f'{report["mean_macs"]:.4g} of dense {report["dense_macs"]:.4g} '
          f'(ratio {report["mac_ratio"]:.4f} +- '
          f'{report["mac_ratio_std"]:.4f}); gates always on '
          f'{report["gate_metric"]["gates_always_on"]:.1%}, conditional '
          f'{report["gate_metric"]["gates_conditional"]:.1%}, always off '
          f'{report["gate_metric"]["gates_always_off"]:.1%}')
    print(f'wrote {out_dir}')
    return report


if __name__ == '__main__':
    main()
