"""Compact a trained gated model: remove its static channels.

::

    python tools/deploy/compact.py CONFIG CHECKPOINT --out DIR \
        [--calib-samples N] [--threshold T]

Measures how often each gate opens on the validation split (or its first
``--calib-samples`` images), removes the channels that are always off,
ungates the always-on ones (see :func:`mmgated.deploy.compact_model`), then
evaluates the gated and the compact model on the whole validation split
with the config's ``val_evaluator``. Writes into ``DIR``:

* ``compact_config.py``: the config with the compact architecture
  (``model.backbone.channel_layout``), which ``tools/test.py`` and
  ``tools/deploy/export_onnx.py`` run with
* ``compact.pth``: its checkpoint;
* ``compact_report.json``: MACs per image (dense, the gated model's mean
  conditional, the compact model's static and mean conditional), the
  metrics of both models, their parameters and the channel counts.

Every check (threshold, output directory, checkpoint, model, data) runs
before anything is written; an existing, non-empty ``DIR`` is refused
unless ``--force``.
"""
import argparse
import copy
import json
import os
import os.path as osp
import re

import torch
from mmengine.config import DictAction
from mmengine.evaluator import Evaluator
from mmengine.registry import init_default_scope

import mmgated  # noqa: F401  shims and registration
from mmgated.analysis.inference import (build_eval_dataloader, build_model,
                                        default_device, iterate_predictions)
from mmgated.analysis.macs import MacCounter
from mmgated.deploy import (compact_model, count_open_gates,
                            open_rates_from_counts, static_channels)
from mmgated.deploy.compact import check_model_compactable, check_threshold
from mmgated.evaluation import GateMetric
from mmgated.models import gate_modules
from mmgated.utils.checkpoint_io import (CheckpointError, add_checksum,
                                         load_checked_state_dict,
                                         read_checkpoint)
from mmgated.utils.outputs import check_output_free
from mmgated.utils.run_config import check_config_data, load_run_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Remove the static channels of a trained gated model')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint of the gated model')
    parser.add_argument('--out', required=True, help='output directory')
    parser.add_argument(
        '--calib-samples',
        type=int,
        help='calibrate on the first N validation images (default: all)')
    parser.add_argument(
        '--threshold',
        type=float,
        default=1.0,
        help='a channel open (closed) for at least this fraction of the '
        'calibration images is always on (off); in [0.5, 1], default 1: '
        'open (closed) for every one')
    parser.add_argument(
        '--force', action='store_true', help='write into a non-empty --out')
    parser.add_argument(
        '--device', default=None, help='cuda or cpu (default: cuda if any)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value pairs')
    return parser.parse_args(argv)


def load_gated_model(cfg, checkpoint_file, device):
    """The config's model with the checkpoint's weights, which must include
    trained gates and fit the model exactly."""
    model = build_model(cfg)
    checkpoint = read_checkpoint(checkpoint_file)
    names = {re.sub(r'^module\.', '', k)
             for k in checkpoint.get('state_dict', checkpoint)}
    gate_keys = [f'{name}.{key}'
                 for name, gate in gate_modules(model).items()
                 for key in gate.state_dict()]
    if not gate_keys:
        raise ValueError('the model of the config has no gates; compact '
                         'needs a gated model')
    if not any(key in names for key in gate_keys):
        raise CheckpointError(
            f'checkpoint {checkpoint_file!r} has no gate weights (no '
            f'{gate_keys[0]}, ...): it is a dense checkpoint, whose gates '
            'were never trained. Compact a checkpoint of a trained gated '
            'model.')
    load_checked_state_dict(model, checkpoint, checkpoint_file)
    return model.to(device).eval(), checkpoint


def _record(sample):
    gate_open = sample.get('gate_open')
    if gate_open is None:
        raise ValueError(
            'a prediction carries no gate record: compact needs whole-image '
            "inference; pass --cfg-options model.test_cfg.mode='whole'")
    return dict(gate_open=gate_open,
                gate_input_sizes=sample.get('gate_input_sizes'),
                model_input_shape=sample.get('model_input_shape'))


def evaluate(model, cfg, dataloader):
    """Run the validation data through ``model``.

    Returns:
        tuple: The ``val_evaluator``'s metrics, the per-image MAC records
        (``conditional_macs``, ``dense_macs``, ``static_macs``: the model
        without gating modules, all channels computed) and the gates' open
        counts (:func:`count_open_gates`).
    """
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    evaluator = Evaluator(copy.deepcopy(cfg.val_evaluator))
    evaluator.dataset_meta = getattr(dataloader.dataset, 'metainfo', None)
    counter = MacCounter(model)
    for metric in evaluator.metrics:
        if isinstance(metric, GateMetric):
            metric.mac_counter = counter
    records = []

    def batches():
        for _, results in iterate_predictions(model, dataloader):
            evaluator.process(results)
            for sample in results:
                record = _record(sample)
                macs = counter(record)
                macs['static_macs'] = counter.dense(
                    record['model_input_shape'])['dense']
                records.append(macs)
            yield

    counts = count_open_gates(model, batches())
    metrics = evaluator.evaluate(len(records))
    return metrics, records, counts


def calibration_counts(model, dataloader, num_samples):
    """Open counts of the gates over the first ``num_samples`` images."""
    return count_open_gates(
        model, iterate_predictions(model, dataloader, num_samples))


def _mean(records, key):
    return sum(r[key] for r in records) / len(records)


def compact_config(cfg, layout):
    """``cfg`` with the compact backbone; pretrained initialisation of the
    dense backbone no longer fits it and is dropped."""
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone.channel_layout = dict(layout)
    cfg.model.backbone.pop('init_cfg', None)
    if 'pretrained' in cfg.model:
        cfg.model.pretrained = None
    cfg.load_from = None
    return cfg


def channel_counts(open_rates, threshold):
    """Total always-on, conditional and always-off channels."""
    totals = dict(always_on=0, conditional=0, always_off=0)
    for rate in open_rates.values():
        for kind, mask in static_channels(rate, threshold).items():
            totals[kind] += int(mask.sum())
    return totals


def write_checkpoint(model, source_checkpoint, cfg, path, info):
    meta = dict(source_checkpoint.get('meta') or {})
    meta.pop('mmgated_checksum', None)
    meta['cfg'] = cfg.pretty_text
    meta['mmgated_compact'] = info
    checkpoint = dict(meta=meta, state_dict=model.state_dict())
    add_checksum(checkpoint)
    tmp = f'{path}.{os.getpid()}.tmp'
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    threshold = check_threshold(args.threshold)
    if args.calib_samples is not None and args.calib_samples < 1:
        raise ValueError(f'--calib-samples={args.calib_samples}: a '
                         'calibration set of zero images shows no gate; '
                         'give N >= 1, or leave it out to use the whole '
                         'validation split')
    check_output_free(args.out, args.force)
    cfg = load_run_config(args.config, args.cfg_options)
    check_config_data(cfg, splits=('val', ))
    device = args.device or default_device()
    model, checkpoint = load_gated_model(cfg, args.checkpoint, device)
    check_model_compactable(model)
    dataloader = build_eval_dataloader(cfg, 'val')
    if len(dataloader.dataset) == 0:
        raise ValueError('the validation split of the config has zero '
                         'images to calibrate the gates on')

    gated_metrics, gated_records, counts = evaluate(model, cfg, dataloader)
    num_calib = len(gated_records)
    if args.calib_samples is not None and args.calib_samples < num_calib:
        num_calib = args.calib_samples
        counts = calibration_counts(model, dataloader, num_calib)
    open_rates = open_rates_from_counts(counts)
    compact = compact_model(model, open_rates, threshold)
    compact_metrics, compact_records, _ = evaluate(compact, cfg, dataloader)

    backbone = getattr(compact, 'backbone', compact)
    out_cfg = compact_config(cfg, backbone.channel_layout)
    dense = _mean(gated_records, 'dense_macs')
    report = dict(
        config=args.config,
        checkpoint=args.checkpoint,
        threshold=threshold,
        calibration_samples=num_calib,
        eval_samples=len(gated_records),
        channels=channel_counts(open_rates, threshold),
        dense_macs=dense,
        gated_mean_macs=_mean(gated_records, 'conditional_macs'),
        compact_static_macs=_mean(compact_records, 'static_macs'),
        compact_mean_macs=_mean(compact_records, 'conditional_macs'),
        params_gated=sum(p.numel() for p in model.parameters()),
        params_compact=sum(p.numel() for p in compact.parameters()),
        gated_metrics=gated_metrics,
        compact_metrics=compact_metrics,
        channel_layout=backbone.channel_layout)

    os.makedirs(args.out, exist_ok=True)
    config_path = osp.join(args.out, 'compact_config.py')
    out_cfg.dump(config_path)
    write_checkpoint(
        compact, checkpoint, out_cfg, osp.join(args.out, 'compact.pth'),
        dict(source=args.checkpoint, threshold=threshold,
             calibration_samples=num_calib))
    with open(osp.join(args.out, 'compact_report.json'), 'w') as f:
        json.dump(report, f, indent=2, default=float)
    print_report(report)
    print(f'[compact] wrote {config_path}, compact.pth and '
          f'compact_report.json in {args.out}')
    return report


def print_report(report):
    dense = report['dense_macs']
    ch = report['channels']
    print(f'[compact] {report["calibration_samples"]} calibration images, '
          f'threshold {report["threshold"]}: channels always on '
          f'{ch["always_on"]}, conditional {ch["conditional"]}, always off '
          f'{ch["always_off"]}')
    rows = [('dense', dense),
            ('gated, mean conditional', report['gated_mean_macs']),
            ('compact, static', report['compact_static_macs']),
            ('compact, mean conditional', report['compact_mean_macs'])]
    for name, macs in rows:
        print(f'  MACs/image {name:<26} {macs / 1e6:10.3f} M  '
              f'({macs / dense:.3f} of dense)')
    print(f'  parameters gated {report["params_gated"]}, compact '
          f'{report["params_compact"]}')
    for name in ('gated', 'compact'):
        metrics = ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else
                            f'{k} {v}'
                            for k, v in report[f'{name}_metrics'].items())
        print(f'  {name} on {report["eval_samples"]} images: {metrics}')


if __name__ == '__main__':
    main()
