"""Training-step overhead of a gated classifier over its dense counterpart.

Times one training step (forward with the losses, backward, SGD step) of

* ``dense``: mmpretrain ``ImageClassifier`` with a ``ResNet`` backbone, and
* ``gated``: :class:`mmgated.models.GatedImageClassifier` with the
  ``GatedResNet`` of the same depth and the paper's gate losses (batch-shaping
  with a Beta(0.6, 0.4) prior and the L0 loss, both with weights > 0 so both
  run),

on the same batch, alternating the two every round. It reports medians, and
the median of the per-round ratios with a distribution-free 95 % interval and
whether that interval decides the target (``benchmarks/paired_stats.py``):
on a noisy machine the ratio of two medians can fall on either side of a
target from run to run, the interval says when a run cannot tell. Inside
the gated step the gate-loss computation
(:meth:`~mmgated.models.gate_loss_mixin.GateLossMixin.gate_losses`: both
losses and the open rate) is timed separately, and so is, in an extra untimed
pass, the backward of those losses alone down to the gate probabilities, so
that the share of a step that the gate losses cost can be read off. The
forward pass (with the losses) of each step is timed too, so that the
overhead splits into the forward's and the rest's (backward, SGD step).
``--unfused``, ``--python-nodes`` and ``--separate-norm`` also time, in the
same rounds, the gated model as earlier rounds of the library trained it (a
deep copy of it within :class:`unfused`, :class:`python_nodes` or
:class:`separate_norm`), with the paired ratio of the gated step to each.
``--optimizer recipe`` steps each model with the optimizer that the ImageNet
recipe (``configs/resnet{depth}_bas_in1k.py``) builds for it instead of one
plain SGD over all parameters: for the gated model, two parameter groups
(:class:`~mmgated.engine.MergedGroupsOptimWrapperConstructor`), for the dense
one the baseline's single group; ``--per-param-groups`` also times the gated
model with mmengine's default constructor, one group per parameter.
Each model's minor page faults per step are counted too: glibc hands
large freed blocks back to the system and faults them in again (about 3 us
a page here), a cost that differs between the models and between runs by
chance of where their blocks fall; ``--keep-heap`` keeps freed memory in the
process (:func:`keep_heap`), for both models.
``--optimizer-only`` times the recipe's optimizer steps alone instead (the
dense model's, the gated model's merged groups and its per-parameter groups),
``--losses-only`` the gate losses alone, ``--gates-only`` the
gating modules alone (each to compare two checkouts of the library), and
``--norms-only`` the norm and activation of the gated maps alone, three ways
side by side: as one node, as PyTorch's batch norm and the gated ReLU, and
as the dense block computes them.

Example::

    python benchmarks/train_overhead.py --depths 18 34 --size 112 \\
        --batch-size 8 --repeats 20
"""
import argparse
import contextlib
import copy
import functools
import json
import logging
import os
import os.path as osp
import resource
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

CONFIGS = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs')

# The targets.
OVERHEAD_TARGET = 1.05
LOSS_SHARE_TARGET = 0.01


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Training-step time of gated vs dense classifiers')
    parser.add_argument('--depths', nargs='+', type=int, default=[18, 34],
                        choices=[18, 34, 50], help='ResNet depths')
    parser.add_argument('--size', type=int, default=112,
                        help='input height and width')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=20,
                        help='timed steps of each model')
    parser.add_argument('--warmup', type=int, default=3,
                        help='untimed steps of each model')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch.set_num_threads (default: all cores)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', help='write the results to this JSON file')
    parser.add_argument(
        '--unfused', action='store_true',
        help='also time the gated model as the earlier rounds ran it: the '
        'gating modules and the gated ReLU as separate PyTorch operations, '
        'the batch-shaping loss sorting with torch.sort')
    parser.add_argument(
        '--python-nodes', action='store_true',
        help='also time the gated model with the gating modules and the '
        'gated ReLU as Python autograd Functions around the compiled '
        'kernels (the previous round\'s nodes), not the C++ nodes')
    parser.add_argument(
        '--separate-norm', action='store_true',
        help='also time the gated model with the batch norm of each gated '
        'map and its gated ReLU as two autograd nodes (PyTorch\'s batch '
        'norm, the previous rounds\' library), not one')
    parser.add_argument(
        '--optimizer', choices=['sgd', 'recipe'], default='sgd',
        help='sgd: one torch SGD over all parameters of each model (lr '
        '1e-3); recipe: the optimizer wrapper of the ImageNet recipe '
        '(configs/resnet{depth}_bas_in1k.py) for the gated model, and the '
        'same without its paramwise_cfg and constructor (the dense '
        'baseline\'s) for the dense one')
    parser.add_argument(
        '--per-param-groups', action='store_true',
        help='with --optimizer recipe, also time the gated model with '
        'mmengine\'s default constructor: one parameter group per '
        'parameter instead of the merged groups')
    parser.add_argument(
        '--keep-heap', action='store_true',
        help='make glibc keep freed memory in the process (mallopt: '
        'mmap threshold 64 MiB, trim threshold 1 GiB, as '
        'MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=1073741824 '
        'would), so that the steps reuse it instead of faulting pages in')
    parser.add_argument(
        '--optimizer-only', action='store_true',
        help='time only the optimizer steps of the recipe (as with '
        '--optimizer recipe) on fixed gradients, alternating: the dense '
        'model\'s, the gated model\'s two groups and its one group per '
        'parameter (mmengine\'s default constructor)')
    parser.add_argument(
        '--losses-only', action='store_true',
        help='time only the gate losses, alone: gate_losses() after one '
        'forward, and the batch-shaping loss forward and backward on the '
        'detached gate probabilities (--repeats calls each); run it in '
        'two checkouts to compare two libraries')
    parser.add_argument(
        '--gates-only', action='store_true',
        help='time only the gating modules, alone: each gate\'s training '
        'forward (with its noise draw) and backward at the input it had in '
        'one forward of the model, summed over the gates; run it in two '
        'checkouts to compare two libraries')
    parser.add_argument(
        '--norms-only', action='store_true',
        help='time only the norm and activation of the gated maps, '
        'forward and backward, summed over the maps, at the maps and gates '
        'one forward of the model gave them, alternating three ways: one '
        'batch-norm gated ReLU node, PyTorch\'s batch norm then the gated '
        'ReLU, and the dense block\'s batch norm then in-place ReLU')
    args = parser.parse_args(argv)
    if args.losses_only + args.gates_only + args.optimizer_only \
            + args.norms_only > 1:
        raise SystemExit('--losses-only, --gates-only, --optimizer-only and '
                         '--norms-only: choose one')
    if args.per_param_groups and args.optimizer != 'recipe':
        raise SystemExit('--per-param-groups compares two builds of the '
                         'recipe\'s optimizer: add --optimizer recipe')
    if args.batch_size < 2:
        raise SystemExit(f'--batch-size {args.batch_size}: batch-shaping '
                         'needs at least 2 samples')
    if args.repeats < 1 or args.warmup < 0 or args.size < 32:
        raise SystemExit('need --repeats >= 1, --warmup >= 0, --size >= 32; '
                         f'got {args.repeats}, {args.warmup}, {args.size}')
    return args


def build_models(depth, device, seed):
    import mmgated  # noqa: F401  registers the gated models
    from mmpretrain.registry import MODELS
    channels = 2048 if depth >= 50 else 512
    common = dict(
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=1000,
            in_channels=channels,
            loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
    torch.manual_seed(seed)
    dense = MODELS.build(
        dict(type='ImageClassifier', backbone=dict(type='ResNet',
                                                   depth=depth), **common))
    gated = MODELS.build(
        dict(
            type='GatedImageClassifier',
            backbone=dict(type='GatedResNet', depth=depth),
            batch_shaping_loss=dict(
                type='BatchShapingLoss',
                prior=dict(type='beta', a=0.6, b=0.4),
                loss_weight=0.75,
                reduction='sum'),
            l0_loss=dict(type='GateL0Loss', loss_weight=0.05),
            **common))
    # init_weights logs every parameter at INFO level.
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    dense.init_weights()
    gated.init_weights()
    # Same weights where the models share them.
    gated.load_state_dict(dense.state_dict(), strict=False)
    for model in (dense, gated):
        model.to(device)
        model.train()
    return dense, gated


def cramer_von_mises_graph(x, prior, reduction):
    """The batch-shaping loss as the earlier rounds computed it: sort, prior
    CDF and squared error as an autograd graph."""
    n = x.shape[0]
    sorted_x = torch.sort(x, dim=0)[0]
    target = torch.arange(1, n + 1, device=x.device, dtype=x.dtype) / (n + 1)
    per_feature = ((target[:, None] - prior(sorted_x))**2).mean(dim=0)
    return per_feature.sum() if reduction == 'sum' else per_feature.mean()


class unfused:
    """Within: gated models train with the gating module, the gated maps'
    batch norm and ReLU times gates, and the batch-shaping loss's sort as
    separate PyTorch operations (the earlier rounds' library), not the
    fused autograd nodes and compiled calls."""

    def __enter__(self):
        import mmgated.models.blocks as blocks
        import mmgated.models.gates as gates
        import mmgated.models.losses.batch_shaping_loss as bs
        self.saved = [(gates, 'fused_training_gate',
                       gates.fused_training_gate),
                      (blocks, 'batch_norm_gated_relu',
                       blocks.batch_norm_gated_relu),
                      (bs, 'cramer_von_mises', bs.cramer_von_mises)]
        gates.fused_training_gate = lambda gate, x: None
        blocks.batch_norm_gated_relu = lambda x, norm, g: norm(x).relu_(
        ) * g.to(x.dtype)[:, :, None, None]
        bs.cramer_von_mises = cramer_von_mises_graph
        return self

    def __exit__(self, *exc_info):
        for module, name, value in self.saved:
            setattr(module, name, value)
        return False


class python_nodes:
    """Within: gated models train with the Python autograd Functions of
    the gating module and the gated ReLU (mmgated.models.fused_gate and
    gated_relu), not the C++ nodes of mmgated.ops.training_nodes."""

    def __enter__(self):
        import mmgated.ops.training_nodes as nodes
        self.nodes, self.saved = nodes, nodes._extension
        nodes._extension = False
        return self

    def __exit__(self, *exc_info):
        self.nodes._extension = self.saved
        return False


def norm_then_gated_relu(x, norm, gates):
    """A gated map's norm and activation as the previous rounds' library
    computed them: PyTorch's batch norm, then the gated ReLU's node."""
    from mmgated.models.gated_relu import gated_relu
    return gated_relu(norm(x), gates)


class separate_norm:
    """Within: the batch norm of each gated map and its gated ReLU are two
    autograd nodes (:func:`norm_then_gated_relu`), not one batch-norm gated
    ReLU."""

    def __enter__(self):
        import mmgated.models.blocks as blocks
        self.blocks, self.saved = blocks, blocks.batch_norm_gated_relu
        blocks.batch_norm_gated_relu = norm_then_gated_relu
        return self

    def __exit__(self, *exc_info):
        self.blocks.batch_norm_gated_relu = self.saved
        return False


# The gated model's other versions that a run can time beside it: the
# option that asks for each and the context it trains within.
VARIANTS = OrderedDict(
    unfused=unfused,
    python_nodes=python_nodes,
    separate_norm=separate_norm,
    per_param_groups=contextlib.nullcontext)


@functools.lru_cache(maxsize=None)
def recipe_optim_wrappers(depth):
    """The ``optim_wrapper`` configs of the ImageNet recipe of ``depth``.

    Returns:
        dict: ``'gated'``: the recipe's; ``'per_param_groups'``: the same
        built by mmengine's default constructor; ``'dense'``: without the
        gating modules' ``paramwise_cfg`` (the dense baseline's). Read
        once per depth: callers copy what they build from.
    """
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(CONFIGS, f'resnet{depth}_bas_in1k.py'))
    gated = cfg.optim_wrapper.to_dict()
    per_param = {k: v for k, v in gated.items() if k != 'constructor'}
    dense = {k: v for k, v in per_param.items() if k != 'paramwise_cfg'}
    return dict(gated=gated, per_param_groups=per_param, dense=dense)


def build_optimizer(model, name, kind, depth):
    """The torch optimizer that steps model ``name`` (``'dense'``,
    ``'gated'`` or a variant) as ``--optimizer kind`` asks."""
    if kind == 'sgd':
        return torch.optim.SGD(
            model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    from mmengine.optim import build_optim_wrapper
    cfgs = recipe_optim_wrappers(depth)
    cfg = cfgs.get(name, cfgs['gated'])
    # The wrapper's step is the optimizer's; make_step drives it directly.
    return build_optim_wrapper(model, copy.deepcopy(cfg)).optimizer


def keep_heap():
    """Make glibc's malloc keep freed memory in the process.

    By default glibc serves large blocks with ``mmap`` and returns a large
    free top of its heap to the system; the next step then faults those
    pages in again. These settings (fixed, which also stops glibc from
    adapting them) keep blocks up to 64 MiB on the heap and the heap
    untrimmed up to 1 GiB of free memory.

    Raises:
        SystemExit: The C library has no ``mallopt`` (not glibc) or refused
            a setting.
    """
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        raise SystemExit('--keep-heap needs glibc\'s mallopt, which this C '
                         'library does not have')
    m_trim_threshold, m_mmap_threshold = -1, -3
    for option, value in ((m_mmap_threshold, 64 << 20),
                          (m_trim_threshold, 1 << 30)):
        if mallopt(option, value) != 1:
            raise SystemExit(f'--keep-heap: mallopt({option}, {value}) failed')


def minor_faults():
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class GateLossTimer:
    """Wrap a gated model's ``gate_losses`` to time each call."""

    def __init__(self, model, device):
        self.model = model
        self.device = device
        self.original = model.gate_losses
        self.last = 0.0
        model.gate_losses = self

    def __call__(self, *args):
        _sync(self.device)
        start = time.perf_counter()
        losses = self.original(*args)
        _sync(self.device)
        self.last = time.perf_counter() - start
        return losses


def make_step(model, optimizer, inputs, samples, device, record=None):
    """One training step; ``record['forward']`` gets the seconds of its
    forward pass (with the losses)."""
    def step():
        start = time.perf_counter()
        losses = model.loss(inputs, samples)
        loss = sum(v for k, v in losses.items() if 'loss' in k)
        if record is not None:
            _sync(device)
            record['forward'] = time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        return losses
    return step


def gate_loss_backward_time(gated, device):
    """Seconds of the backward pass of the gate losses alone, down to the
    gate probabilities and relaxed samples of the last forward pass
    (untimed in the step).

    The losses run on detached copies of those, so that the backward
    stops there: the gating module computes them in one autograd node with
    its other outputs, which a gradient with respect to them would run.
    """
    from mmgated.models import gate_modules
    from mmgated.models.gates import GateOutput
    modules = [m for m in gate_modules(gated).values()
               if m.output is not None]
    recorded = [m.output for m in modules]
    leaves = []
    for module, out in zip(modules, recorded):
        probs = out.probs.detach().requires_grad_()
        relaxed = out.relaxed.detach().requires_grad_()
        leaves += [probs, relaxed]
        module.output = GateOutput(out.logits.detach(), probs, relaxed,
                                   out.gates.detach())
    try:
        losses = gated.gate_losses.original()
    finally:
        for module, out in zip(modules, recorded):
            module.output = out
    total = sum(v for k, v in losses.items() if k.startswith('loss'))
    _sync(device)
    start = time.perf_counter()
    torch.autograd.grad(total, leaves, retain_graph=False,
                        allow_unused=True)
    _sync(device)
    return time.perf_counter() - start


def benchmark(depth, args, device):
    from mmpretrain.structures import DataSample
    dense, gated = build_models(depth, device, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(args.batch_size, 3, args.size, args.size,
                         generator=gen).to(device)
    labels = torch.randint(1000, (args.batch_size, ), generator=gen)
    samples = [DataSample().set_gt_label(int(label)) for label in labels]
    models = [('dense', dense), ('gated', gated)]
    variants = [name for name in VARIANTS if getattr(args, name)]
    models += [(name, copy.deepcopy(gated)) for name in variants]
    timer = GateLossTimer(gated, device)
    steps, records = OrderedDict(), {}
    for name, model in models:
        optimizer = build_optimizer(model, name, args.optimizer, depth)
        records[name] = {}
        steps[name] = make_step(model, optimizer, inputs, samples, device,
                                records[name])
    for name in variants:

        def step_within(step=steps[name], context=VARIANTS[name]):
            with context():
                return step()

        steps[name] = step_within
    times = {name: [] for name in steps}
    faults = {name: [] for name in steps}
    forward_times = {name: [] for name in steps}
    gate_loss, gate_loss_share, gate_backward = [], [], []
    for i in range(args.warmup + args.repeats):
        # Alternate the order, so that no model always follows the same
        # other's memory traffic.
        order = list(steps) if i % 2 == 0 else list(steps)[::-1]
        for name in order:
            faulted = minor_faults()
            start = time.perf_counter()
            steps[name]()
            elapsed = time.perf_counter() - start
            faulted = minor_faults() - faulted
            if i >= args.warmup:
                times[name].append(elapsed)
                faults[name].append(faulted)
                forward_times[name].append(records[name]['forward'])
                if name == 'gated':
                    gate_loss.append(timer.last)
                    gate_loss_share.append(timer.last / elapsed)
        if i >= args.warmup:
            # The gated model's last forward is still recorded on its gates.
            with torch.enable_grad():
                gated.loss(inputs, samples)  # fresh graph for the backward
                gate_backward.append(gate_loss_backward_time(gated, device))
    dense_ms = statistics.median(times['dense']) * 1e3
    gated_ms = statistics.median(times['gated']) * 1e3
    # Each round's two steps ran back to back: their ratio cancels the
    # drift of the machine's speed over the run.
    paired, paired_low, paired_high = median_interval(
        paired_ratios(times['gated'], times['dense']))
    # The losses' forward and backward over the gated step of their round.
    share, share_low, share_high = median_interval(paired_ratios(
        [f + b for f, b in zip(gate_loss, gate_backward)], times['gated']))
    loss_ms = statistics.median(gate_loss) * 1e3
    backward_ms = statistics.median(gate_backward) * 1e3
    # Per step, so that the forward and the rest (backward, SGD step) of
    # one step are paired.
    forward = {
        name: statistics.median(forward_times[name]) * 1e3
        for name in steps
    }
    rest = {
        name: statistics.median(t - f for t, f in zip(
            times[name], forward_times[name])) * 1e3
        for name in steps
    }
    row = OrderedDict(
        model=f'resnet{depth}',
        size=args.size,
        batch=args.batch_size,
        device=str(device),
        optimizer=args.optimizer,
        dense_ms=dense_ms,
        gated_ms=gated_ms,
        overhead=gated_ms / dense_ms,
        paired_overhead=paired,
        paired_overhead_low=paired_low,
        paired_overhead_high=paired_high,
        overhead_target=verdict(paired_low, paired_high, OVERHEAD_TARGET,
                                at_most=True),
        gate_loss_ms=loss_ms,
        gate_loss_share=statistics.median(gate_loss_share),
        gate_loss_backward_ms=backward_ms,
        gate_loss_fwd_bwd_share=(loss_ms + backward_ms) / gated_ms,
        paired_loss_share=share,
        paired_loss_share_low=share_low,
        paired_loss_share_high=share_high,
        loss_share_target=verdict(share_low, share_high, LOSS_SHARE_TARGET,
                                  at_most=True),
        dense_forward_ms=forward['dense'],
        gated_forward_ms=forward['gated'],
        forward_overhead=forward['gated'] / forward['dense'],
        backward_overhead=rest['gated'] / rest['dense'],
        dense_faults=statistics.mean(faults['dense']),
        gated_faults=statistics.mean(faults['gated']),
        dense_all_ms=[t * 1e3 for t in times['dense']],
        gated_all_ms=[t * 1e3 for t in times['gated']])
    for name in variants:
        ms = statistics.median(times[name]) * 1e3
        ratio, low, high = median_interval(
            paired_ratios(times['gated'], times[name]))
        row.update({
            f'{name}_ms': ms,
            f'{name}_overhead': ms / dense_ms,
            f'{name}_forward_overhead': forward[name] / forward['dense'],
            f'gated_vs_{name}': ratio,
            f'gated_vs_{name}_low': low,
            f'gated_vs_{name}_high': high,
            f'{name}_all_ms': [t * 1e3 for t in times[name]],
        })
    return row


def losses_benchmark(depth, args, device):
    """Milliseconds of the gate losses alone: ``gate_losses()`` (both losses
    and the open rate, from the gates of one recorded forward) and the
    batch-shaping loss's forward and backward on detached probabilities."""
    from mmpretrain.structures import DataSample

    from mmgated.models import collect_gates
    _, gated = build_models(depth, device, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(args.batch_size, 3, args.size, args.size,
                         generator=gen).to(device)
    gated.loss(inputs, [DataSample().set_gt_label(0)] * args.batch_size)
    probs = torch.cat([
        o.probs.detach() for o in collect_gates(gated).values()
    ], dim=1).requires_grad_()
    batch_shaping = gated.batch_shaping_loss

    def batch_shaping_step():
        batch_shaping(probs).backward()

    times = {}
    for name, call in (('gate_losses', gated.gate_losses),
                       ('batch_shaping', batch_shaping_step)):
        for _ in range(args.warmup):
            call()
        elapsed = []
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            elapsed.append(time.perf_counter() - start)
        times[name] = statistics.median(elapsed) * 1e3
    return OrderedDict(
        model=f'resnet{depth}',
        batch=args.batch_size,
        gates=probs.shape[1],
        device=str(device),
        gate_losses_ms=times['gate_losses'],
        batch_shaping_fwd_bwd_ms=times['batch_shaping'])


def gates_benchmark(depth, args, device):
    """Milliseconds of the gating modules alone, summed over the gates of
    the backbone: each gate's training forward (noise draw included) and
    backward (from a gradient of its hard gates), on the input it had in
    one forward of the model."""
    from mmpretrain.structures import DataSample

    from mmgated.models import gate_modules
    _, gated = build_models(depth, device, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(args.batch_size, 3, args.size, args.size,
                         generator=gen).to(device)
    gates = gate_modules(gated)
    block_inputs = {}
    hooks = [
        gate.register_forward_pre_hook(
            lambda module, inputs, name=name: block_inputs.__setitem__(
                name, inputs[0].detach()))
        for name, gate in gates.items()
    ]
    gated.loss(inputs, [DataSample().set_gt_label(0)] * args.batch_size)
    for hook in hooks:
        hook.remove()
    forward_ms = backward_ms = 0.0
    for name, gate in gates.items():
        x = block_inputs[name].clone().requires_grad_()
        grad = torch.ones(args.batch_size, gate.out_channels, device=device)
        forward, backward = [], []
        for i in range(args.warmup + args.repeats):
            x.grad = None
            _sync(device)
            start = time.perf_counter()
            hard = gate(x)
            _sync(device)
            middle = time.perf_counter()
            hard.backward(grad)
            _sync(device)
            if i >= args.warmup:
                forward.append(middle - start)
                backward.append(time.perf_counter() - middle)
        forward_ms += statistics.median(forward) * 1e3
        backward_ms += statistics.median(backward) * 1e3
    return OrderedDict(
        model=f'resnet{depth}',
        batch=args.batch_size,
        gates=len(gates),
        device=str(device),
        gates_forward_ms=forward_ms,
        gates_backward_ms=backward_ms)


def norms_benchmark(depth, args, device):
    """Milliseconds of the gated maps' norm and activation alone, forward
    and backward, summed over the gated maps of the backbone, on the maps
    and gates one forward of the model gave them, three ways alternating
    map by map: ``fused``, the library's (one batch-norm gated ReLU node);
    ``separate``, PyTorch's batch norm then the gated ReLU; ``dense``, the
    dense block's batch norm then in-place ReLU (no gates)."""
    from mmpretrain.structures import DataSample

    import mmgated.models.blocks as blocks
    _, gated = build_models(depth, device, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(args.batch_size, 3, args.size, args.size,
                         generator=gen).to(device)
    fused = blocks.batch_norm_gated_relu
    maps = []

    def capture(x, norm, gates):
        maps.append((x.detach().clone(), copy.deepcopy(norm),
                     gates.detach().clone()))
        return fused(x, norm, gates)

    blocks.batch_norm_gated_relu = capture
    try:
        gated.loss(inputs, [DataSample().set_gt_label(0)] * args.batch_size)
    finally:
        blocks.batch_norm_gated_relu = fused
    ways = OrderedDict(
        fused=fused,
        separate=norm_then_gated_relu,
        dense=lambda x, norm, gates: torch.relu_(norm(x)))
    times = {name: [0.0] * args.repeats for name in ways}
    for i in range(args.warmup + args.repeats):
        order = list(ways) if i % 2 == 0 else list(ways)[::-1]
        for x, norm, gates in maps:
            grad = torch.ones_like(x)
            for name in order:
                x = x.detach().requires_grad_()
                gates = gates.detach().requires_grad_()
                norm.zero_grad(set_to_none=True)
                _sync(device)
                start = time.perf_counter()
                ways[name](x, norm, gates).backward(grad)
                _sync(device)
                if i >= args.warmup:
                    times[name][i - args.warmup] += \
                        time.perf_counter() - start
    row = OrderedDict(
        model=f'resnet{depth}',
        batch=args.batch_size,
        gates=len(maps),
        device=str(device),
        size=args.size)
    for name in ways:
        row[f'{name}_ms'] = statistics.median(times[name]) * 1e3
    for name in ('separate', 'dense'):
        ratio, low, high = median_interval(
            paired_ratios(times['fused'], times[name]))
        row.update({f'fused_vs_{name}': ratio,
                    f'fused_vs_{name}_low': low,
                    f'fused_vs_{name}_high': high})
    return row


def optimizer_benchmark(depth, args, device):
    """Milliseconds of the recipe's optimizer steps alone, on fixed random
    gradients, alternating every round: the dense model's (one group), the
    gated model's (merged groups) and the gated model's with one group per
    parameter (mmengine's default constructor)."""
    dense, gated = build_models(depth, device, args.seed)
    models = OrderedDict(
        dense=dense, gated=gated, per_param_groups=copy.deepcopy(gated))
    gen = torch.Generator().manual_seed(args.seed)
    optimizers = OrderedDict()
    for name, model in models.items():
        optimizers[name] = build_optimizer(model, name, 'recipe', depth)
        for param in model.parameters():
            # Small, so that the weights stay where they started.
            param.grad = 1e-4 * torch.randn(
                param.shape, generator=gen).to(device)
    times = {name: [] for name in optimizers}
    for i in range(args.warmup + args.repeats):
        order = list(optimizers) if i % 2 == 0 else list(optimizers)[::-1]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            optimizers[name].step()
            _sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    ratio, low, high = median_interval(
        paired_ratios(times['gated'], times['per_param_groups']))
    extra = {
        name: statistics.median(
            t - d for t, d in zip(times[name], times['dense'])) * 1e3
        for name in ('gated', 'per_param_groups')
    }
    row = OrderedDict(
        model=f'resnet{depth}',
        device=str(device),
        params={name: len(list(m.parameters()))
                for name, m in models.items()},
        groups={name: len(o.param_groups) for name, o in optimizers.items()})
    row.update({f'{name}_ms': statistics.median(t) * 1e3
                for name, t in times.items()})
    row.update(
        gated_extra_ms=extra['gated'],
        per_param_groups_extra_ms=extra['per_param_groups'],
        gated_vs_per_param_groups=ratio,
        gated_vs_per_param_groups_low=low,
        gated_vs_per_param_groups_high=high)
    return row


def optimizer_markdown(rows):
    lines = [
        '| model | device | parameters dense / gated | groups dense / gated '
        '/ per-parameter | dense step ms | gated step ms | per-parameter '
        'groups ms | gated - dense ms | per-parameter - dense ms | paired '
        'gated/per-parameter [95 % CI] |',
        '|---|---|---|---|---:|---:|---:|---:|---:|---:|'
    ]
    for r in rows:
        p, g = r['params'], r['groups']
        lines.append(
            f'| {r["model"]} | {r["device"]} | {p["dense"]} / {p["gated"]} '
            f'| {g["dense"]} / {g["gated"]} / {g["per_param_groups"]} | '
            f'{r["dense_ms"]:.2f} | {r["gated_ms"]:.2f} | '
            f'{r["per_param_groups_ms"]:.2f} | {r["gated_extra_ms"]:.2f} | '
            f'{r["per_param_groups_extra_ms"]:.2f} | '
            f'{format_row_interval(r, "gated_vs_per_param_groups")} |')
    return '\n'.join(lines)


def _alone_markdown(rows, count, columns):
    """A table of what was timed alone: model, batch, ``count`` (the header
    of ``row['gates']``), device, then ``columns``, ``(header, key)`` pairs
    of milliseconds."""
    lines = [
        f'| model | batch | {count} | device | ' +
        ' | '.join(header for header, _ in columns) + ' |',
        '|---|---:|---:|---|' + '---:|' * len(columns)
    ]
    for r in rows:
        values = ' | '.join(f'{r[key]:.2f}' for _, key in columns)
        lines.append(f'| {r["model"]} | {r["batch"]} | {r["gates"]} | '
                     f'{r["device"]} | {values} |')
    return '\n'.join(lines)


def gates_markdown(rows):
    return _alone_markdown(rows, 'gating modules',
                           [('their forward ms', 'gates_forward_ms'),
                            ('their backward ms', 'gates_backward_ms')])


def norms_markdown(rows):
    lines = [
        '| model | input | batch | gated maps | device | one node ms | '
        'batch norm + gated ReLU ms | dense block\'s ms | paired one node / '
        'batch norm + gated ReLU [95 % CI] | paired one node / dense '
        'block\'s [95 % CI] |', '|---|---|---:|---:|---|---:|---:|---:|---:'
        '|---:|'
    ]
    for r in rows:
        lines.append(
            f'| {r["model"]} | {r["size"]}x{r["size"]} | {r["batch"]} | '
            f'{r["gates"]} | {r["device"]} | {r["fused_ms"]:.2f} | '
            f'{r["separate_ms"]:.2f} | {r["dense_ms"]:.2f} | '
            f'{format_row_interval(r, "fused_vs_separate")} | '
            f'{format_row_interval(r, "fused_vs_dense")} |')
    return '\n'.join(lines)


def losses_markdown(rows):
    return _alone_markdown(
        rows, 'gates',
        [('gate_losses() ms', 'gate_losses_ms'),
         ('batch-shaping fwd+bwd ms', 'batch_shaping_fwd_bwd_ms')])


def markdown(rows):
    variants = [name for name in VARIANTS
                if all(f'{name}_ms' in r for r in rows)]
    extra = ''.join(f' {name} step ms | {name}/dense | {name} forward/dense '
                    f'| paired gated/{name} [95 % CI] |'
                    for name in variants)
    lines = [
        '| model | input | batch | device | dense step ms | gated step ms '
        '| gated/dense | paired gated/dense [95 % CI] | <= 1.05? '
        '| gate losses ms | share of step | + their backward '
        'ms | fwd+bwd share | paired fwd+bwd share [95 % CI] | <= 1 %? '
        '| forward gated/dense | backward + step gated/dense '
        '| page faults per step dense / gated |' + extra,
        '|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:'
        '|---|---:|---:|---:|' + '---:|' * 4 * len(variants)
    ]
    for r in rows:
        line = (
            f'| {r["model"]} | {r["size"]}x{r["size"]} | {r["batch"]} | '
            f'{r["device"]} | {r["dense_ms"]:.1f} | {r["gated_ms"]:.1f} | '
            f'{r["overhead"]:.3f} | '
            f'{format_row_interval(r, "paired_overhead")} | '
            f'{r["overhead_target"]} | {r["gate_loss_ms"]:.2f} | '
            f'{r["gate_loss_share"] * 100:.2f} % | '
            f'{r["gate_loss_backward_ms"]:.2f} | '
            f'{r["gate_loss_fwd_bwd_share"] * 100:.2f} % | '
            f'{format_row_interval(r, "paired_loss_share", 2, 100)} % | '
            f'{r["loss_share_target"]} | '
            f'{r["forward_overhead"]:.3f} | {r["backward_overhead"]:.3f} | '
            f'{r["dense_faults"]:.0f} / {r["gated_faults"]:.0f} |')
        for name in variants:
            line += (f' {r[f"{name}_ms"]:.1f} | {r[f"{name}_overhead"]:.3f} '
                     f'| {r[f"{name}_forward_overhead"]:.3f} | '
                     f'{format_row_interval(r, f"gated_vs_{name}")} |')
        lines.append(line)
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.keep_heap:
        keep_heap()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    device = torch.device(args.device)
    load_before = os.getloadavg()
    rows = []
    for depth in args.depths:
        start = time.time()
        run = losses_benchmark if args.losses_only else \
            gates_benchmark if args.gates_only else \
            norms_benchmark if args.norms_only else \
            optimizer_benchmark if args.optimizer_only else benchmark
        rows.append(run(depth, args, device))
        print(f'# resnet{depth}: {time.time() - start:.0f} s',
              file=sys.stderr)
    load_after = os.getloadavg()
    header = (f'torch {torch.__version__}, {torch.get_num_threads()} '
              f'threads, load average {load_before[0]:.2f} -> '
              f'{load_after[0]:.2f}; ' +
              ('heap kept (--keep-heap); ' if args.keep_heap else ''))
    if args.optimizer_only:
        print(header + f'the recipe\'s optimizer; median of {args.repeats} '
              'steps each; paired: median of the per-round ratios, with its '
              'distribution-free 95 % interval')
        print(optimizer_markdown(rows))
    elif args.norms_only:
        print(header + f'median of {args.repeats} rounds, each the sum over '
              'the gated maps; paired: median of the per-round ratios, with '
              'its distribution-free 95 % interval')
        print(norms_markdown(rows))
    elif args.losses_only or args.gates_only:
        print(header + f'median of {args.repeats} calls, each')
        print((losses_markdown if args.losses_only else gates_markdown)(rows))
    else:
        print(header + f'optimizer {args.optimizer}; '
              f'median of {args.repeats} steps (targets: '
              'gated/dense <= 1.05, gate losses <= 1 % of a step); '
              'paired: median of the per-round ratios, with its '
              'distribution-free 95 % interval')
        print(markdown(rows))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(
                dict(
                    torch=torch.__version__,
                    threads=torch.get_num_threads(),
                    loadavg=[load_before, load_after],
                    args=vars(args),
                    rows=rows), f, indent=2)
    return rows


if __name__ == '__main__':
    main()
