"""Latency of one convolution over open channels, three ways.

For the 3x3 convolutions of ResNet-34's stages at 224x224 (one sample), with
some of the channels open, this times:

* ``dense``: ``F.conv2d`` with all channels (oneDNN), the dense network's
  layer;
* ``gathered``: skip execution's ``'torch'`` backend: the open part of the
  weight gathered with ``index_select``, then ``F.conv2d``;
* ``backend``: the skip backend of ``--backend`` (default ``'compiled'``:
  :func:`mmgated.ops.gathered_conv2d`, which reads the open part of the
  weight in place).

Each for the output-gated convolution (open output channels, all inputs:
conv1 of a block) and the input-gated one (open input channels, all
outputs: conv2), through the backends' own entry (as skip execution calls
them). The weights cycle through several copies, so that they come from
memory as in a network rather than from cache. It reports the median
latency and the rate in GMAC/s of the open channels' MACs.

Example::

    python benchmarks/gathered_conv.py --threads 1 --fractions 0.5 1.0
"""
import argparse
import os.path as osp
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

# (channels, map size) of ResNet-34's 3x3 stride-1 convolutions at 224x224
STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))
BACKENDS = ('auto', 'torch', 'compiled')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='One convolution over open channels: dense oneDNN, '
        "skip execution's torch backend and the backend of --backend")
    parser.add_argument(
        '--fractions', nargs='+', type=float, default=[0.5, 1.0],
        help='fractions of the gated channels open (rounded, at random)')
    parser.add_argument(
        '--backend', choices=BACKENDS, default='compiled',
        help='the skip backend timed against dense and torch (default: '
        "compiled; 'auto': the one skip execution picks on this machine)")
    parser.add_argument(
        '--repeats', type=int, default=40, help='timed calls of each way')
    parser.add_argument(
        '--threads', type=int, default=None,
        help='torch.set_num_threads (default: all cores of this process)')
    parser.add_argument(
        '--copies', type=int, default=6,
        help='weight copies cycled through, so that weights come from memory')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument('--out', help='write the results to this JSON file')
    args = parser.parse_args(argv)
    for value in args.fractions:
        if not 0 < value <= 1:
            raise SystemExit(f'--fractions: {value} is not in (0, 1]')
    if args.repeats < 1 or args.copies < 1:
        raise SystemExit('--repeats and --copies must be >= 1')
    return args


class CyclingLayer:
    """A 3x3 convolution as a skip backend reads a layer of its plan (see
    :class:`mmgated.models.skip_execution.FoldedConv`), its weight taken
    from the copy ``index`` selects."""

    def __init__(self, weights, bias, size):
        channels = weights[0].shape[0]
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)  # geometry
        self.weights, self.bias = weights, bias
        self.out_size = (size, size)
        self.route = None
        self.index = 0

    def weight_bias(self):
        return self.weights[self.index % len(self.weights)], self.bias


def _median_ms(call, repeats):
    call(0)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


def benchmark(channels, size, fraction, backend, args):
    """Rows for one stage and fraction: output-gated and input-gated."""
    from mmgated.models.skip_backends import TorchSkipBackend
    gen = torch.Generator().manual_seed(args.seed)
    weights = [
        torch.randn(channels, channels, 3, 3, generator=gen)
        for _ in range(args.copies)
    ]
    bias = torch.randn(channels, generator=gen)
    count = max(1, round(fraction * channels))
    open_ = torch.randperm(channels, generator=gen)[:count].sort()[0]
    full = torch.randn(1, channels, size, size, generator=gen)
    part = torch.randn(1, count, size, size, generator=gen)
    macs = count * channels * 9 * size * size

    def way(skip_backend, x, in_idx, out_idx):
        layer = CyclingLayer(weights, bias, size)
        layer.route = skip_backend.route(layer, x)

        def call(i):
            layer.index = i
            skip_backend.conv(layer, x, in_idx, out_idx)

        return call

    rows = []
    for gated, x, in_idx, out_idx in (('output', full, None, open_),
                                      ('input', part, open_, None)):
        times = dict(
            dense=_median_ms(
                lambda i: F.conv2d(full, weights[i % len(weights)], bias, 1,
                                   1), args.repeats),
            gathered=_median_ms(
                way(TorchSkipBackend(), x, in_idx, out_idx), args.repeats),
            backend=_median_ms(
                way(backend, x, in_idx, out_idx), args.repeats))
        rows.append(
            dict(channels=channels, size=size, gated=gated, open=count,
                 backend=backend.name,
                 **{f'{k}_ms': v for k, v in times.items()},
                 backend_gmacs=macs / times['backend'] / 1e6,
                 backend_vs_gathered=times['backend'] / times['gathered'],
                 backend_vs_dense=times['backend'] / times['dense']))
    return rows


def markdown(rows):
    lines = [
        '| channels | map | gated | open | backend | dense ms | gathered + '
        'F.conv2d ms | backend ms | backend GMAC/s | backend/gathered | '
        'backend/dense |',
        '|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|'
    ]
    for r in rows:
        lines.append(
            f'| {r["channels"]} | {r["size"]}x{r["size"]} | {r["gated"]} | '
            f'{r["open"]} | {r["backend"]} | {r["dense_ms"]:.2f} | '
            f'{r["gathered_ms"]:.2f} | {r["backend_ms"]:.2f} | '
            f'{r["backend_gmacs"]:.1f} | {r["backend_vs_gathered"]:.2f} | '
            f'{r["backend_vs_dense"]:.2f} |')
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmgated.models.skip_backends import build_skip_backend
    try:
        backend = build_skip_backend(args.backend)
    except RuntimeError as error:  # the compiled kernels do not build
        raise SystemExit(str(error))
    rows = []
    with torch.no_grad():  # as skip execution at inference
        for fraction in args.fractions:
            for channels, size in STAGES:
                rows.extend(benchmark(channels, size, fraction, backend,
                                      args))
    from gated_inference import environment, save_results
    env = environment(args)
    print(f'torch {env["torch"]}, {env["cpu"]}, {env["threads"]} threads; '
          f'median of {args.repeats} calls, wall clock')
    print(markdown(rows))
    save_results(args.out, env, args, rows)
    return rows


if __name__ == '__main__':
    main()
