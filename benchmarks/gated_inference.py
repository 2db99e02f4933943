"""Inference latency of gated backbones: dense vs mask vs skip execution.

For each model, device and batch size, three networks with the same weights
are timed side by side, interleaved in a shuffled order each round, so that
load changes of the machine hit all of them alike:

* ``dense``: the upstream dense backbone (mmpretrain ``ResNet`` / mmseg
  ``ResNetV1c``) with the gated backbone's weights copied in;
* ``mask``: the gated backbone in mask execution (all channels computed,
  closed ones multiplied by 0);
* ``skip``: the gated backbone in skip execution (open channels only, see
  :mod:`mmgated.models.skip_execution`) with the backend of ``--backend``;
  ``--other-backends`` times copies with other backends side by side.

The gates are forced open at random with a fixed seed at each density of
``--densities`` (the same pattern for mask and skip), and, with
``--checkpoint``, left to the learned gating modules. The theoretical MAC
ratio is :func:`mmgated.analysis.count_macs`' mean conditional MACs per sample
(gating modules included) over the dense MACs, and the realized ratio is
``(dense time / skip time) / (dense MACs / skip MACs)``: 1.0 means the skip
execution turns the MAC savings into time savings one to one. The paired
columns take the ratios within each round (the networks of a round run
back to back), report their median with a distribution-free 95 % interval
(``benchmarks/paired_stats.py``), and the script ends with the issue's
targets that the run measured, each met, not met or undecided by that
interval.

Example::

    python benchmarks/gated_inference.py --models resnet34 resnet50 \\
        --batch-sizes 1 8 --size 224 --repeats 30 --out bench.json
"""
import argparse
import copy
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections import OrderedDict

import torch
from mmengine.logging import MMLogger

# The benchmarks' shared statistics, beside this script.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paired_stats import (format_row_interval,  # noqa: E402
                          median_interval, paired_ratios, verdict)

# The targets: the realized ratio of ResNet-34 at batch 1 and 50 %
# density, and skip execution's time at 100 % density, over dense.
REALIZED_TARGET = 0.8
FULL_DENSITY_TARGET = 1.05

MODELS = OrderedDict(
    resnet34=dict(
        scope='mmpretrain',
        dense=dict(type='ResNet', depth=34),
        gated=dict(type='GatedResNet', depth=34)),
    resnet50=dict(
        scope='mmpretrain',
        dense=dict(type='ResNet', depth=50),
        gated=dict(type='GatedResNet', depth=50)),
    pspnet_r50_d8=dict(
        scope='mmseg',
        dense=dict(
            type='ResNetV1c',
            depth=50,
            strides=(1, 2, 1, 1),
            dilations=(1, 1, 2, 4),
            contract_dilation=True),
        gated=dict(
            type='GatedResNetV1c',
            depth=50,
            strides=(1, 2, 1, 1),
            dilations=(1, 1, 2, 4),
            contract_dilation=True)),
)


# How forced gates are drawn (see --pattern).
PATTERNS = ('independent', 'exact')
# Skip execution's backends (see mmgated.models.skip_backends).
BACKENDS = ('auto', 'torch', 'compiled')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Latency of dense, mask and skip execution')
    parser.add_argument(
        '--models', nargs='+', default=list(MODELS), choices=list(MODELS),
        help='backbones to time')
    parser.add_argument(
        '--batch-sizes', nargs='+', type=int, default=[1, 8],
        help='batch sizes')
    parser.add_argument(
        '--size', type=int, default=224, help='input height and width')
    parser.add_argument(
        '--densities', nargs='+', type=float, default=[1.0, 0.75, 0.5, 0.25],
        help='fractions of gates forced open (at random, seeded)')
    parser.add_argument(
        '--repeats', type=int, default=30,
        help='timed runs of each network (after the warm-up)')
    parser.add_argument(
        '--warmup', type=int, default=3, help='untimed runs of each network')
    parser.add_argument(
        '--threads', type=int, default=None,
        help='torch.set_num_threads (default: all cores of this process)')
    parser.add_argument(
        '--devices', nargs='+', default=None,
        help="devices, e.g. 'cpu' 'cuda' (default: cpu, and cuda when "
        'available)')
    parser.add_argument(
        '--pattern', choices=PATTERNS, default='independent',
        help="how forced gates are drawn: 'independent' (default): each "
        'gate open with the density as probability (force_gates with a '
        "float); 'exact': exactly round(density * C) of the C gates of every "
        'gating module open in every sample, chosen at random')
    parser.add_argument(
        '--given-gates', action='store_true',
        help='also time skip execution with each gating module replaced by '
        'the gates it would output (the same pattern, precomputed): skip '
        'execution without the cost of the gating modules')
    parser.add_argument(
        '--backend', choices=BACKENDS, default='auto',
        help="skip execution's backend: 'torch' (gathers and PyTorch "
        "convolutions), 'compiled' (mmgated's compiled kernels for single "
        "CPU samples) or 'auto' (default: compiled where its tiles are "
        'vectorised, AVX-512 or AVX2, else torch)')
    parser.add_argument(
        '--other-backends', nargs='+', default=[], choices=BACKENDS[1:],
        help='also time skip execution with these backends, side by side')
    parser.add_argument(
        '--gate-position', default='after_conv2',
        choices=['after_conv1', 'after_conv2', 'both'],
        help='gate position of Bottleneck blocks (ignored with '
        '--checkpoint, which decides it)')
    parser.add_argument(
        '--checkpoint',
        help='checkpoint of a gated classifier/segmentor or backbone of the '
        'one model in --models: also time its learned gates')
    parser.add_argument(
        '--clock', choices=['wall', 'cpu'], default='wall',
        help="'wall': elapsed time (default); 'cpu': CPU time of this "
        'process (time.process_time), which other processes on a shared '
        'machine barely disturb; meaningful with --threads 1 on the CPU '
        'only (with more threads it adds up the threads, spin-waits '
        'included)')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument('--out', help='write the results to this JSON file')
    args = parser.parse_args(argv)
    for value in args.densities:
        if not 0 <= value <= 1:
            raise SystemExit(f'--densities: {value} is not in [0, 1]')
    for value in args.batch_sizes:
        if value < 1:
            raise SystemExit(f'--batch-sizes: {value} is not >= 1')
    if args.size < 32:
        raise SystemExit(f'--size {args.size} is too small; use >= 32')
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit('--repeats must be >= 1 and --warmup >= 0, got '
                         f'{args.repeats} and {args.warmup}')
    if args.clock == 'cpu' and (args.threads != 1 or args.devices not in (
            None, ['cpu'])):
        raise SystemExit('--clock cpu needs --threads 1 and --devices cpu')
    if args.checkpoint and len(args.models) != 1:
        raise SystemExit('--checkpoint needs exactly one model in --models, '
                         f'got {args.models}')
    return args


def _registry(scope):
    import mmgated  # noqa: F401  registers the gated backbones
    if scope == 'mmseg':
        from mmseg.registry import MODELS as registry
    else:
        from mmpretrain.registry import MODELS as registry
    return registry


def _backbone_state(path):
    """The backbone weights of a checkpoint (``backbone.`` prefix removed)."""
    from mmengine.runner import CheckpointLoader
    checkpoint = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    state = checkpoint.get('state_dict', checkpoint)
    if any(k.startswith('backbone.') for k in state):
        state = OrderedDict((k[len('backbone.'):], v)
                            for k, v in state.items()
                            if k.startswith('backbone.'))
    return state


def _gate_cfg_of(state):
    """``position`` and ``stages`` of the gates stored in a state dict."""
    gated_stages, names = set(), set()
    for key in state:
        parts = key.split('.')
        for name in ('gate', 'gate1', 'gate2'):
            if name in parts[:-1] and parts[0].startswith('layer'):
                names.add(name)
                gated_stages.add(int(parts[0][len('layer'):]) - 1)
    if not names:
        raise SystemExit('the checkpoint has no gate weights')
    position = {
        frozenset({'gate1'}): 'after_conv1',
        frozenset({'gate1', 'gate2'}): 'both'
    }.get(frozenset(names), 'after_conv2')
    return dict(position=position, stages=sorted(gated_stages))


def build_pair(name, args):
    """The gated backbone and its dense counterpart with the same weights."""
    # init_weights logs every parameter at INFO level.
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    spec = MODELS[name]
    registry = _registry(spec['scope'])
    torch.manual_seed(args.seed)
    gated_cfg = dict(spec['gated'])
    state = None
    if args.checkpoint:
        state = _backbone_state(args.checkpoint)
        gated_cfg['gate_cfg'] = _gate_cfg_of(state)
    elif gated_cfg['depth'] >= 50:
        gated_cfg['gate_cfg'] = dict(position=args.gate_position)
    gated = registry.build(gated_cfg)
    if state is None:
        gated.init_weights()
    else:
        missing, unexpected = gated.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SystemExit(
                f'checkpoint does not fit {gated_cfg["type"]}: missing '
                f'{missing[:5]}, unexpected {unexpected[:5]}')
    dense = registry.build(spec['dense'])
    missing, unexpected = dense.load_state_dict(
        gated.state_dict(), strict=False)
    if missing or any('gate' not in k for k in unexpected):
        raise RuntimeError(f'weights of {name} do not match the dense '
                           f'backbone: missing {missing[:5]}')
    dense.eval()
    gated.eval()
    return dense, gated


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def theoretical_macs(gated, control, x, value, seed):
    """Mean conditional and dense MACs per sample with the gates forced
    (``value`` a density, the timed pattern, drawn as ``control`` draws it)
    or learned (``None``).

    The computation of :func:`mmgated.analysis.count_macs` (its
    ``per_sample`` mean and ``dense``), split so that the conditional count
    sees the very pattern that was timed: ``count_macs`` traces the model
    first, which would draw a pattern of its own from the seeded generator.
    """
    from mmgated.analysis import dense_macs, gated_savings
    from mmgated.models import clear_gates
    with torch.no_grad():
        counted = dense_macs(gated, x)
        clear_gates(gated)
        control.call(x, value, seed)()
        per_sample = counted['total'] - gated_savings(gated)
    dense = counted.get('dense', counted['total'] - counted['gating'])
    return float(per_sample.mean()), float(dense)


def time_networks(networks, device, repeats, warmup, seed, clock='wall'):
    """Median, quartile and minimum latency (ms) of each callable, measured
    round-robin in a shuffled order per round."""
    now = time.process_time if clock == 'cpu' else time.perf_counter
    order = list(networks)
    times = {key: [] for key in order}
    rng = random.Random(seed)
    with torch.no_grad():
        for _ in range(warmup):
            for key in order:
                networks[key]()
        _sync(device)
        for _ in range(repeats):
            rng.shuffle(order)
            for key in order:
                start = now()
                networks[key]()
                _sync(device)
                times[key].append((now() - start) * 1e3)
    result = {}
    for key, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else \
            values * 3
        # 'all': in round order, so that two networks' timings pair up
        # by round (see paired_stats).
        result[key] = dict(
            median=statistics.median(values), q1=q[0], q3=q[2],
            min=min(values), all=values)
    return result


def exact_gates(shape, density, generator):
    """0/1 gates of ``shape`` ``(N, C)`` with exactly ``round(density * C)``
    ones in every row, at places drawn from ``generator``."""
    if density in (0.0, 1.0):
        # No draw, as force_gates with 0 or 1.
        return torch.full(shape, float(density))
    order = torch.rand(shape, generator=generator).argsort(dim=1)
    gates = torch.zeros(shape)
    return gates.scatter_(1, order[:, :round(density * shape[1])], 1.0)


class GateControl:
    """Decides, before each timed call, how the gates of a model are set:
    learned, forced at random (independently per gate, or exact counts per
    gating module, see ``--pattern``), or given (the gating modules
    replaced by precomputed gates, see ``--given-gates``).

    Everything is set on the gate modules directly: ``force_gates`` walks
    the whole model, whose Python cost would be timed with the forward.
    """

    def __init__(self, model, pattern='independent'):
        from mmgated.models import gate_modules
        self.model = model
        self.gates = list(gate_modules(model).values())
        self.pattern = pattern
        self.density = None
        self.generator = None
        if pattern == 'exact':
            for gate in self.gates:
                gate.register_forward_hook(self._exact_hook)

    def _exact_hook(self, module, inputs, gates):
        # Not while the MAC counters trace the dense graph.
        if self.density is None or torch.jit.is_tracing():
            return None
        exact = exact_gates(tuple(gates.shape), self.density,
                            self.generator).to(gates)
        module.output = module.output._replace(gates=exact)
        return exact

    def call(self, x, value, seed, given=None):
        """A callable running the model on ``x`` with the gates forced to
        the density ``value`` (seeded: the same pattern on every call),
        learned (``value=None``), or ``given`` (gate module -> gates)."""
        model, gates = self.model, self.gates
        force = value if self.pattern == 'independent' and not given \
            else None

        def run():
            generator = None
            if value is not None:
                generator = torch.Generator().manual_seed(seed)
            self.density = None if given or force is not None else value
            self.generator = generator
            for gate in gates:
                gate.forced = force
                gate.force_generator = generator
                if given:
                    # An instance attribute is found before the class's
                    # forward: the module returns its given gates.
                    gate.__dict__['forward'] = given[gate]
                else:
                    gate.__dict__.pop('forward', None)
            return model(x)

        return run

    def record(self, x, value, seed):
        """The gates of a forced call, as ``given`` for :meth:`call`."""
        with torch.no_grad():
            self.call(x, value, seed)()
        return {gate: (lambda *_, g=gate.output.gates, **__: g)
                for gate in self.gates}


def benchmark(name, device, batch_size, args):
    from mmgated.models import set_gate_execution
    dense, gated = build_pair(name, args)
    # One gated copy per execution and backend, switched once, so that no
    # mode switch is timed.
    for model in (dense, gated):
        model.to(device)
    set_gate_execution(gated, 'mask')
    skips = {
        way: set_gate_execution(copy.deepcopy(gated), 'skip', backend)
        for way, backend in [('skip', args.backend)] +
        [(f'skip_{b}', b) for b in args.other_backends]
    }
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch_size, 3, args.size, args.size,
                    generator=gen).to(device)
    settings = [(f'{round(d * 100)}%', d, args.seed + i)
                for i, d in enumerate(args.densities)]
    if args.checkpoint:
        settings.append(('learned', None, None))
    # What 'auto' resolved to, for the rows.
    backend = next(m.skip_runner.backend.name
                   for m in skips['skip'].modules()
                   if getattr(m, 'skip_runner', None) is not None)
    mask_control = GateControl(gated, args.pattern)
    controls = {way: GateControl(m, args.pattern) for way, m in skips.items()}
    networks = OrderedDict(dense=lambda: dense(x))
    for label, value, seed in settings:
        networks[f'mask {label}'] = mask_control.call(x, value, seed)
        for way, control in controls.items():
            networks[f'{way} {label}'] = control.call(x, value, seed)
        if args.given_gates:
            skip_control = controls['skip']
            networks[f'given {label}'] = skip_control.call(
                x, None, None, given=skip_control.record(x, value, seed))
    times = time_networks(networks, device, args.repeats, args.warmup,
                          args.seed, args.clock)
    rows = []
    for label, value, seed in settings:
        macs, dense_macs = theoretical_macs(gated, mask_control, x, value,
                                            seed)
        dense_ms = times['dense']['median']
        skip_ms = times[f'skip {label}']['median']
        mask_ms = times[f'mask {label}']['median']
        given = {}
        if args.given_gates:
            given_ms = times[f'given {label}']['median']
            given = dict(
                given_ms=given_ms,
                given_realized=(dense_ms / given_ms) / (dense_macs / macs))
        ways = {
            f'skip_{b}_ms': times[f'skip_{b} {label}']['median']
            for b in args.other_backends
        }
        dense_all, skip_all = (times['dense']['all'],
                               times[f'skip {label}']['all'])
        paired = dict(
            zip(('paired_realized', 'paired_realized_low',
                 'paired_realized_high'),
                median_interval(paired_ratios(dense_all, skip_all,
                                              macs / dense_macs))))
        paired.update(
            zip(('paired_skip_vs_dense', 'paired_skip_vs_dense_low',
                 'paired_skip_vs_dense_high'),
                median_interval(paired_ratios(skip_all, dense_all))))
        rows.append(
            OrderedDict(
                model=name,
                size=args.size,
                device=str(device),
                batch=batch_size,
                backend=backend,
                gates=label,
                dense_ms=dense_ms,
                mask_ms=mask_ms,
                skip_ms=skip_ms,
                dense_gmacs=dense_macs / 1e9,
                skip_gmacs=macs / 1e9,
                mac_ratio=macs / dense_macs,
                speedup=dense_ms / skip_ms,
                realized=(dense_ms / skip_ms) / (dense_macs / macs),
                skip_vs_dense=skip_ms / dense_ms,
                mask_vs_dense=mask_ms / dense_ms,
                pattern=args.pattern if value is not None else None,
                **paired,
                **given,
                **ways,
                times=times_for(times, label)))
    return rows


def times_for(times, label):
    return {key: value for key, value in times.items()
            if key == 'dense' or key.endswith(' ' + label)}


def target_verdicts(rows):
    """The issue's targets that ``rows`` measure, each with the verdict of
    its paired interval (see :func:`paired_stats.verdict`)."""
    lines = []
    for r in rows:
        where = (f'{r["model"]}, {r["size"]}x{r["size"]}, {r["device"]}, '
                 f'batch {r["batch"]}')
        if r['model'] == 'resnet34' and r['batch'] == 1 \
                and r['device'] == 'cpu' and r['gates'] == '50%':
            lines.append(
                f'realized ratio >= {REALIZED_TARGET} at 50 % ({where}): '
                + verdict(r['paired_realized_low'],
                          r['paired_realized_high'], REALIZED_TARGET,
                          at_most=False))
        if r['gates'] == '100%':
            lines.append(
                f'skip <= {FULL_DENSITY_TARGET}x dense at 100 % ({where}): '
                + verdict(r['paired_skip_vs_dense_low'],
                          r['paired_skip_vs_dense_high'],
                          FULL_DENSITY_TARGET, at_most=True))
    return lines


def markdown(rows):
    given = any('given_ms' in r for r in rows)
    extra = ' skip, given gates ms | realized, given gates |' if given \
        else ''
    ways = [
        f'skip_{b}' for b in BACKENDS[1:]
        if any(f'skip_{b}_ms' in r for r in rows)
    ]
    extra += ''.join(f' skip, {w[5:]} backend ms |' for w in ways)
    lines = [
        '| model | input | device | batch | skip backend | gates open | '
        'dense ms | mask ms | skip ms | MAC ratio | dense/skip | realized | '
        'skip/dense | paired realized [95 % CI] | paired skip/dense '
        '[95 % CI] |' + extra,
        '|---|---|---|---:|---|---|' + '---:|' * 9 +
        ('---:|---:|' if given else '') + '---:|' * len(ways)
    ]
    for r in rows:
        line = (f'| {r["model"]} | {r["size"]}x{r["size"]} | '
                f'{r["device"]} | {r["batch"]} | {r["backend"]} | '
                f'{r["gates"]} | '
                f'{r["dense_ms"]:.1f} | {r["mask_ms"]:.1f} | '
                f'{r["skip_ms"]:.1f} | {r["mac_ratio"]:.3f} | '
                f'{r["speedup"]:.2f} | {r["realized"]:.2f} | '
                f'{r["skip_vs_dense"]:.3f} | '
                f'{format_row_interval(r, "paired_realized", 2)} | '
                f'{format_row_interval(r, "paired_skip_vs_dense")} |')
        if given:
            line += (f' {r["given_ms"]:.1f} | {r["given_realized"]:.2f} |'
                     if 'given_ms' in r else ' | |')
        for w in ways:
            line += f' {r[f"{w}_ms"]:.1f} |' if f'{w}_ms' in r else ' |'
        lines.append(line)
    return '\n'.join(lines)


def environment(args):
    import mmengine
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    env = OrderedDict(
        python=sys.version.split()[0],
        torch=torch.__version__,
        mmengine=mmengine.__version__,
        cpu=cpu,
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        cuda=torch.cuda.get_device_name(0)
        if torch.cuda.is_available() else None,
        command=' '.join([os.path.basename(sys.executable)] + sys.argv))
    return env


def save_results(path, env, args, rows):
    """Write the rows with the environment and the arguments to ``path`` as
    JSON; nothing if ``path`` is empty."""
    if path:
        with open(path, 'w') as f:
            json.dump(dict(environment=env, args=vars(args), rows=rows), f,
                      indent=2)


def main(argv=None):
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    devices = args.devices or (['cpu', 'cuda'] if torch.cuda.is_available()
                               and args.clock == 'wall' else ['cpu'])
    env = environment(args)
    load_before = os.getloadavg()
    rows = []
    for device in devices:
        device = torch.device(device)
        for name in args.models:
            for batch_size in args.batch_sizes:
                start = time.time()
                new = benchmark(name, device, batch_size, args)
                rows += new
                print(f'# {name} {device} batch {batch_size}: '
                      f'{time.time() - start:.0f} s', file=sys.stderr)
                print(markdown(new), file=sys.stderr)
    env['loadavg_before'] = load_before
    env['loadavg_after'] = os.getloadavg()
    print(f'torch {env["torch"]}, {env["cpu"]}, {env["cores"]} cores, '
          f'{env["threads"]} threads, load average {load_before[0]:.2f} -> '
          f'{env["loadavg_after"][0]:.2f}; median of {args.repeats} runs, '
          f'{args.clock} clock, {args.pattern} gates')
    print(markdown(rows))
    for line in target_verdicts(rows):
        print(f'* {line}')
    save_results(args.out, env, args, rows)
    return rows


if __name__ == '__main__':
    main()
