"""Speed of the compact model against the dense and the gated model.

A gated backbone gets gates with a known share of static channels (per
gate, ``--off`` of the channels always closed, ``--on`` always open, the
rest conditional on the input); :func:`mmgated.deploy.compact_model`
removes the static ones after a calibration batch. The dense, gated (mask
execution, as deployed through ONNX) and compact backbones are then timed
side by side, round after round, in PyTorch and in onnxruntime, at each
batch size.

Reported per backend and batch size: the median latency of each network,
and the *realized ratio* of the compact model's static MAC saving,
``(1 - t_compact / t_dense) / (1 - MACs_compact / MACs_dense)`` (1: the
time falls as the MACs do), as the median of the per-round ratios with a
95 % interval (see ``paired_stats``). Target: realized >= 0.9 at batch 8 in
PyTorch on the CPU.

::

    python benchmarks/compact_inference.py --model resnet34 --size 112 \\
        --batch-sizes 1 8 32 --repeats 15 --threads 2
"""
import argparse
import logging
import os.path as osp
import sys
import tempfile
from collections import OrderedDict

import torch
import torch.nn as nn
from mmengine.logging import MMLogger

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from gated_inference import (MODELS, build_pair, environment,  # noqa: E402
                             save_results, time_networks)
from paired_stats import median_interval, paired_ratios, verdict  # noqa

REALIZED_TARGET = 0.9
TARGET_BATCH = 8
BACKENDS = ('torch', 'onnxruntime')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='resnet34', choices=list(MODELS))
    parser.add_argument('--size', type=int, default=112,
                        help='input height and width')
    parser.add_argument('--batch-sizes', type=int, nargs='+',
                        default=[1, 8, 32])
    parser.add_argument('--off', type=float, default=0.5,
                        help='share of each gate\'s channels always off')
    parser.add_argument('--on', type=float, default=0.25,
                        help='share of each gate\'s channels always on')
    parser.add_argument('--backends', nargs='+', default=list(BACKENDS),
                        choices=BACKENDS)
    parser.add_argument(
        '--channels-last', action='store_true',
        help='run the PyTorch networks on channels-last (NHWC) tensors')
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None,
                        help='intra-op threads (default: torch\'s)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', help='write the results to this JSON file')
    args = parser.parse_args(argv)
    if not (0 <= args.off and 0 <= args.on and args.off + args.on <= 1):
        parser.error(f'--off {args.off} and --on {args.on} must be shares '
                     '>= 0 that add up to at most 1')
    if args.repeats < 1 or args.warmup < 0:
        parser.error('--repeats must be >= 1 and --warmup >= 0')
    # build_pair's options for a freshly initialised backbone.
    args.checkpoint, args.gate_position = None, 'after_conv2'
    return args


def set_static_gates(gated, off, on, seed):
    """Make a share ``off`` of each gate's channels always closed, ``on``
    always open, and the rest conditional (logits that vary with the
    input around 0)."""
    from mmgated.models import gate_modules
    generator = torch.Generator().manual_seed(seed)
    for gate in gate_modules(gated).values():
        c = gate.fc2.out_features
        order = torch.randperm(c, generator=generator)
        n_off, n_on = round(off * c), round(on * c)
        weight = torch.randn(gate.fc2.weight.shape, generator=generator)
        bias = torch.zeros(c)
        bias[order[:n_off]], weight[order[:n_off]] = -30, 0
        bias[order[n_off:n_off + n_on]] = 30
        weight[order[n_off:n_off + n_on]] = 0
        gate.fc2.weight.data.copy_(weight)
        gate.fc2.bias.data.copy_(bias)


class LastStage(nn.Module):
    """The last feature map of a backbone, the tensor that is exported."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(x)[-1]


def onnx_session(network, example, path, threads):
    import onnxruntime
    from mmgated.deploy import gate_records_exported
    batch = torch.export.Dim('batch', min=1, max=4096)
    with torch.no_grad(), gate_records_exported(network):
        torch.onnx.export(
            LastStage(network).eval(), (example, ), path,
            input_names=['inputs'], dynamic_shapes=({0: batch}, ),
            dynamo=True, opset_version=18, verbose=False)
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # Idle onnxruntime threads spin by default, taking the cores from the
    # PyTorch runs timed in between.
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    options.add_session_config_entry('session.inter_op.allow_spinning', '0')
    return onnxruntime.InferenceSession(
        path, options, providers=['CPUExecutionProvider'])


def build_networks(args):
    """Dense, gated and compact backbones, with their MACs per sample."""
    from mmgated.analysis import dense_macs
    from mmgated.deploy import (compact_model, count_open_gates,
                                open_rates_from_counts)
    dense, gated = build_pair(args.model, args)
    set_static_gates(gated, args.off, args.on, args.seed)
    calibration = torch.randn(
        32, 3, args.size, args.size,
        generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        counts = count_open_gates(gated,
                                  (gated(calibration) for _ in range(1)))
    compact = compact_model(gated, open_rates_from_counts(counts)).eval()
    x = calibration[:1]
    macs = OrderedDict(
        dense=dense_macs(dense, x)['dense'],
        gated=dense_macs(gated, x)['dense'],
        compact=dense_macs(compact, x)['dense'])
    return OrderedDict(dense=dense, gated=gated, compact=compact), macs


def realized_row(times, macs, backend, batch_size, channels_last=False):
    saving = 1 - macs['compact'] / macs['dense']
    ratios = paired_ratios(times['compact']['all'], times['dense']['all'])
    median = low = high = None
    if saving > 0:  # else nothing was removed and nothing to realize
        median, low, high = median_interval([(1 - r) / saving
                                             for r in ratios])
    return OrderedDict(
        backend=backend + (' channels-last' if channels_last and
                           backend == 'torch' else ''),
        batch_size=batch_size,
        dense_ms=times['dense']['median'],
        gated_ms=times['gated']['median'],
        compact_ms=times['compact']['median'],
        static_saving=saving,
        realized=median,
        realized_low=low,
        realized_high=high)


def benchmark(networks, macs, args):
    rows = []
    sessions = {}
    with tempfile.TemporaryDirectory() as folder:
        if 'onnxruntime' in args.backends:
            # One export each, with a dynamic batch axis.
            example = torch.randn(1, 3, args.size, args.size)
            sessions = {
                name: onnx_session(net, example,
                                   osp.join(folder, f'{name}.onnx'),
                                   args.threads)
                for name, net in networks.items()}
        for batch_size in args.batch_sizes:
            x = torch.randn(batch_size, 3, args.size, args.size,
                            generator=torch.Generator().manual_seed(1))
            torch_input = x.contiguous(memory_format=torch.channels_last) \
                if args.channels_last else x
            for backend in args.backends:
                if backend == 'torch':
                    calls = {name: (lambda n=net: n(torch_input))
                             for name, net in networks.items()}
                else:
                    feed = {'inputs': x.numpy()}
                    calls = {name: (lambda s=s: s.run(None, feed))
                             for name, s in sessions.items()}
                times = time_networks(calls, torch.device('cpu'),
                                      args.repeats, args.warmup, args.seed)
                rows.append(realized_row(times, macs, backend, batch_size,
                                         args.channels_last))
                print(_format(rows[-1]), flush=True)
    return rows


def _format(row):
    interval = '' if row['realized_low'] is None else (
        f' [{row["realized_low"]:.2f}, {row["realized_high"]:.2f}]')
    realized = '-' if row['realized'] is None else f'{row["realized"]:.2f}'
    return (f'| {row["backend"]} | {row["batch_size"]} | '
            f'{row["dense_ms"]:.1f} | {row["gated_ms"]:.1f} | '
            f'{row["compact_ms"]:.1f} | {row["static_saving"]:.3f} | '
            f'{realized}{interval} |')


def target_verdict(rows):
    """The target's verdict from the PyTorch row at batch 8, if timed."""
    for row in rows:
        if row['backend'].startswith('torch') and \
                row['batch_size'] == TARGET_BATCH:
            return verdict(row['realized_low'], row['realized_high'],
                           REALIZED_TARGET, at_most=False)
    return 'not measured'


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    networks, macs = build_networks(args)
    if args.channels_last:
        for network in networks.values():
            network.to(memory_format=torch.channels_last)
    env = environment(args)
    print(f'{env["cpu"]}, {torch.get_num_threads()} threads; {args.model} '
          f'at {args.size}x{args.size}, gates {args.off:.0%} always off, '
          f'{args.on:.0%} always on; MACs/sample dense '
          f'{macs["dense"] / 1e9:.3f} G, compact static '
          f'{macs["compact"] / 1e9:.3f} G')
    print('| backend | batch | dense ms | gated (mask) ms | compact ms | '
          'static saving | realized [95 % CI] |')
    print('|---|---|---|---|---|---|---|')
    rows = benchmark(networks, macs, args)
    print(f'target: compact realized >= {REALIZED_TARGET} of its static '
          f'saving at batch {TARGET_BATCH} in PyTorch: '
          f'{target_verdict(rows)}')
    save_results(args.out, env, args, rows)
    return rows


if __name__ == '__main__':
    main()
