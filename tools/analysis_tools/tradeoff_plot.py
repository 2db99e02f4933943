"""Task metric against MAC ratio of several runs (the paper's Fig. 3).

Reads the validation metrics that mmengine logged in each work dir
(``<work_dir>/<timestamp>/vis_data/scalars.json`` or ``<timestamp>.json``:
one JSON object per line; ``tools/test.py`` writes
``<work_dir>/<timestamp>/<timestamp>.json``, one object) and plots the task
metric against ``gates/mac_ratio`` of :class:`~mmgated.evaluation.GateMetric`
(add ``dict(type='GateMetric')`` to the config's ``val_evaluator``). Runs
without a MAC ratio are dense baselines, drawn at ratio 1.0 as stars. Runs
that share a label form one series::

    python tools/analysis_tools/tradeoff_plot.py \
        work_dirs/r20_bas_g* work_dirs/r32_bas_g* work_dirs/r20 work_dirs/r32 \
        --labels R20-BAS R20-BAS R32-BAS R32-BAS R20 R32 \
        --metric accuracy/top1 --out tradeoff.png

A work dir may also be given as a JSON log file directly.
"""
import argparse
import glob
import json
import os.path as osp
from typing import List, Optional

MAC_RATIO_KEYS = ('gates/mac_ratio', 'mac_ratio')
# mmpretrain's accuracies and mmseg's IoU/accuracy metrics are percentages.
PERCENT_METRICS = ('accuracy/', 'mIoU', 'aAcc', 'mAcc', 'mDice', 'mFscore')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Plot task metric vs MAC ratio of several runs')
    parser.add_argument(
        'work_dirs', nargs='+', help='mmengine work dirs (or JSON logs)')
    parser.add_argument(
        '--metric', default=None,
        help="task metric key, e.g. 'accuracy/top1' or 'mIoU' (default: "
        'the first of these that the logs have)')
    parser.add_argument(
        '--labels', nargs='+',
        help='one label per work dir; runs with the same label form a '
        'series (default: the work dir names)')
    parser.add_argument(
        '--select', choices=['last', 'best'], default='last',
        help='which validation of a run to plot: the last one or the one '
        'with the best metric')
    parser.add_argument('--title', default='Accuracy vs computation')
    parser.add_argument(
        '--ylabel', help='y-axis label (default: the metric and its unit)')
    parser.add_argument(
        '--out', default='tradeoff.png', help='output PNG file')
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.work_dirs):
        parser.error(f'--labels has {len(args.labels)} labels for '
                     f'{len(args.work_dirs)} work dirs; give one per dir')
    return args


def read_json_records(path: str) -> List[dict]:
    """The JSON objects of a log: one per line, or a single object."""
    with open(path) as f:
        text = f.read()
    records = []
    try:
        value = json.loads(text)
        return [value] if isinstance(value, dict) else []
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path}:{number} is not JSON: {e}') from e
        if isinstance(value, dict):
            records.append(value)
    return records


def log_files(work_dir: str) -> List[str]:
    """The metric logs of a work dir, newest run first.

    Looks for ``<ts>/vis_data/scalars.json``, ``<ts>/vis_data/<ts>.json``
    and ``<ts>/<ts>.json``; a file is returned as is.
    """
    if osp.isfile(work_dir):
        return [work_dir]
    if not osp.isdir(work_dir):
        raise FileNotFoundError(f'work dir {work_dir!r} does not exist')
    found = []
    for run in sorted(glob.glob(osp.join(work_dir, '*')), reverse=True):
        if not osp.isdir(run):
            continue
        stamp = osp.basename(run)
        for candidate in (osp.join(run, 'vis_data', 'scalars.json'),
                          osp.join(run, 'vis_data', f'{stamp}.json'),
                          osp.join(run, f'{stamp}.json')):
            if osp.isfile(candidate):
                found.append(candidate)
    return found


def pick_metric(records: List[dict], metric: Optional[str]) -> Optional[str]:
    if metric is not None:
        return metric
    for key in ('accuracy/top1', 'mIoU', 'aAcc'):
        if any(key in r for r in records):
            return key
    return None


def run_result(work_dir: str, metric: Optional[str], select: str = 'last'
               ) -> dict:
    """The metric and MAC ratio of one run.

    Args:
        work_dir (str): A work dir or a JSON log.
        metric (str, optional): The task metric key; None picks
            ``accuracy/top1`` or ``mIoU``.
        select (str): ``'last'`` or ``'best'`` validation.

    Returns:
        dict: ``metric`` (value), ``metric_name``, ``mac_ratio`` (None for a
        dense run), ``source`` (the log file) and ``step``.

    Raises:
        ValueError: No log of the run has the metric.
    """
    tried = []
    for path in log_files(work_dir):
        records = read_json_records(path)
        name = pick_metric(records, metric)
        if name is None:
            tried.append(path)
            continue
        hits = [r for r in records if name in r]
        if not hits:
            tried.append(path)
            continue
        record = hits[-1] if select == 'last' else max(
            hits, key=lambda r: r[name])
        ratio = next((record[k] for k in MAC_RATIO_KEYS if k in record),
                     None)
        return dict(
            metric=float(record[name]),
            metric_name=name,
            mac_ratio=None if ratio is None else float(ratio),
            source=path,
            step=record.get('step'))
    raise ValueError(
        f'no validation metric {metric or "accuracy/top1 or mIoU"!r} in '
        f'{work_dir!r} (looked at {tried or "no log file"}); pass --metric')


def main(argv=None):
    args = parse_args(argv)
    labels = args.labels or [
        osp.basename(osp.normpath(d)) for d in args.work_dirs
    ]
    runs = []
    for work_dir, label in zip(args.work_dirs, labels):
        result = run_result(work_dir, args.metric, args.select)
        result['label'] = label
        runs.append(result)
        ratio = ('dense' if result['mac_ratio'] is None else
                 f'{result["mac_ratio"]:.4f}')
        print(f'{label:<20} {result["metric_name"]}={result["metric"]:.4g}'
              f'  mac_ratio={ratio}  ({result["source"]})')
    names = {r['metric_name'] for r in runs}
    if len(names) > 1:
        raise ValueError(f'the runs report different metrics {sorted(names)}'
                         '; pass --metric')
    name = names.pop()
    ylabel = args.ylabel or (f'{name} (%)' if name.startswith(
        PERCENT_METRICS) else name)
    from mmgated.analysis import plots
    fig = plots.plot_tradeoff(runs, metric_name=ylabel, title=args.title)
    plots.save_figure(fig, args.out)
    print(f'wrote {args.out}')
    return runs


if __name__ == '__main__':
    main()
