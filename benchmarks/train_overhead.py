"""Training step of gated ResNet classifiers against their dense counterparts.

For each depth, four models train side by side on the same batch (CPU):

* ``dense``: mmpretrain ``ImageClassifier`` with a ``ResNet`` backbone, the
  ``GlobalAveragePooling`` neck and ``LinearClsHead`` of the ImageNet recipe
  (``configs/resnet{depth}_bas_in1k.py``) without its gates;
* ``gated``: the recipe's ``GatedImageClassifier`` with its ``GatedResNet``,
  the batch-shaping loss (weight 0.75) and the L0 loss (weight
  ``L0_WEIGHT``; the recipe ramps it up from 0), both computed every step;
* ``dense compiled``, ``gated compiled``: copies of the two (same weights)
  whose ``train_step`` is ``torch.compile``'d as mmengine's ``Runner`` does
  with ``compile=True`` (:func:`compile_train_step`).

A step is ``model.train_step(data, optim_wrapper)`` as the Runner's train
loop calls it (data preprocessor, losses, backward, optimizer step), with the
recipe's optimizer wrapper: SGD with momentum 0.9, and for the gated model
its two merged parameter groups (no weight decay on the gating modules); the
dense model gets the same without the ``paramwise_cfg`` and constructor.

Each round runs one step of every model in a shuffled order, so that load
changes of the machine hit all of them alike, and reports the median of the
per-round ratios with a distribution-free 95 % interval and whether it
decides each target (``benchmarks/paired_stats.py``). Untimed warm-up steps
come first; for the compiled models they include the compilation, reported
as "compile s" (the warm-up time in excess of that many timed steps) with
the graphs and graph breaks torch.compile met in each model's warm-up.

The gate losses' share: right after each gated eager step,
``model.gate_losses()`` runs again on the gates that step recorded, and the
backward of its losses' sum down to those gate outputs
(``torch.autograd.grad`` with them as inputs: the losses' own backward, not
the backbone's, which the task loss runs anyway); its time over the step's.
Timing whole steps with the losses' weights at 0 and non-zero instead would
give the same quantity as a difference of two step times each noisy by a few
per cent: far too noisy to decide a 1 % target.

Example::

    python benchmarks/train_overhead.py --threads 2 --rounds 10 --out t.json
"""
import argparse
import copy
import json
import logging
import os
import os.path as osp
import random
import sys
import time

import torch

# The benchmarks' shared statistics, beside this script.
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from paired_stats import (format_interval,  # noqa: E402
                          median_interval, paired_ratios, verdict)

CONFIGS = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs')
L0_WEIGHT = 0.1
MODELS = ('dense', 'gated', 'dense_compiled', 'gated_compiled')
# (key, numerator, denominator, label, target: value <= target or None)
RATIOS = (
    ('eager_gated_vs_dense', 'gated', 'dense', 'gated/dense, eager', 1.10),
    ('compiled_gated_vs_dense', 'gated_compiled', 'dense_compiled',
     'gated/dense, compiled', 1.05),
    ('dense_compiled_vs_eager', 'dense_compiled', 'dense',
     'dense, compiled/eager', None),
    ('gated_compiled_vs_eager', 'gated_compiled', 'gated',
     'gated, compiled/eager', None),
    ('gate_loss_share', 'gate_losses', 'gated', 'gate losses / gated step',
     0.01),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Training-step time of gated vs dense classifiers')
    parser.add_argument('--depths', nargs='+', type=int, default=[18, 34],
                        choices=[18, 34], help='ResNet depths')
    parser.add_argument('--size', type=int, default=112,
                        help='input height and width')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=20,
                        help='timed steps of each model')
    parser.add_argument('--warmup', type=int, default=3,
                        help='untimed steps of each model before the rounds '
                        '(compiled: at least 2, the second recompiles for '
                        "the optimizer's momentum buffers)")
    parser.add_argument('--threads', type=int, default=None,
                        help='torch.set_num_threads (default: torch\'s)')
    parser.add_argument('--no-compile', action='store_true',
                        help='time the eager models only')
    parser.add_argument('--compile-backend', default='inductor',
                        help='torch.compile backend (the Runner\'s default: '
                        'inductor)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', help='write the results to this JSON file')
    return parser.parse_args(argv)


def model_cfgs(depth):
    """The recipe's model and optimizer wrapper configs of ``depth``, gated
    and dense: ``{'gated': (model, optim_wrapper), 'dense': ...}``."""
    import mmgated  # noqa: F401  registers the gated models
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(CONFIGS, f'resnet{depth}_bas_in1k.py'))
    gated = cfg.model.to_dict()
    # As the Runner merges it into the model.
    if cfg.get('data_preprocessor') is not None:
        gated.setdefault('data_preprocessor', cfg.data_preprocessor.to_dict())
    gated['l0_loss']['loss_weight'] = L0_WEIGHT
    dense = {k: v for k, v in copy.deepcopy(gated).items()
             if k not in ('batch_shaping_loss', 'l0_loss', 'shaped_quantity')}
    dense['type'] = 'ImageClassifier'
    dense['backbone'].pop('gate_cfg', None)
    dense['backbone']['type'] = 'ResNet'
    optim = cfg.optim_wrapper.to_dict()
    dense_optim = {k: v for k, v in optim.items()
                   if k not in ('constructor', 'paramwise_cfg')}
    return dict(gated=(gated, optim), dense=(dense, dense_optim))


def build_models(depth, compile_cfg=None, seed=0):
    """The models of ``depth``: name to ``(model, optim_wrapper)``, all in
    train mode, the gated ones with the dense one's weights where they share
    them; the compiled ones too unless ``compile_cfg`` is None."""
    from mmengine.logging import MMLogger
    from mmengine.optim import build_optim_wrapper
    from mmpretrain.registry import MODELS as REGISTRY
    torch.manual_seed(seed)
    built = {}
    for name, (model_cfg, optim_cfg) in model_cfgs(depth).items():
        model = REGISTRY.build(model_cfg)
        # init_weights logs every parameter at INFO level.
        MMLogger.get_current_instance().setLevel(logging.WARNING)
        model.init_weights()
        built[name] = (model.train(), optim_cfg)
    gated = built['gated'][0]
    gated.load_state_dict(built['dense'][0].state_dict(), strict=False)
    names = ('dense', 'gated') if compile_cfg is None else MODELS
    models = {}
    for name in names:
        model, optim_cfg = built[name.replace('_compiled', '')]
        if name.endswith('_compiled'):
            model = compile_train_step(copy.deepcopy(model), compile_cfg)
        models[name] = (model,
                        build_optim_wrapper(model, copy.deepcopy(optim_cfg)))
    return models


def compile_train_step(model, compile_cfg):
    """``model`` with its ``train_step`` compiled, as mmengine 0.10.7's
    ``Runner._maybe_compile('train_step')`` does with ``compile=cfg``."""
    setattr(model, 'train_step',
            torch.compile(getattr(model, 'train_step'), **compile_cfg))
    return model


def make_data(batch_size, size, num_classes=1000, seed=0):
    """A batch as the Runner's dataloader gives it: uint8 images and data
    samples with their labels."""
    from mmpretrain.structures import DataSample
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8,
                            generator=generator) for _ in range(batch_size)]
    labels = torch.randint(0, num_classes, (batch_size, ),
                           generator=generator)
    return dict(inputs=images,
                data_samples=[DataSample().set_gt_label(int(label))
                              for label in labels])


def time_gate_losses(gated):
    """Seconds of ``gated.gate_losses()`` on the gates of its last forward
    and of the backward of its losses' sum down to those gates' ``probs``.

    The losses read nothing else of the gates when they shape ``probs`` (the
    recipe's choice; ``relaxed`` lies behind the backbone in the backward
    graph, which the step has freed).
    """
    from mmgated.models import collect_gates
    assert gated.shaped_quantity == 'probs', gated.shaped_quantity
    probs = [o.probs for o in collect_gates(gated).values()]
    start = time.perf_counter()
    losses = gated.gate_losses()
    total = sum(v for k, v in losses.items() if 'loss' in k)
    torch.autograd.grad(total, probs)
    return time.perf_counter() - start


def make_steps(models, data):
    """Name to a callable that runs one training step of that model and
    returns ``{name: seconds}`` (for the gated eager model, the gate losses'
    seconds too)."""
    def step(name, model, optim_wrapper):
        def run():
            start = time.perf_counter()
            model.train_step(data, optim_wrapper)
            times = {name: time.perf_counter() - start}
            if name == 'gated':
                times['gate_losses'] = time_gate_losses(model)
            return times
        return run
    return {name: step(name, *pair) for name, pair in models.items()}


def warm_up(steps, warmup):
    """Run ``warmup`` untimed steps of each, one model after the other.

    Returns:
        tuple[dict, dict]: Name to the seconds of its steps, and name to
        the graphs and graph breaks that torch.compile met in them.
    """
    seconds, compiled = {}, {}
    for name, step in steps.items():
        before = dynamo_counts()
        seconds[name] = [step()[name] for _ in range(warmup)]
        compiled[name] = {k: v - before[k] for k, v in
                          dynamo_counts().items()}
    return seconds, compiled


def time_rounds(steps, rounds, seed=0):
    """Run ``rounds`` rounds of one step of each in a shuffled order; name
    to the seconds of its steps, one per round."""
    times = {}
    order = list(steps)
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            for key, seconds in steps[name]().items():
                times.setdefault(key, []).append(seconds)
    return times


def dynamo_counts():
    """Graphs compiled and graph breaks met by torch.compile so far."""
    from torch._dynamo.utils import counters
    return dict(graphs=counters['stats']['unique_graphs'],
                graph_breaks=sum(counters['graph_break'].values()))


def summarize(times):
    """The paired ratios of :data:`RATIOS` whose timings exist: key to
    ``{'median', 'low', 'high'}``."""
    ratios = {}
    for key, num, den, _, _ in RATIOS:
        if num in times and den in times:
            median, low, high = median_interval(
                paired_ratios(times[num], times[den]))
            ratios[key] = dict(median=median, low=low, high=high)
    return ratios


def benchmark(depth, args):
    """Time the models of ``depth``; the results as a JSON-able dict."""
    # compile=True gives the Runner an empty compile_cfg.
    compile_cfg = None if args.no_compile else {} \
        if args.compile_backend == 'inductor' else dict(
            backend=args.compile_backend)
    if compile_cfg is not None:
        torch._dynamo.reset()  # each depth compiles from scratch
    models = build_models(depth, compile_cfg, args.seed)
    gated = models['gated'][0]
    data = make_data(args.batch_size, args.size,
                     gated.head.num_classes, args.seed)
    steps = make_steps(models, data)
    warm, compiled = warm_up(steps, args.warmup)
    before = dynamo_counts()
    times = time_rounds(steps, args.rounds, args.seed)
    # Graphs compiled in the timed rounds (the warm-up was too short).
    recompiled = dynamo_counts()['graphs'] - before['graphs']
    losses = set(gated.gate_losses())
    assert {'loss_bs', 'loss_l0'} <= losses, f'gate losses off: {losses}'
    median_ms = {k: 1e3 * median_interval(v)[0] for k, v in times.items()}
    compile_s = {k: sum(warm[k]) - len(warm[k]) * median_ms[k] / 1e3
                 for k in warm if k.endswith('_compiled')}
    return dict(model=f'resnet{depth}', depth=depth, times_s=times,
                warmup_s=warm, median_ms=median_ms, compile_s=compile_s,
                dynamo={k: v for k, v in compiled.items()
                        if k.endswith('_compiled')},
                recompiled_in_rounds=recompiled,
                ratios=summarize(times))


def target_verdicts(results):
    """One dict per target and depth: the ratio, its bound and verdict."""
    verdicts = []
    for result in results:
        for key, _, _, label, limit in RATIOS:
            ratio = result['ratios'].get(key)
            if limit is None or ratio is None:
                continue
            verdicts.append(dict(
                model=result['model'], ratio=key, label=label, limit=limit,
                verdict=verdict(ratio['low'], ratio['high'], limit, True),
                **ratio))
    return verdicts


def format_ratio(ratio, percent=False):
    """``'1.062 [1.051, 1.070]'`` of a ratio dict; times 100 with two
    decimals if ``percent``."""
    scale = 100 if percent else 1
    values = [None if ratio[k] is None else ratio[k] * scale
              for k in ('median', 'low', 'high')]
    return format_interval(*values, digits=2 if percent else 3)


def verdict_line(v):
    """``'resnet18: gated/dense, eager <= 1.1: met (1.062 [1.051, 1.070])'``
    (the gate losses' share in per cent)."""
    percent = v['ratio'] == 'gate_loss_share'
    unit, scale = (' %', 100) if percent else ('', 1)
    return (f"{v['model']}: {v['label']} <= {v['limit'] * scale:g}{unit}: "
            f"{v['verdict']} ({format_ratio(v, percent)}{unit})")


def markdown(results):
    """Medians (ms per step) and paired ratios, one column per depth."""
    lines = ['| | ' + ' | '.join(r['model'] for r in results) + ' |',
             '| --- |' + ' --- |' * len(results)]

    def row(label, cells):
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')

    for name in MODELS + ('gate_losses', ):
        if any(name in r['median_ms'] for r in results):
            row(f"{name.replace('_', ' ')}, ms",
                [f"{r['median_ms'][name]:.1f}" if name in r['median_ms']
                 else '-' for r in results])
    if any(r['compile_s'] for r in results):
        row('compile s, dense / gated',
            [f"{r['compile_s']['dense_compiled']:.0f} / "
             f"{r['compile_s']['gated_compiled']:.0f}" for r in results])
        row('graphs / graph breaks, dense; gated',
            ['; '.join('{graphs} / {graph_breaks}'.format(**r['dynamo'][k])
                       for k in ('dense_compiled', 'gated_compiled'))
             for r in results])
    for key, _, _, label, _ in RATIOS:
        if any(key in r['ratios'] for r in results):
            share = key == 'gate_loss_share'
            row(label + (', %' if share else ''),
                [format_ratio(r['ratios'][key], share)
                 if key in r['ratios'] else '-'
                 for r in results])
    return '\n'.join(lines)


def environment(args):
    cpu = 'unknown'
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f
                       if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__,
                threads=torch.get_num_threads(),
                command=' '.join([osp.basename(sys.executable)] + sys.argv))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args)
    start = time.time()
    results = [benchmark(depth, args) for depth in args.depths]
    env['wall_s'] = time.time() - start
    verdicts = target_verdicts(results)
    print(f"machine: {env['cpu']} ({env['cores']} cores), torch "
          f"{env['torch']}, {env['threads']} threads; batch "
          f'{args.batch_size}, {args.size}x{args.size}, {args.rounds} '
          f'rounds after {args.warmup} warm-up steps; paired ratios: median '
          '[95 % interval] of the per-round ratios')
    print(markdown(results))
    for r in results:
        if r['recompiled_in_rounds']:
            print(f"Note: {r['model']}: {r['recompiled_in_rounds']} graphs "
                  'compiled during the timed rounds; raise --warmup')
    print('Targets:')
    for v in verdicts:
        print(f'* {verdict_line(v)}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(environment=env, args=vars(args), results=results,
                           verdicts=verdicts), f, indent=2)
    return results


if __name__ == '__main__':
    main()
