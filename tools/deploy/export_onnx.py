"""Export a gated (or dense) model to ONNX, checked in onnxruntime.

::

    python tools/deploy/export_onnx.py CONFIG CHECKPOINT --out model.onnx

The graph is the model's mask execution (see :mod:`mmgated.deploy`) with a
dynamic batch axis; its input is the preprocessed image batch (normalised,
RGB order as the config's data preprocessor makes it), its output the class
scores (classifier) or the decode head's logits (segmentor). After writing
it, the tool runs it in onnxruntime against PyTorch on a random batch and
on the first images of the config's test data (when present) and fails if
any output differs by more than ``--tolerance``.
"""
import argparse
import os
import os.path as osp
import sys

import torch
from mmengine.config import DictAction

import mmgated  # noqa: F401  shims and registration
from mmgated.analysis.inference import build_eval_dataloader, build_model
from mmgated.deploy import export_onnx, onnxruntime_difference
from mmgated.utils.checkpoint_io import (load_checked_state_dict,
                                         read_checkpoint)
from mmgated.utils.outputs import check_output_free
from mmgated.utils.run_config import load_run_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a model to ONNX (mask execution) and check it '
        'in onnxruntime')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', required=True, help='the .onnx file')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='input height and width (default: those of the first test '
        'batch of the config)')
    parser.add_argument(
        '--check-samples',
        type=int,
        default=4,
        help='test images compared in onnxruntime (0: random input only)')
    parser.add_argument(
        '--tolerance',
        type=float,
        default=1e-4,
        help='largest allowed |onnxruntime - PyTorch| of an output')
    parser.add_argument('--opset', type=int, default=18, help='ONNX opset')
    parser.add_argument(
        '--force', action='store_true', help='overwrite an existing --out')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value pairs')
    return parser.parse_args(argv)


def real_batches(cfg, model, num_samples, shape):
    """Up to ``num_samples`` preprocessed test images of the exported
    shape, in batches; none when the config has no readable test data."""
    if num_samples < 1:
        return []
    try:
        loader = build_eval_dataloader(
            cfg, 'test', batch_size=1, num_workers=0)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f'[export_onnx] no test data to compare on ({error}); random '
              'input only')
        return []
    images = []
    for batch in loader:
        inputs = model.data_preprocessor(batch, False)['inputs']
        if shape is None or tuple(inputs.shape[2:]) == tuple(shape):
            images.append(inputs)
        if len(images) == num_samples:
            break
    return [torch.cat(images)] if images else []


def main(argv=None):
    args = parse_args(argv)
    if not 0 < args.tolerance < float('inf'):
        raise ValueError(f'--tolerance={args.tolerance} must be a finite '
                         'number > 0')
    if args.check_samples < 0:
        raise ValueError(f'--check-samples={args.check_samples} must be '
                         '>= 0')
    check_output_free(args.out, args.force)
    cfg = load_run_config(args.config, args.cfg_options)
    model = build_model(cfg)
    load_checked_state_dict(model, read_checkpoint(args.checkpoint),
                            args.checkpoint)
    model.eval()

    real = real_batches(cfg, model, args.check_samples, args.shape)
    if args.shape is not None:
        shape = tuple(args.shape)
    elif real:
        shape = tuple(real[0].shape[2:])
    else:
        raise ValueError('the config has no readable test data to take the '
                         'input size from: pass --shape H W')
    generator = torch.Generator().manual_seed(0)
    random_batch = torch.randn((2, 3) + shape, generator=generator)

    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    was_skip = export_onnx(model, random_batch[:1], args.out, args.opset)
    if was_skip:
        print('[export_onnx] the model was set to skip execution; it is '
              'exported in mask execution, which gives the same outputs '
              '(skip execution has no static graph)')
    # Batch 2 and the real batch's size differ from the traced batch of 1:
    # the check also covers the dynamic batch axis.
    difference = onnxruntime_difference(model, args.out,
                                        [random_batch] + real)
    checked = 'a random batch' + (
        f' and {len(real[0])} test images' if real else '')
    print(f'[export_onnx] wrote {args.out} (input 3x{shape[0]}x{shape[1]}, '
          f'dynamic batch); onnxruntime vs PyTorch on {checked}: max '
          f'|difference| {difference:.2e}')
    if not difference <= args.tolerance:
        print(f'[export_onnx] the difference exceeds --tolerance '
              f'{args.tolerance}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
