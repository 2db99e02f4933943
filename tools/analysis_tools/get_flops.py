"""MACs and parameters of a (gated) model, like mmseg's get_flops.

Prints the MACs of the inference network at an input size (the auxiliary
head of a segmentor runs in training only and is reported apart), the MACs
of the gating modules and the parameters; works for gated and dense configs::

    python tools/analysis_tools/get_flops.py \
        configs/pspnet_gated_r50_cityscapes.py --shape 1024 2048

With a checkpoint and ``--num-samples N`` it also runs N samples of the
validation set and prints the expected (mean) conditional MACs of the
gated model and their ratio to the dense MACs at the same resolution::

    python tools/analysis_tools/get_flops.py configs/resnet20_bas_cifar10.py \
        work_dirs/r20/epoch_500.pth --shape 32 --num-samples 1000

MACs are mmengine FlopAnalyzer's "flops" (one multiply-accumulate each, an
eval-mode BatchNorm 2 per element); see :mod:`mmgated.analysis.macs`.
"""
import argparse
import os.path as osp

import numpy as np
import torch
from mmengine.config import DictAction

import mmgated  # noqa: F401  shims and registration
from mmgated.analysis.inference import (build_eval_dataloader, build_model,
                                        default_device, iterate_predictions)
from mmgated.analysis.macs import (MacCounter, analyzer_macs, aux_heads,
                                   count_macs)
from mmgated.models import gate_modules
from mmgated.utils.run_config import check_config_data, load_run_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='MACs and parameters of a (gated) model')
    parser.add_argument('config', help='config file')
    parser.add_argument(
        'checkpoint', nargs='?', help='checkpoint (needed for --num-samples)')
    parser.add_argument(
        '--shape', type=int, nargs='+', default=None,
        help='input size H [W] (default: the config\'s crop_size, else '
        '224)')
    parser.add_argument(
        '--num-samples', type=int, default=0,
        help='with a checkpoint: run this many validation samples and '
        'print the mean conditional MACs')
    parser.add_argument(
        '--split', default='val', choices=['val', 'test'],
        help='dataloader of --num-samples')
    parser.add_argument(
        '--device', default=None, help='cuda or cpu (default: cuda if any)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value pairs')
    args = parser.parse_args(argv)
    if args.shape is not None and len(args.shape) not in (1, 2):
        parser.error(f'--shape takes H or H W, got {args.shape}')
    if args.shape is not None and min(args.shape) < 1:
        parser.error(f'--shape sizes must be >= 1, got {args.shape}')
    if args.num_samples < 0:
        parser.error(f'--num-samples must be >= 0, got {args.num_samples}')
    if args.num_samples and not args.checkpoint:
        parser.error('--num-samples needs a CHECKPOINT: the gates of an '
                     'untrained model say nothing about conditional MACs')
    if args.checkpoint and not osp.isfile(args.checkpoint):
        parser.error(f'checkpoint {args.checkpoint!r} does not exist')
    return args


def input_size(shape, cfg):
    """``(H, W)`` from ``--shape`` or the config's ``crop_size``."""
    if shape is None:
        crop = cfg.get('crop_size')
        return tuple(crop) if crop else (224, 224)
    return (shape[0], shape[0]) if len(shape) == 1 else tuple(shape)


def format_macs(value: float) -> str:
    for scale, unit in ((1e9, 'G'), (1e6, 'M'), (1e3, 'K')):
        if abs(value) >= scale:
            return f'{value / scale:.4g} {unit}MACs'
    return f'{value:.4g} MACs'


def format_params(value: float) -> str:
    for scale, unit in ((1e6, 'M'), (1e3, 'K')):
        if abs(value) >= scale:
            return f'{value / scale:.4g} {unit}'
    return f'{value:.0f}'


def num_params(modules) -> int:
    params = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in params.values())


def static_counts(model, inputs) -> dict:
    """Dense, gating and auxiliary-head MACs and the parameter counts."""
    gates = list(gate_modules(model).values())
    aux = aux_heads(model)
    if gates:
        counted = count_macs(model, inputs)
        result = dict(
            dense=counted['dense'], gating=counted['gating'],
            aux_head=counted.get('aux_head'))
    else:
        dense = analyzer_macs(model, inputs)
        aux_macs = None
        if aux and hasattr(model, 'extract_feat'):
            with torch.no_grad():
                feats = model.extract_feat(inputs)
            aux_macs = sum(analyzer_macs(h, (feats, )) for h in aux)
        result = dict(dense=dense, gating=0.0, aux_head=aux_macs)
    total = num_params([model])
    gating = num_params(gates)
    aux_params = num_params(aux)
    result.update(
        params_dense=total - gating - aux_params,
        params_gating=gating,
        params_aux=aux_params)
    return result


def expected_macs(model, cfg, split, num_samples):
    """Mean conditional and dense MACs over ``num_samples`` samples."""
    loader = build_eval_dataloader(cfg, split)
    conditional, dense = [], []
    counter = MacCounter(model)
    for _, samples in iterate_predictions(model, loader, num_samples):
        for sample in samples:
            if 'gate_open' not in sample:
                raise RuntimeError(
                    'the predictions carry no gate record; use '
                    "whole-image inference (test_cfg mode='whole')")
            counted = counter(sample.metainfo)
            conditional.append(counted['conditional_macs'])
            dense.append(counted['dense_macs'])
    conditional, dense = np.array(conditional), np.array(dense)
    ratios = conditional / dense
    return dict(
        num_samples=len(conditional), mean_macs=conditional.mean(),
        dense_macs=dense.mean(), mac_ratio=ratios.mean(),
        mac_ratio_std=ratios.std())


def main(argv=None):
    args = parse_args(argv)
    cfg = load_run_config(args.config, args.cfg_options)
    device = args.device or default_device()
    model = build_model(cfg, args.checkpoint, device)
    height, width = input_size(args.shape, cfg)
    inputs = torch.zeros(1, 3, height, width, device=device)
    counts = static_counts(model, inputs)
    gated = bool(gate_modules(model))

    line = '=' * 60
    print(line)
    print(f'Config: {args.config}')
    print(f'Input shape: (3, {height}, {width})')
    print(f'Dense MACs (inference network): {format_macs(counts["dense"])}')
    if gated:
        share = counts['gating'] / counts['dense']
        print(f'Gating modules MACs: {format_macs(counts["gating"])} '
              f'({share:.3%} of dense)')
        print('Conditional MACs, all gates open: '
              f'{format_macs(counts["dense"] + counts["gating"])}')
    if counts['aux_head'] is not None:
        print('Auxiliary head MACs (training only, not included): '
              f'{format_macs(counts["aux_head"])}')
    print(f'Params (inference network, dense): '
          f'{format_params(counts["params_dense"])}')
    if gated:
        print(f'Params (gating modules): '
              f'{format_params(counts["params_gating"])}')
    if counts['params_aux']:
        print(f'Params (auxiliary head, not included): '
              f'{format_params(counts["params_aux"])}')
    result = dict(counts)
    if args.num_samples:
        if not gated:
            raise ValueError(f'{args.config} is not a gated model; '
                             '--num-samples needs one')
        check_config_data(cfg, splits=(args.split, ))
        expected = expected_macs(model, cfg, args.split, args.num_samples)
        result.update(expected)
        print(f'Expected conditional MACs over {expected["num_samples"]} '
              f'{args.split} samples (at their own resolution): '
              f'{format_macs(expected["mean_macs"])} of dense '
              f'{format_macs(expected["dense_macs"])}, ratio '
              f'{expected["mac_ratio"]:.4f} +- '
              f'{expected["mac_ratio_std"]:.4f}')
    print(line)
    return result


if __name__ == '__main__':
    main()
