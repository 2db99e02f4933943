"""One-shot GPU check of the gated models: training, skip == mask, timing.

Without CUDA it says so and exits 0 before building anything. On a GPU it
runs these sections (``--sections``), each in its own ``try``:

* ``train``: 5 steps (``model.loss(inputs, data_samples)``, backward, SGD)
  of the gated ResNet-18 classifier (batch 32, 224x224, random labels) and
  the gated PSPNet-R50-D8 of ``configs/pspnet_gated_r50_cityscapes.py``
  (SyncBN reverted to BN, 2x512x512, random label maps), both gate losses on
  (batch-shaping 0.75, L0 0.1), in ``fp32``, ``fp16`` (autocast, GradScaler
  from 2**10; one step the scaler skips is tolerated), ``bf16`` and
  ``compile`` (fp32, backbone compiled with ``nn.Module.compile``). Every
  loss and parameter gradient must be finite at every step, and no
  parameter may lack a gradient that fp32 gives it.
* ``skip_mask``: eval mode, random BN statistics, gates forced open with
  p = 0.5 (``force_gates(model, 0.5, seed=0)``, the same draw for both):
  ``set_gate_execution(model, 'skip')`` must match ``'mask'`` to atol = rtol
  = 1e-4 in fp32 with TF32 off, for the gated ResNet-18 and the PSPNet
  backbone (2x3x256x256).
* ``overhead`` (timing): fp32 training-step time of the gated ResNet-18
  classifier over the dense one (mmpretrain ``ResNet``, same head), eager
  and compiled: median of the per-round ratios, the models alternating.
* ``realized`` (timing): the gated ResNet-34 backbone in skip execution,
  gates forced at 50 %, against the dense ResNet-34 at 224x224, batch 1, 8
  and 32: realized = (dense time / skip time) / (dense MACs / skip MACs).
  The MAC ratio is the batch mean of :func:`mmgated.analysis.count_macs`'
  ``ratio`` (gating modules included) for one forced draw; the timed calls
  draw a fresh pattern of that density each call, which at ~3.8k gated
  channels moves the ratio by well under 1 %.

Timings use ``torch.cuda.synchronize`` around each call and exclude warm-up
(``cudnn.benchmark`` stays off: skip execution changes shapes every call).
The script prints a summary table, writes the rows to ``--out`` (JSON) and
exits 1 if any check failed or any section raised.

Example::

    .venv/bin/python benchmarks/gpu_check.py --out gpu.json
    .venv/bin/python benchmarks/gpu_check.py --quick --sections skip_mask
"""
import argparse
import copy
import importlib
import json
import os.path as osp
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SECTIONS = ('train', 'skip_mask', 'overhead', 'realized')
MODES = ('fp32', 'fp16', 'bf16', 'compile')
AMP_DTYPES = dict(fp16=torch.float16, bf16=torch.bfloat16)
# (batch, size) of each section's inputs; tests shrink them.
SIZES = dict(train_cls=(32, 224), train_seg=(2, 512), skip_mask_cls=(2, 224),
             skip_mask_seg=(2, 256), overhead=(32, 224), realized=224,
             realized_batches=(1, 8, 32))
# Both gate losses on, so that both run and get gradients.
GATE_LOSSES = dict(
    batch_shaping_loss=dict(type='BatchShapingLoss', loss_weight=0.75,
                            prior=dict(type='beta', a=0.6, b=0.4),
                            reduction='sum'),
    l0_loss=dict(type='GateL0Loss', loss_weight=0.1))


def classifier_cfg(depth=18, gated=True, num_classes=1000):
    """The classifier of ``configs/resnet{depth}_bas_in1k.py`` (gated, with
    :data:`GATE_LOSSES`) or its dense mmpretrain baseline."""
    cfg = dict(
        type='ImageClassifier',
        backbone=dict(type='ResNet', depth=depth, out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=num_classes,
                  in_channels=512 if depth < 50 else 2048,
                  loss=dict(type='CrossEntropyLoss'), topk=(1, 5)))
    if gated:
        cfg.update(type='GatedImageClassifier', **copy.deepcopy(GATE_LOSSES))
        cfg['backbone'].update(type='GatedResNet', gate_cfg=dict(tau=2 / 3))
    return cfg


def pspnet_cfg():
    """The model of ``configs/pspnet_gated_r50_cityscapes.py`` with
    :data:`GATE_LOSSES`."""
    from mmengine.config import Config
    path = osp.join(REPO, 'configs', 'pspnet_gated_r50_cityscapes.py')
    cfg = Config.fromfile(path).model
    cfg.update(copy.deepcopy(GATE_LOSSES))
    return cfg


def build(scope, cfg, device, seed=0):
    """Build ``cfg`` with the ``MODELS`` of ``scope`` (``'mmpretrain'`` or
    ``'mmseg'``), SyncBN reverted to BN, on ``device``."""
    import mmgated  # noqa: F401  (registers the gated models)
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    init_default_scope(scope)
    torch.manual_seed(seed)
    model = importlib.import_module(f'{scope}.registry').MODELS.build(cfg)
    return revert_sync_batchnorm(model).to(device)


def cls_batch(n, size, device, num_classes=1000, seed=0):
    """Random ``(inputs, data_samples)`` with random labels."""
    from mmpretrain.structures import DataSample
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n, ), generator=gen).tolist()
    samples = [DataSample().set_gt_label(y).to(device) for y in labels]
    return torch.randn(n, 3, size, size, generator=gen).to(device), samples


def seg_batch(n, size, device, num_classes=19, seed=0):
    """Random ``(inputs, data_samples)`` with random label maps."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(seed)
    shape = (size, size)
    samples = [SegDataSample(
        metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape),
        gt_sem_seg=PixelData(data=torch.randint(
            num_classes, (1, *shape), generator=gen))).to(device)
        for _ in range(n)]
    return torch.randn(n, 3, size, size, generator=gen).to(device), samples


def grad_problems(model):
    """Names of the trainable parameters with a non-finite gradient, and of
    those without a gradient."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = [(n, p.grad) for n, p in named if p.grad is not None]
    finite = torch.stack([torch.isfinite(g).all() for _, g in grads]
                         ).tolist() if grads else []
    return ([n for (n, _), ok in zip(grads, finite) if not ok],
            [n for n, p in named if p.grad is None])


def make_step(model, inputs, samples, mode='fp32', lr=1e-3):
    """A closure ``step(check=False)`` running one SGD step of ``model`` in
    ``mode`` (``'compile'`` compiles the backbone in place). It returns the
    loss dict and, with ``check``, :func:`grad_problems` of the unscaled
    gradients before the optimizer step."""
    dev = inputs.device.type
    model.train()
    if mode == 'compile':
        model.backbone.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    dtype = AMP_DTYPES.get(mode)
    scaler = torch.amp.GradScaler(dev, init_scale=2.0**10) \
        if mode == 'fp16' else None

    def step(check=False):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=dtype, enabled=dtype is not None):
            losses = model.loss(inputs, samples)
        loss, _ = model.parse_losses(losses)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        problems = grad_problems(model) if check else None
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        return losses, problems

    return step


def train_check(model, inputs, samples, mode='fp32', iters=5):
    """Train ``iters`` steps, checking every one.

    Returns:
        tuple: Every failed check (text), the parameters without a gradient
        at the last step, and the last step's losses as floats.
    """
    step = make_step(model, inputs, samples, mode)
    failures, overflows = [], []
    for it in range(iters):
        losses, (bad, missing) = step(check=True)
        bad_losses = [k for k, v in losses.items() if torch.is_tensor(v)
                      and not bool(torch.isfinite(v.detach()).all())]
        if bad_losses:
            failures.append(f'step {it}: non-finite {bad_losses}')
        if bad:  # fp16: the GradScaler skips the step
            (overflows if mode == 'fp16' else failures).append(
                f'step {it}: {len(bad)} non-finite grads, e.g. {bad[:4]}')
    failures += overflows if len(overflows) > 1 else []
    last = {k: float(v.detach().float().mean()) for k, v in losses.items()
            if torch.is_tensor(v)}
    return failures, missing, last


def randomize_bn(model, seed=0):
    """Random statistics and affine parameters in every BN, so that channels
    mixed up by skip execution cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine \
                and m.running_mean is not None:
            for t, low, high in ((m.running_mean, -.5, .5), (m.bias, -.5, .5),
                                 (m.running_var, .5, 2.), (m.weight, .5, 1.5)):
                t.data.copy_(low + (high - low) * torch.rand(
                    t.shape, generator=gen))


def skip_mask_check(backbone, x, tol=1e-4, density=0.5, seed=0):
    """Compare a gated backbone's outputs in skip and mask execution (eval,
    fp32, TF32 off, the same seeded forced gates).

    Returns:
        dict: ``ok`` (allclose at ``tol`` and the same gates), ``max_abs``,
        ``same_gates`` and the ``open_rate`` of the forced gates.
    """
    from mmgated.models import collect_gates, force_gates, set_gate_execution
    randomize_bn(backbone, seed)
    backbone.eval()
    outs, gates = {}, {}
    tf32 = (torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for execution in ('mask', 'skip'):
            set_gate_execution(backbone, execution)
            with torch.no_grad(), force_gates(backbone, density, seed=seed):
                out = backbone(x)
            outs[execution] = out if isinstance(out, (list, tuple)) else [out]
            gates[execution] = torch.cat([
                o.gates.flatten().float().cpu()
                for o in collect_gates(backbone).values()])
    finally:
        set_gate_execution(backbone, 'mask')
        torch.backends.cudnn.allow_tf32 = tf32[0]
        torch.backends.cuda.matmul.allow_tf32 = tf32[1]
    pairs = list(zip(outs['skip'], outs['mask']))
    same = torch.equal(gates['skip'], gates['mask'])
    close = all(torch.allclose(s, m, atol=tol, rtol=tol) for s, m in pairs)
    return dict(ok=same and close, same_gates=same,
                max_abs=max((s - m).abs().max().item() for s, m in pairs),
                open_rate=gates['mask'].mean().item())


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def time_paired(fns, rounds, warmup, device):
    """Milliseconds of each callable per round (a list in round order),
    after ``warmup`` untimed rounds; the order rotates every round."""
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def paired_ratio(numerators, denominators):
    """Median of the per-round ratios ``a / b``."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError('paired timings need the same, non-zero number of '
                         f'rounds, got {len(numerators)} and '
                         f'{len(denominators)}')
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def realized_ratio(dense_ms, skip_ms, dense_macs, skip_macs):
    """``(dense_ms / skip_ms) / (dense_macs / skip_macs)``: 1.0 when skip
    execution turns its MAC savings into time one to one."""
    return (dense_ms / skip_ms) / (dense_macs / skip_macs)


def section_train(args, device, add):
    models = dict(resnet18=('mmpretrain', classifier_cfg, cls_batch, 'cls'),
                  pspnet=('mmseg', pspnet_cfg, seg_batch, 'seg'))
    for name, (scope, make_cfg, make_batch, task) in models.items():
        inputs, samples = make_batch(*SIZES[f'train_{task}'], device)
        reference = None  # the parameters fp32 leaves without a gradient
        for mode in args.modes:
            start = time.perf_counter()
            try:
                failures, missing, last = train_check(
                    build(scope, make_cfg(), device), inputs, samples, mode,
                    args.iters)
                if mode == 'fp32':
                    reference = set(missing)
                elif reference is not None and set(missing) - reference:
                    failures.append('no gradient: '
                                    f'{sorted(set(missing) - reference)[:4]}')
                add('train', f'{name}/{mode}', not failures,
                    '; '.join(failures) or ', '.join(
                        f'{k}={v:.3g}' for k, v in last.items()
                        if 'loss' in k), losses=last,
                    seconds=time.perf_counter() - start)
            except Exception as error:  # a crash fails this mode only
                traceback.print_exc()
                add('train', f'{name}/{mode}', False, f'raised {error!r}')
            torch.cuda.empty_cache()


def section_skip_mask(args, device, add):
    backbones = dict(
        resnet18=('mmpretrain', lambda: dict(type='GatedResNet', depth=18),
                  'cls'),
        pspnet_backbone=('mmseg', lambda: pspnet_cfg().backbone, 'seg'))
    for name, (scope, make_cfg, task) in backbones.items():
        try:
            n, size = SIZES[f'skip_mask_{task}']
            x = torch.randn(n, 3, size, size,
                            generator=torch.Generator().manual_seed(0))
            result = skip_mask_check(build(scope, make_cfg(), device),
                                     x.to(device))
            add('skip_mask', name, result.pop('ok'),
                f"max|skip-mask| {result['max_abs']:.2e}, same gates "
                f"{result['same_gates']}, open {result['open_rate']:.2f}",
                **result)
        except Exception as error:
            traceback.print_exc()
            add('skip_mask', name, False, f'raised {error!r}')


def section_overhead(args, device, add):
    inputs, samples = cls_batch(*SIZES['overhead'], device)
    for mode, label in (('fp32', 'eager'), ('compile', 'compiled')):
        steps = {kind: make_step(build('mmpretrain', classifier_cfg(
            18, kind == 'gated'), device), inputs, samples, mode)
            for kind in ('gated', 'dense')}
        # Compiled: one more warm-up round, for the recompilations.
        times = time_paired(steps, args.rounds,
                            args.warmup + (mode == 'compile'), device)
        ratio = paired_ratio(times['gated'], times['dense'])
        add('overhead', f'resnet18 step gated/dense {label}', None,
            f"{ratio:.3f} (gated {statistics.median(times['gated']):.1f} ms,"
            f" dense {statistics.median(times['dense']):.1f} ms)",
            ratio=ratio, times=times)


def section_realized(args, device, add):
    from mmgated.analysis import count_macs
    from mmgated.models import force_gates, set_gate_execution
    # Not build(...).eval(): mmpretrain's ResNet.train returns None.
    dense = build('mmpretrain', dict(type='ResNet', depth=34), device)
    gated = build('mmpretrain', dict(type='GatedResNet', depth=34), device)
    dense.eval()
    gated.eval()
    size = SIZES['realized']
    for batch in SIZES['realized_batches']:
        x = torch.randn(batch, 3, size, size).to(device)
        with force_gates(gated, 0.5, seed=0):
            mac_ratio = float(count_macs(gated, x)['ratio'].mean())
        set_gate_execution(gated, 'skip')
        with torch.no_grad(), force_gates(gated, 0.5, seed=0):
            times = time_paired(dict(dense=lambda: dense(x),
                                     skip=lambda: gated(x)),
                                args.rounds, args.warmup, device)
        set_gate_execution(gated, 'mask')
        # The paired dense/skip time ratio; MACs relative to the dense ones.
        realized = realized_ratio(
            paired_ratio(times['dense'], times['skip']), 1.0, 1.0, mac_ratio)
        dense_ms, skip_ms = (statistics.median(times[k])
                             for k in ('dense', 'skip'))
        add('realized', f'resnet34 skip 50% batch {batch}', None,
            f'{realized:.2f} (dense {dense_ms:.2f} ms, skip {skip_ms:.2f} '
            f'ms, MAC ratio {mac_ratio:.3f})', realized=realized,
            mac_ratio=mac_ratio, dense_ms=dense_ms, skip_ms=skip_ms)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sections', nargs='+', choices=SECTIONS,
                        default=list(SECTIONS))
    parser.add_argument('--modes', nargs='+', choices=MODES,
                        default=list(MODES), help='modes of section train')
    parser.add_argument('--quick', action='store_true',
                        help='2 training steps, 5 timed rounds, 1 warm-up')
    parser.add_argument('--out', help='write the rows to this JSON file')
    args = parser.parse_args(argv)
    args.iters, args.rounds, args.warmup = \
        (2, 5, 1) if args.quick else (5, 10, 2)
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print('CUDA is unavailable: no GPU check run.')
        return 0
    device = torch.device('cuda')
    name = torch.cuda.get_device_name(device)
    print(f'{name}, torch {torch.__version__}', flush=True)
    rows = []

    def add(section, check, ok, detail, **values):
        status = 'INFO' if ok is None else ('PASS' if ok else 'FAIL')
        rows.append(dict(section=section, check=check, status=status,
                         detail=detail, **values))
        print(f'[{section}] {check}: {status} {detail}', flush=True)

    for section in args.sections:
        start = time.perf_counter()
        try:
            globals()[f'section_{section}'](args, device, add)
        except Exception as error:  # the other sections still run
            traceback.print_exc()
            add(section, 'section', False, f'raised {error!r}')
        print(f'[{section}] {time.perf_counter() - start:.0f} s', flush=True)
    print(f"\n{'section':<10} {'check':<36} {'status':<6} detail")
    for row in rows:
        print(f"{row['section']:<10} {row['check']:<36} {row['status']:<6} "
              f"{row['detail']}")
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(device=name, torch=torch.__version__, rows=rows),
                      f, indent=1, default=str)
    failed = [row['check'] for row in rows if row['status'] == 'FAIL']
    print(f'\n{len(failed)} check(s) failed' + (f': {failed}' * bool(failed)))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
