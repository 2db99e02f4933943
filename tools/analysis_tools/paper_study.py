"""The paper's claims on real data at CPU scale: BAS against L0-only against
dense and narrow dense ResNets, over seeds.

::

    python tools/analysis_tools/paper_study.py --work-dir work_dirs/paper_study

Trains, with mmengine's Runner and the demo's config (the CIFAR-10 recipe
on scikit-learn's handwritten digits, written as ``tools/demo.py`` writes
them), for each depth (ResNet-20, ResNet-32) and seed:

* the dense network, and dense networks whose width is reduced (``--widths``
  stem/base channels instead of 16): the static baseline;
* ResNet-BAS (batch-shaping, then L0, as the demo) and ResNet-L0 (the same
  L0 schedule, no batch-shaping) at each ``--gammas`` value.

Each run's metrics go to ``<work-dir>/runs/<run>/metrics.json``; a rerun
skips the runs that have one, so an interrupted study resumes. The report
(``study.md``, ``study.json``) has the tables, with the mean and 95 %
confidence interval over seeds, and the plots (``fig3_tradeoff.png``,
``fig4_categories.png``, ``fig4_per_layer.png``, ``loss_vs_macs.png``).
"""
import argparse
import itertools
import json
import multiprocessing
import os
import os.path as osp
import sys
from collections import OrderedDict

import numpy as np

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(REPO, 'configs', 'demo', 'resnet20_bas_digits.py')
METHODS = ('dense', 'static', 'bas', 'l0')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work-dir', default='work_dirs/paper_study')
    parser.add_argument('--depths', type=int, nargs='+', default=[20, 32])
    parser.add_argument('--gammas', type=float, nargs='+',
                        default=[0.002, 0.01, 0.05, 0.2],
                        help='final L0 weights of the BAS and L0 runs')
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--widths', type=int, nargs='*', default=[12, 8],
                        help='channels of the narrow dense baselines')
    parser.add_argument('--methods', nargs='+', default=list(METHODS),
                        choices=METHODS)
    parser.add_argument('--epochs', type=int, default=12,
                        help='training epochs E: batch-shaping annealed to 0 '
                        'by E/3, L0 warmed up from E/3 to 2E/3, learning '
                        'rate / 10 at 2E/3 and 5E/6 (the demo\'s recipe '
                        'at E = 24)')
    parser.add_argument('--max-samples', type=int,
                        help='images per split (a quick check)')
    parser.add_argument('--jobs', type=int, default=2,
                        help='runs trained at once, each with cores/jobs '
                        'threads')
    parser.add_argument('--layer-gamma', type=float,
                        help='gamma of the per-layer Fig. 4 table (default: '
                        'the middle of --gammas, the lower one of two)')
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or args.epochs < 1:
        parser.error('--seeds, --jobs and --epochs must be >= 1')
    if any(not 0 <= g < float('inf') for g in args.gammas):
        parser.error(f'--gammas must be finite and >= 0, got {args.gammas}')
    if any(w < 1 for w in args.widths):
        parser.error(f'--widths must be >= 1, got {args.widths}')
    return args


def run_specs(args):
    """Every run of the study, as dicts of ``method``, ``depth``,
    ``gamma`` (gated), ``width`` (dense and static) and ``seed``."""
    specs = []
    for depth, seed in itertools.product(args.depths, range(args.seeds)):
        if 'dense' in args.methods:
            specs.append(dict(method='dense', depth=depth, width=16,
                              seed=seed))
        if 'static' in args.methods:
            specs += [dict(method='static', depth=depth, width=w, seed=seed)
                      for w in args.widths]
        for method in ('bas', 'l0'):
            if method in args.methods:
                specs += [dict(method=method, depth=depth, gamma=g,
                               seed=seed) for g in args.gammas]
    return specs


def run_name(spec):
    what = f'g{spec["gamma"]:g}' if 'gamma' in spec else f'w{spec["width"]}'
    return f'{spec["method"]}_r{spec["depth"]}_{what}_s{spec["seed"]}'


def study_config(spec, data_root, run_dir, epochs):
    """The demo config, changed to the run's method, depth and seed."""
    from mmgated.utils.run_config import load_run_config
    cfg = load_run_config(CONFIG, work_dir=run_dir)
    for split in ('train', 'val', 'test'):
        cfg[f'{split}_dataloader'].dataset.data_root = data_root
    cfg.train_cfg.max_epochs = epochs
    cfg.train_cfg.val_interval = epochs + 1  # evaluated after training
    # The demo's schedule, in proportion to the run's length.
    cfg.param_scheduler.milestones = [round(2 * epochs / 3),
                                      round(5 * epochs / 6)]
    cfg.custom_hooks = [
        dict(type='BatchShapingWeightHook', end=epochs / 3),
        dict(type='L0WeightHook', start=epochs / 3, end=2 * epochs / 3),
    ]
    cfg.default_hooks.checkpoint = None
    cfg.log_level = 'WARNING'
    cfg.randomness = dict(seed=spec['seed'], deterministic=False)
    model = cfg.model
    model.backbone.depth = spec['depth']
    if spec['method'] in ('dense', 'static'):
        width = spec['width']
        model.type = 'ImageClassifier'
        for key in ('batch_shaping_loss', 'l0_loss'):
            model.pop(key, None)
        model.backbone = dict(type='ResNetCifar', depth=spec['depth'],
                              stem_channels=width, base_channels=width)
        model.head.in_channels = 4 * width
        cfg.custom_hooks = []
        cfg.default_hooks.pop('gate_metric', None)
        cfg.val_evaluator = cfg.test_evaluator = dict(type='Accuracy')
    else:
        cfg.l0_gamma = spec['gamma']
        if spec['method'] == 'l0':
            # As configs/resnet20_l0_cifar10.py: the same L0 schedule
            # without batch-shaping.
            model.batch_shaping_loss = None
            cfg.custom_hooks = [h for h in cfg.custom_hooks
                                if h['type'] != 'BatchShapingWeightHook']
    return cfg


def evaluate(model, dataloader):
    """Top-1, MACs, gate categories and the per-image loss/MACs
    correlation of a trained model on the validation digits."""
    import torch
    from mmgated.analysis import dense_macs
    from mmgated.analysis.gate_stats import (GateStatsCollector,
                                             classification_loss)
    from mmgated.analysis.inference import iterate_predictions
    from mmgated.analysis.macs import MacCounter
    from mmgated.analysis.study import spearman
    from mmgated.models import gate_modules
    model.eval()
    gated = bool(gate_modules(model))
    collector = GateStatsCollector(
        'classification', [str(i) for i in range(10)],
        MacCounter(model)) if gated else None
    correct, losses, shape = [], [], None
    for inputs, samples in iterate_predictions(model, dataloader):
        shape = tuple(inputs.shape[1:])
        if collector is not None:
            collector.add(samples)
        for sample in samples:
            correct.append(int(sample.pred_label) == int(sample.gt_label))
            losses.append(classification_loss(sample))
    dense = dense_macs(model, torch.zeros((1, ) + shape))['dense']
    result = dict(top1=100.0 * float(np.mean(correct)),
                  num_images=len(correct), dense_macs=dense, macs=dense)
    if collector is not None:
        report = collector.report()
        metric = report['gate_metric']
        result.update(
            macs=report['mean_macs'],
            mac_ratio=report['mac_ratio'],
            always_on=metric['gates_always_on'],
            conditional=metric['gates_conditional'],
            always_off=metric['gates_always_off'],
            per_layer={name: {k: layer[k] for k in (
                'always_on', 'conditional', 'always_off')}
                for name, layer in report['per_layer'].items()},
            spearman=spearman([r['loss'] for r in collector.rows],
                              [r['mac_ratio'] for r in collector.rows]),
            per_image=[[r['loss'], r['mac_ratio']]
                       for r in collector.rows])
    return result


def train_run(spec, data_root, run_dir, epochs, threads):
    """Train one run and write its ``metrics.json``; returns the metrics."""
    import torch
    torch.set_num_threads(threads)
    if REPO not in sys.path:  # a spawned worker of run_all
        sys.path.insert(0, REPO)
    import mmgated  # noqa: F401  registration
    from mmengine.runner import Runner
    cfg = study_config(spec, data_root, run_dir, epochs)
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = dict(spec, **evaluate(runner.model, runner.val_dataloader))
    path = osp.join(run_dir, 'metrics.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(metrics, f)
    os.replace(path + '.tmp', path)  # a killed run leaves no metrics
    return metrics


def _train_star(task):
    return train_run(*task)


def load_metrics(run_dir):
    path = osp.join(run_dir, 'metrics.json')
    if osp.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def run_all(args, data_root):
    """Train the runs without metrics, ``--jobs`` at a time, with a
    progress bar; returns every run's metrics."""
    from mmengine.utils import ProgressBar
    runs_dir = osp.join(args.work_dir, 'runs')
    specs = run_specs(args)
    done = {run_name(s): load_metrics(osp.join(runs_dir, run_name(s)))
            for s in specs}
    pending = [s for s in specs if done[run_name(s)] is None]
    print(f'[paper_study] {len(specs)} runs, {len(specs) - len(pending)} '
          f'cached in {runs_dir}, {len(pending)} to train')
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    tasks = [(s, data_root, osp.join(runs_dir, run_name(s)), args.epochs,
              threads) for s in pending]
    if tasks:
        bar = ProgressBar(len(tasks))
        if args.jobs == 1:
            results = map(_train_star, tasks)
            pool = None
        else:
            pool = multiprocessing.get_context('spawn').Pool(args.jobs)
            results = pool.imap_unordered(_train_star, tasks)
        try:
            for metrics in results:
                done[run_name(metrics)] = metrics
                bar.update()
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        sys.stdout.write('\n')
    return [done[run_name(s)] for s in specs]


# ------------------------------------------------------------ aggregation


def _group(runs, *keys):
    groups = OrderedDict()
    for run in runs:
        groups.setdefault(tuple(run.get(k) for k in keys), []).append(run)
    return groups


def summarize(runs, layer_gamma=None):
    """The study's tables from the runs' metrics.

    Returns:
        dict: ``settings`` (per method, depth, gamma or width: top-1, MAC
        ratio to the dense network of the same depth, gate categories and
        Spearman correlation, each as mean and 95 % interval over seeds),
        ``per_layer`` (Fig. 4 categories per layer at ``layer_gamma``),
        ``vs_dense_r20`` (gated ResNet-32 against dense ResNet-20) and
        ``vs_static`` (each gated setting against the static baseline of
        its depth at the same MAC ratio).
    """
    from mmgated.analysis.study import interpolate, mean_interval
    dense_macs = {depth: float(np.mean([r['macs'] for r in group]))
                  for (depth, ), group in _group(
                      [r for r in runs if r['method'] == 'dense'],
                      'depth').items()}
    settings = []
    for (method, depth, gamma, width), group in _group(
            runs, 'method', 'depth', 'gamma', 'width').items():
        reference = dense_macs.get(depth, group[0]['dense_macs'])
        row = OrderedDict(method=method, depth=depth, gamma=gamma,
                          width=width, seeds=len(group))
        row['top1'] = mean_interval([r['top1'] for r in group],
                                    limits=(0, 100))
        row['mac_ratio'] = mean_interval(
            [r['macs'] / reference for r in group], limits=(0, np.inf))
        row['macs'] = float(np.mean([r['macs'] for r in group]))
        if method in ('bas', 'l0'):
            for key in ('always_on', 'conditional', 'always_off'):
                row[key] = mean_interval([r.get(key) for r in group],
                                         limits=(0, 1))
            row['spearman'] = mean_interval(
                [r.get('spearman') for r in group], limits=(-1, 1))
        settings.append(row)

    gammas = sorted({r['gamma'] for r in runs if r.get('gamma') is not None})
    if layer_gamma is None and gammas:
        layer_gamma = gammas[(len(gammas) - 1) // 2]
    per_layer = OrderedDict()
    for (method, depth), group in _group(
            [r for r in runs if r.get('gamma') == layer_gamma],
            'method', 'depth').items():
        layers = OrderedDict()
        for name in group[0]['per_layer']:
            layers[name] = {k: float(np.mean([r['per_layer'][name][k]
                                              for r in group]))
                            for k in ('always_on', 'conditional',
                                      'always_off')}
        per_layer[f'{method}_r{depth}'] = layers

    static_curves = {}
    for row in settings:
        if row['method'] in ('dense', 'static'):
            static_curves.setdefault(row['depth'], []).append(
                (row['mac_ratio'][0], row['top1'][0]))
    vs_static = []
    vs_dense_r20 = []
    dense_r20 = next((r for r in settings if r['method'] == 'dense'
                      and r['depth'] == 20), None)
    for row in settings:
        if row['method'] not in ('bas', 'l0'):
            continue
        static = interpolate(static_curves.get(row['depth'], []),
                             row['mac_ratio'][0])
        vs_static.append(OrderedDict(
            method=row['method'], depth=row['depth'], gamma=row['gamma'],
            mac_ratio=row['mac_ratio'][0], top1=row['top1'][0],
            static_top1=static,
            difference=None if static is None else row['top1'][0] - static))
        if row['depth'] == 32 and dense_r20 is not None:
            vs_dense_r20.append(OrderedDict(
                method=row['method'], gamma=row['gamma'],
                macs_vs_dense_r20=row['macs'] / dense_r20['macs'],
                top1=row['top1'], dense_r20_top1=dense_r20['top1']))
    return OrderedDict(settings=settings, layer_gamma=layer_gamma,
                       per_layer=per_layer, vs_static=vs_static,
                       vs_dense_r20=vs_dense_r20)


def _name(row):
    method = row['method']
    if method in ('bas', 'l0'):
        what = f'{"BAS" if method == "bas" else "L0 only"}, gamma ' \
            f'{row["gamma"]:g}'
    else:
        what = 'dense' if method == 'dense' else \
            f'dense, width {row["width"]}'
    return f'ResNet-{row["depth"]} {what}'


def markdown(summary):
    """The report's tables as markdown."""
    from mmgated.analysis.study import format_interval as fmt
    lines = ['## Fig. 3: top-1 against MACs', '',
             '| model | seeds | top-1 % | MACs / dense of its depth |',
             '|---|---:|---|---|']
    for row in summary['settings']:
        lines.append(f'| {_name(row)} | {row["seeds"]} | '
                     f'{fmt(row["top1"])} | {fmt(row["mac_ratio"], 3)} |')
    lines += ['', '## Section 5.3 / Fig. 4: gate categories (> 99 % of the '
              'images)', '',
              '| model | always on | conditional | always off | Spearman '
              '(loss, MACs) |', '|---|---|---|---|---|']
    for row in summary['settings']:
        if row['method'] in ('bas', 'l0'):
            lines.append(
                f'| {_name(row)} | {fmt(row["always_on"], 1, 100)} % | '
                f'{fmt(row["conditional"], 1, 100)} % | '
                f'{fmt(row["always_off"], 1, 100)} % | '
                f'{fmt(row["spearman"])} |')
    gamma = summary['layer_gamma']
    models = list(summary['per_layer'])
    if models:
        lines += ['', f'### Per layer at gamma {gamma:g}: always on / '
                  'conditional / always off, %', '',
                  '| layer | ' + ' | '.join(models) + ' |',
                  '|---|' + '---|' * len(models)]
        names = []
        for layers in summary['per_layer'].values():
            names += [n for n in layers if n not in names]
        for name in names:
            cells = []
            for model in models:
                cats = summary['per_layer'][model].get(name)
                cells.append('-' if cats is None else ' / '.join(
                    f'{100 * cats[k]:.0f}' for k in (
                        'always_on', 'conditional', 'always_off')))
            lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    lines += ['', '## Gated against a narrow dense network of the same '
              'depth and MACs', '',
              '| model | MACs / dense | top-1 % | static top-1 % at these '
              'MACs | difference |', '|---|---:|---:|---:|---:|']
    for row in summary['vs_static']:
        static = '-' if row['static_top1'] is None else \
            f'{row["static_top1"]:.2f}'
        diff = '-' if row['difference'] is None else \
            f'{row["difference"]:+.2f}'
        lines.append(f'| {_name(row)} | {row["mac_ratio"]:.3f} | '
                     f'{row["top1"]:.2f} | {static} | {diff} |')
    if summary['vs_dense_r20']:
        lines += ['', '## Gated ResNet-32 against dense ResNet-20', '',
                  '| model | MACs / dense ResNet-20 | top-1 % | dense '
                  'ResNet-20 top-1 % |', '|---|---:|---|---|']
        for row in summary['vs_dense_r20']:
            lines.append(
                f'| {_name(dict(row, depth=32))} | '
                f'{row["macs_vs_dense_r20"]:.3f} | {fmt(row["top1"])} | '
                f'{fmt(row["dense_r20_top1"])} |')
    return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------ plots


def plot_all(runs, summary, out_dir):
    """Write the study's PNGs; returns their paths."""
    from mmgated.analysis.plots import new_figure, save_figure
    paths = []
    depths = sorted({r['depth'] for r in summary['settings']})
    fig = new_figure(5.5 * len(depths), 4.2)
    styles = dict(bas=('o-', 'BAS'), l0=('s--', 'L0 only'),
                  static=('^:', 'dense, narrower'), dense=('*', 'dense'))
    for i, depth in enumerate(depths):
        ax = fig.add_subplot(1, len(depths), i + 1)
        for method, (style, label) in styles.items():
            rows = sorted((r for r in summary['settings']
                           if r['depth'] == depth and r['method'] in (
                               (method, 'dense') if method == 'static'
                               else (method, ))),
                          key=lambda r: r['mac_ratio'][0])
            if not rows:
                continue
            x = [r['mac_ratio'][0] for r in rows]
            y = [r['top1'][0] for r in rows]
            err = [0 if r['top1'][1] is None else r['top1'][0] - r['top1'][1]
                   for r in rows]
            ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=label,
                        markersize=8 if method == 'dense' else 5)
        ax.set_xlabel('MACs / dense MACs')
        ax.set_ylabel('top-1 %')
        ax.set_title(f'ResNet-{depth} on digits (95 % CI over seeds)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths.append(save_figure(fig, osp.join(out_dir, 'fig3_tradeoff.png')))

    gated = [r for r in summary['settings'] if r['method'] in ('bas', 'l0')]
    if gated:
        fig = new_figure(max(6, 0.9 * len(gated)), 4.2)
        ax = fig.add_subplot(1, 1, 1)
        bottom = np.zeros(len(gated))
        for key, color in (('always_on', '#4c72b0'),
                           ('conditional', '#dd8452'),
                           ('always_off', '#8c8c8c')):
            values = np.array([r[key][0] for r in gated])
            ax.bar(range(len(gated)), values, bottom=bottom, color=color,
                   label=key.replace('_', ' '))
            bottom += values
        ax.set_xticks(range(len(gated)))
        ax.set_xticklabels([f'{"BAS" if r["method"] == "bas" else "L0"}\n'
                            f'R{r["depth"]} {r["gamma"]:g}' for r in gated],
                           fontsize=7)
        ax.set_ylabel('share of the gates')
        ax.set_title('Gate categories (Fig. 4), mean over seeds')
        ax.legend(fontsize=8)
        paths.append(save_figure(fig, osp.join(out_dir,
                                               'fig4_categories.png')))

    if summary['per_layer']:
        models = list(summary['per_layer'])
        fig = new_figure(6 * len(models), 4.2)
        for i, model in enumerate(models):
            ax = fig.add_subplot(1, len(models), i + 1)
            layers = summary['per_layer'][model]
            bottom = np.zeros(len(layers))
            for key, color in (('always_on', '#4c72b0'),
                               ('conditional', '#dd8452'),
                               ('always_off', '#8c8c8c')):
                values = np.array([c[key] for c in layers.values()])
                ax.bar(range(len(layers)), values, bottom=bottom,
                       color=color, label=key.replace('_', ' '))
                bottom += values
            ax.set_xticks(range(len(layers)))
            ax.set_xticklabels(
                [n.replace('backbone.', '').replace('.gate', '')
                 for n in layers], rotation=90, fontsize=6)
            ax.set_title(f'{model}, gamma {summary["layer_gamma"]:g}')
            if i == 0:
                ax.legend(fontsize=7)
        paths.append(save_figure(fig, osp.join(out_dir,
                                               'fig4_per_layer.png')))

    example = [r for r in runs if r.get('per_image')
               and r.get('gamma') == summary['layer_gamma']
               and r['method'] == 'bas']
    if example:
        run = example[0]
        loss, ratio = np.array(run['per_image'], dtype=float).T
        fig = new_figure(5.5, 4.2)
        ax = fig.add_subplot(1, 1, 1)
        ax.scatter(ratio, loss, s=6, alpha=0.5)
        ax.set_yscale('log')
        ax.set_xlabel('MACs / dense MACs of the image')
        ax.set_ylabel('cross-entropy of the image')
        ax.set_title(f'{run_name(run)}: Spearman {run["spearman"]:.2f}'
                     if run.get('spearman') is not None else run_name(run))
        paths.append(save_figure(fig, osp.join(out_dir,
                                               'loss_vs_macs.png')))
    return paths


def main(argv=None):
    args = parse_args(argv)
    sys.path[:0] = [p for p in (REPO, osp.join(REPO, 'tools'))
                    if p not in sys.path]
    import mmgated  # noqa: F401  registration
    from demo import write_digits
    args.work_dir = osp.abspath(args.work_dir)
    data_root = osp.join(args.work_dir, 'data')
    if args.max_samples is not None:
        data_root += f'-{args.max_samples}'
    write_digits(data_root, args.max_samples)
    runs = run_all(args, data_root)
    summary = summarize(runs, args.layer_gamma)
    report = markdown(summary)
    with open(osp.join(args.work_dir, 'study.md'), 'w') as f:
        f.write(report)
    with open(osp.join(args.work_dir, 'study.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    plots = plot_all(runs, summary, args.work_dir)
    print(report)
    print(f'[paper_study] wrote study.md, study.json and '
          f'{", ".join(osp.basename(p) for p in plots)} in {args.work_dir}')
    return summary


if __name__ == '__main__':
    main()
