"""Overhead of the gating modules per residual block (paper section 4.1).

The paper: "Our gating module is computationally inexpensive, and has an
additional overhead that is between 0.018% - 0.087% of a ResNet block
multiply-accumulate (MAC) usage." This script measures that ratio for the
gated ImageNet ResNets of this repo (mmpretrain ``GatedResNet``)::

    python tools/analysis_tools/gate_overhead.py --depths 18 34 50 \
        --shape 224 --out overhead.json

The gate's MACs include its global average pooling (one addition per pooled
element), which mmengine's analyzer leaves out; the ``fc only`` columns
show the figure without it.
"""
import argparse
import json

import torch

import mmgated  # noqa: F401  shims and registration
from mmgated.analysis import block_gate_overhead, count_macs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='MACs of the gating modules per residual block')
    parser.add_argument(
        '--depths', type=int, nargs='+', default=[18, 34, 50],
        help='ResNet depths (18, 34, 50, 101, 152)')
    parser.add_argument(
        '--shape', type=int, nargs='+', default=[224],
        help='input size: H [W]')
    parser.add_argument(
        '--position', default='after_conv2',
        help="gate position of Bottleneck blocks ('after_conv1', "
        "'after_conv2', 'both')")
    parser.add_argument(
        '--per-block', action='store_true', help='print every block')
    parser.add_argument('--out', help='write the rows to this JSON file')
    return parser.parse_args(argv)


def input_shape(shape):
    """``(H, W)`` from the ``--shape`` arguments."""
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return tuple(shape)
    raise ValueError(f'--shape takes H or H W, got {shape}')


def measure(depth, height, width, position='after_conv2'):
    """Per-block overhead rows and whole-network figures of a gated ResNet.

    Args:
        depth (int): ResNet depth.
        height (int): Input height.
        width (int): Input width.
        position (str): Gate position of Bottleneck blocks.

    Returns:
        dict: ``rows`` (see :func:`block_gate_overhead`), ``dense`` and
        ``gating`` (whole network, per image).
    """
    from mmpretrain.models.backbones.resnet import BasicBlock
    from mmgated.models.backbones.mmpretrain_resnet import GatedResNet
    gate_cfg = dict()
    if GatedResNet.arch_settings[depth][0].__bases__[-1] is not BasicBlock:
        gate_cfg['position'] = position
    model = GatedResNet(depth=depth, gate_cfg=gate_cfg)
    inputs = torch.zeros(1, 3, height, width)
    rows = block_gate_overhead(model, inputs)
    macs = count_macs(model, inputs)
    return dict(rows=rows, dense=macs['dense'], gating=macs['gating'])


def summary_line(depth, result):
    rows = result['rows']
    over = [r['overhead'] for r in rows]
    fc = [r['overhead_fc'] for r in rows]
    return (f'| ResNet-{depth} | {len(rows)} | {min(over):.3%} | '
            f'{max(over):.3%} | {min(fc):.4%} | {max(fc):.4%} | '
            f'{result["dense"] / 1e9:.3f} G | '
            f'{result["gating"] / result["dense"]:.3%} |')


def main(argv=None):
    args = parse_args(argv)
    height, width = input_shape(args.shape)
    results = {}
    for depth in args.depths:
        results[depth] = measure(depth, height, width, args.position)
    print(f'Input {height}x{width}; gate overhead = gating-module MACs / '
          'MACs of its (dense) block')
    print('| model | gated blocks | min | max | min (fc only) | '
          'max (fc only) | dense MACs | all gates / dense |')
    print('|---|---|---|---|---|---|---|---|')
    for depth, result in results.items():
        print(summary_line(depth, result))
    if args.per_block:
        for depth, result in results.items():
            print(f'\nResNet-{depth}')
            for row in result['rows']:
                print(f'  {row["block"]:<18} block {row["block_macs"]:>14,.0f}'
                      f'  gate {row["gate_macs"]:>10,.0f}'
                      f'  {row["overhead"]:.4%}'
                      f'  (fc only {row["overhead_fc"]:.4%})')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({f'resnet{d}': r for d, r in results.items()}, f,
                      indent=2)
    return results


if __name__ == '__main__':
    main()
