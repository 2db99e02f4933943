"""Skip execution (compute open channels only) against mask execution,
with each backend."""
import copy

import pytest
import torch
import torch.nn as nn

from mmgated.analysis import gated_savings
from mmgated.models import (ChannelGate, force_gates, gate_modules,
                            set_gate_execution)
from mmgated.models import skip_execution
from mmgated.models.blocks import is_gated_block
from mmgated.models.skip_backends import compiled_cpu
from mmgated.ops import direct_conv_fast, native, native_available

mmseg_models = pytest.importorskip('mmseg.registry').MODELS
mmpretrain_models = pytest.importorskip('mmpretrain.registry').MODELS

PSP_BACKBONE = dict(
    type='GatedResNetV1c',
    depth=50,
    strides=(1, 2, 1, 1),
    dilations=(1, 1, 2, 4),
    contract_dilation=True)

# (registry, backbone config, input size)
BACKBONES = {
    'basic': (mmpretrain_models, dict(type='GatedResNet', depth=18), 32),
    'mmseg-basic': (mmseg_models, dict(type='GatedResNet', depth=18), 32),
    'cifar-basic': (mmpretrain_models, dict(type='GatedResNetCifar',
                                            depth=20), 32),
    'bottleneck-after_conv1':
    (mmpretrain_models,
     dict(type='GatedResNet', depth=50,
          gate_cfg=dict(position='after_conv1')), 32),
    'bottleneck-after_conv2':
    (mmpretrain_models,
     dict(type='GatedResNet', depth=50,
          gate_cfg=dict(position='after_conv2')), 32),
    'bottleneck-both':
    (mmpretrain_models,
     dict(type='GatedResNet', depth=50, gate_cfg=dict(position='both')), 32),
    # stride in conv1 instead of conv2
    'bottleneck-caffe-both':
    (mmpretrain_models,
     dict(type='GatedResNet', depth=50, style='caffe',
          gate_cfg=dict(position='both')), 32),
    # strided and dilated (output stride 8), PSPNet-R50-D8's backbone
    'pspnet-after_conv2': (mmseg_models, PSP_BACKBONE, 64),
    'pspnet-after_conv1':
    (mmseg_models, dict(PSP_BACKBONE, gate_cfg=dict(position='after_conv1')),
     64),
    'pspnet-both': (mmseg_models,
                    dict(PSP_BACKBONE, gate_cfg=dict(position='both')), 64),
}

_CACHE = {}


def build_in(registry, cfg):
    """Build from ``registry`` itself: ``Registry.build`` would switch to
    the default scope that an earlier test left set."""
    cfg = dict(cfg)
    return registry.get(cfg.pop('type'))(**cfg)


pytestmark = pytest.mark.usefixtures('one_thread')


def _randomize(model, seed=0):
    """Non-trivial BN statistics and affine parameters, so that indexing
    the wrong BN channel shows; the trunk is kept at a sane scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.25)
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)


def _backbone(key):
    """A built, randomised backbone in eval mode (built once per key)."""
    if key not in _CACHE:
        registry, cfg, size = BACKBONES[key]
        torch.manual_seed(0)
        model = build_in(registry, cfg)
        _randomize(model)
        model.eval()
        _CACHE[key] = (model, size)
    model, size = _CACHE[key]
    set_gate_execution(model, 'mask')
    return model, size


@pytest.fixture(params=['torch', 'compiled'])
def backend(request):
    """Each backend; the compiled one where its kernels build."""
    if request.param == 'compiled' and not native_available():
        pytest.skip('no C compiler: no compiled kernels')
    return request.param


def _run(model, x, execution, value, seed=1, backend='auto'):
    set_gate_execution(model, execution, backend)
    with torch.no_grad(), force_gates(model, value, seed=seed):
        out = model(x)
        savings = gated_savings(model)
    gates = {k: m.output.gates.clone() for k, m in gate_modules(model).items()}
    return out, gates, savings


def _assert_equal_outputs(mask_out, skip_out):
    assert len(mask_out) == len(skip_out)
    for a, b in zip(mask_out, skip_out):
        assert a.shape == b.shape
        scale = a.abs().max().clamp(min=1.0)
        err = ((a - b).abs().max() / scale).item()
        assert err <= 1e-4, f'skip differs from mask by {err:.3g} (relative)'


def _compare(mask, skip):
    """Compare the ``_run`` results of mask and skip execution."""
    (mask_out, mask_gates, mask_savings), (skip_out, skip_gates,
                                           skip_savings) = mask, skip
    # Same draws, so the same gates were applied in both executions ...
    for name, gates in mask_gates.items():
        assert torch.equal(gates, skip_gates[name]), name
    # ... and the same MAC accounting.
    torch.testing.assert_close(mask_savings, skip_savings)
    _assert_equal_outputs(mask_out, skip_out)


def _check_equal(model, x, value, seed=1, backend='auto'):
    _compare(_run(model, x, 'mask', value, seed),
             _run(model, x, 'skip', value, seed, backend))


# Mask execution's results of test_skip_equals_mask, shared by the backends.
_MASK_RUNS = {}


@pytest.mark.parametrize('batch_size', [1, 3])
@pytest.mark.parametrize('key', list(BACKBONES))
def test_skip_equals_mask(key, batch_size, backend):
    model, size = _backbone(key)
    x = torch.randn(batch_size, 3, size, size,
                    generator=torch.Generator().manual_seed(batch_size))
    # 0.0 and 1.0: all gates closed and all open for the whole batch.
    for value in (0.0, 0.5, 1.0):
        seed = int(value * 10)
        run = (key, batch_size, value)
        if run not in _MASK_RUNS:
            _MASK_RUNS[run] = _run(model, x, 'mask', value, seed)
        _compare(_MASK_RUNS[run], _run(model, x, 'skip', value, seed,
                                       backend))


@pytest.mark.parametrize('key', ['basic', 'bottleneck-both'])
def test_larger_maps(key, backend):
    """Maps above the compiled backend's weight-bound size, where single
    samples run its kernels with some channels closed only."""
    model, size = _backbone(key)
    x = torch.randn(1, 3, 2 * size, 2 * size)
    for value in (0.5, 1.0):
        _check_equal(model, x, value, seed=5, backend=backend)


def test_compiled_outside_its_cache_budget(monkeypatch):
    """Convolutions whose weight and padded input exceed the compiled
    kernel's cache budget run as the torch backend's; the same result."""
    if not native_available():
        pytest.skip('no C compiler: no compiled kernels')
    monkeypatch.setattr(compiled_cpu, 'DIRECT_WEIGHT_BYTES', 0)
    monkeypatch.setattr(compiled_cpu, 'DIRECT_INPUT_BYTES', 0)
    model, size = _backbone('basic')
    _check_equal(model, torch.randn(1, 3, 2 * size, 2 * size), 0.5, seed=3,
                 backend='compiled')


def _record_segments(monkeypatch):
    """Record, for each segment a plan runs, whether it computes a subset
    of channels and whether it applies masks."""
    calls = []
    original = skip_execution._Plan.segment

    def segment(plan, h, indices, masks=None, residual=None):
        calls.append((any(i is not None for i in indices), masks is not None))
        return original(plan, h, indices, masks, residual)

    monkeypatch.setattr(skip_execution._Plan, 'segment', segment)
    return calls


@pytest.mark.parametrize('efficiency', [1e9, 1e-9])
@pytest.mark.parametrize('key', ['basic', 'bottleneck-both'])
def test_union_and_grouped_plans(key, efficiency, backend, monkeypatch):
    """A batch whose patterns differ runs either as one computation of the
    union of open channels with masks, or one computation per pattern."""
    # 1e9: per pattern always; 1e-9: the union always.
    monkeypatch.setattr(skip_execution, 'GROUP_EFFICIENCY', efficiency)
    monkeypatch.setattr(skip_execution, 'PLAN_COSTS',
                        dict(cpu=dict(weight=0, call=0)))
    model, size = _backbone(key)
    calls = _record_segments(monkeypatch)
    x = torch.randn(4, 3, size, size)
    _check_equal(model, x, 0.5, seed=3, backend=backend)
    _check_equal(model, x, 0.9, seed=4, backend=backend)
    masked = [m for _, m in calls]
    assert all(masked) if efficiency < 1 else not any(masked)


@pytest.mark.parametrize('weight_cost', [0, 1e12])
@pytest.mark.parametrize('key', ['basic', 'bottleneck-both', 'pspnet-both'])
def test_batch_one_sparse_and_masked_dense_plans(key, weight_cost,
                                                 monkeypatch):
    """At batch 1 a block computes its open channels only, or, where the
    cost estimate says the weight gathers cost more than they save, all
    channels with the closed ones masked; both equal mask execution."""
    # 0: gathering is free, always sparse; 1e12: gathers dominate, so
    # 90 % open (81 % of conv2 in 'both') is cheaper dense with masks.
    monkeypatch.setattr(skip_execution, 'PLAN_COSTS',
                        dict(cpu=dict(weight=weight_cost, call=0)))
    model, size = _backbone(key)
    calls = _record_segments(monkeypatch)
    x = torch.randn(1, 3, size, size)
    # The torch backend gathers every restricted weight.
    _check_equal(model, x, 0.6 if weight_cost == 0 else 0.9, seed=2,
                 backend='torch')
    sparse = [c for c in calls if c[0]]
    masked = [c for c in calls if c[1]]
    if weight_cost == 0:
        assert sparse and not masked
    else:
        assert masked and not sparse


def test_in_place_reads_never_choose_masks(monkeypatch):
    """A block whose convs read the open part of their weight in place
    (the compiled backend at batch 1 on small maps) has no gather to save:
    however costly weights are, computing fewer channels is cheaper."""
    if not native_available():
        pytest.skip('no C compiler: no compiled kernels')
    monkeypatch.setattr(skip_execution, 'PLAN_COSTS',
                        dict(cpu=dict(weight=1e12, call=0)))
    model, size = _backbone('basic')
    calls = _record_segments(monkeypatch)
    # 32x32: every map of the ResNet-18 has at most 64 pixels.
    _check_equal(model, torch.randn(1, 3, size, size), 0.9, seed=2,
                 backend='compiled')
    assert calls and not any(masked for _, masked in calls)


def test_backend_chosen_once(monkeypatch):
    """One backend object for all blocks of a model, chosen by
    set_gate_execution; bad names and an unbuildable compiled backend are
    refused before any block is switched."""
    model, _ = _backbone('basic')
    blocks = [m for m in model.modules() if is_gated_block(m)]
    set_gate_execution(model, 'skip', 'torch')
    backends = {id(b.skip_runner.backend) for b in blocks}
    assert len(backends) == 1
    assert blocks[0].skip_runner.backend.name == 'torch'
    set_gate_execution(model, 'skip')
    auto = 'compiled' if direct_conv_fast() else 'torch'
    assert blocks[0].skip_runner.backend.name == auto
    set_gate_execution(model, 'mask')
    with pytest.raises(ValueError,
                       match="'onednn'.*'auto', 'torch', 'compiled'"):
        set_gate_execution(model, 'skip', backend='onednn')
    monkeypatch.setattr(native, '_library', False)  # as without a compiler
    with pytest.raises(RuntimeError, match="'compiled' needs"):
        set_gate_execution(model, 'skip', backend='compiled')
    assert all(b.skip_runner is None for b in blocks)


def test_compiled_backend_other_dtypes(backend):
    """A model cast after the switch: float64 runs as the torch backend's
    (the compiled kernels are float32)."""
    model = copy.deepcopy(_backbone('basic')[0]).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    _check_equal(model, x, 0.5, backend=backend)


def test_non_relu_activation():
    """Skip execution applies plain ReLUs (fused into its convolutions); a
    block with another activation is refused with its name."""
    model, _ = _backbone('basic')
    model = copy.deepcopy(model)
    block = model.layer2[1]
    block.relu = nn.LeakyReLU(0.1)
    with pytest.raises(NotImplementedError, match='LeakyReLU'):
        set_gate_execution(model, 'skip')


def _pattern_hook(make):
    def hook(module, inputs, gates):
        return make(gates)
    return hook


@pytest.mark.parametrize('key', ['basic', 'bottleneck-both', 'pspnet-both'])
def test_structured_patterns(key, backend):
    """Patterns shared by all samples, channels closed for the whole batch,
    and repeated patterns within a batch, as learned gates produce."""
    model, size = _backbone(key)
    x = torch.randn(4, 3, size, size)
    gen = torch.Generator().manual_seed(0)

    def shared(gates):  # one pattern for the batch, not all open
        row = (torch.rand(gates.shape[1], generator=gen) < 0.5)
        return row.to(gates.dtype).expand_as(gates).clone()

    def common_closed(gates):  # a quarter open for all, a few others
        c = gates.shape[1]
        base = (torch.arange(c) % 4 == 0)
        extra = torch.rand(gates.shape, generator=gen) < 0.03
        return (base | extra).to(gates.dtype)

    def repeated(gates):  # samples 0/2 and 1/3 share patterns
        rows = torch.rand(2, gates.shape[1], generator=gen) < 0.5
        return rows[[0, 1, 0, 1]].to(gates.dtype)

    for make in (shared, common_closed, repeated):
        handles = [
            m.register_forward_hook(_pattern_hook(make))
            for m in gate_modules(model).values()
        ]
        try:
            # force_gates(None): the hooks decide; the draws of the hooks
            # differ between the two runs, so seed them alike.
            gen.manual_seed(5)
            mask_out = _run(model, x, 'mask', None)[0]
            gen.manual_seed(5)
            skip_out = _run(model, x, 'skip', None, backend=backend)[0]
        finally:
            for h in handles:
                h.remove()
        _assert_equal_outputs(mask_out, skip_out)


def test_built_with_skip_execution():
    model = build_in(mmpretrain_models,
        dict(type='GatedResNet', depth=18, gate_cfg=dict(execution='skip')))
    blocks = [m for m in model.modules() if is_gated_block(m)]
    assert blocks and all(b.gate_execution == 'skip' for b in blocks)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), force_gates(model, 0.5, seed=0):
        skip_out = model(x)
    set_gate_execution(model, 'mask')
    assert all(b.gate_execution == 'mask' for b in blocks)
    assert all(b.gate_cfg['execution'] == 'mask' for b in blocks)
    with torch.no_grad(), force_gates(model, 0.5, seed=0):
        mask_out = model(x)
    _assert_equal_outputs(mask_out, skip_out)


def test_skip_in_training_raises():
    model, size = _backbone('basic')
    set_gate_execution(model, 'skip')
    x = torch.randn(2, 3, size, size)
    model.train()
    try:
        with pytest.raises(RuntimeError, match='inference only'):
            model(x)
        # A norm left in training mode in an eval model is refused too:
        # skip uses running statistics.
        model.eval()
        model.layer1[0].norm1.train()
        with pytest.raises(RuntimeError, match='inference only'):
            model(x)
        # Training in mask mode works.
        set_gate_execution(model, 'mask')
        model.train()
        model(x).__getitem__(0).sum().backward()
    finally:
        model.eval()
        model.zero_grad()


def test_set_gate_execution_bad_value():
    model, _ = _backbone('basic')
    with pytest.raises(ValueError, match="'fast'.*'mask', 'skip'"):
        set_gate_execution(model, 'fast')
    with pytest.raises(ValueError, match='no gated block'):
        set_gate_execution(
            build_in(mmpretrain_models, dict(type='ResNet', depth=18)), 'skip')
    with pytest.raises(ValueError, match='execution'):
        build_in(mmpretrain_models,
            dict(type='GatedResNet', depth=18,
                 gate_cfg=dict(execution='sparse')))


@pytest.mark.parametrize('batch_size', [1, 2])
def test_ungated_stages_and_gradients(batch_size, backend):
    """Ungated stages run dense; skip works with autograd enabled (eval),
    where the compiled backend runs as the torch one."""
    model = build_in(mmpretrain_models,
        dict(type='GatedResNet', depth=18, gate_cfg=dict(stages=(1, 3))))
    _randomize(model)
    model.eval()
    x = torch.randn(batch_size, 3, 32, 32, requires_grad=True)
    with force_gates(model, 0.5, seed=2):
        set_gate_execution(model, 'skip', backend)
        out = model(x)[-1]
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    _check_equal(model, x.detach(), 0.5, backend=backend)


def test_plugins():
    """Plugins after a gated map would see closed channels: refused with the
    block's name; plugins elsewhere run as in mask execution."""
    context = dict(cfg=dict(type='ContextBlock', ratio=1. / 4),
                   stages=(False, True, False, False))
    # Narrow stages keep the four builds fast.
    narrow = dict(type='GatedResNet', depth=50, stem_channels=16,
                  base_channels=16)
    model = build_in(mmseg_models,
        dict(narrow,
             plugins=[dict(context, position='after_conv2')]))
    model.eval()
    with pytest.raises(NotImplementedError, match="layer2.0.*plugins"):
        set_gate_execution(model, 'skip')
    blocks = [m for m in model.modules() if is_gated_block(m)]
    assert all(b.gate_execution == 'mask' for b in blocks)

    model = build_in(mmseg_models,
        dict(narrow,
             plugins=[dict(context, position='after_conv3')]))
    _randomize(model)
    model.eval()
    _check_equal(model, torch.randn(2, 3, 32, 32), 0.5)

    model = build_in(mmseg_models,
        dict(narrow,
             plugins=[dict(context, position='after_conv1')],
             gate_cfg=dict(position='after_conv2', execution='skip')))
    _randomize(model)
    model.eval()
    _check_equal(model, torch.randn(2, 3, 32, 32), 0.5)
    # Built with execution='skip': refused when built.
    with pytest.raises(NotImplementedError, match='GatedBottleneck'):
        build_in(mmseg_models,
            dict(narrow,
                 plugins=[dict(context, position='after_conv1')],
                 gate_cfg=dict(position='after_conv1', execution='skip')))


def test_unsupported_norm():
    model = build_in(mmpretrain_models,
        dict(type='GatedResNet', depth=18,
             norm_cfg=dict(type='GN', num_groups=4)))
    with pytest.raises(NotImplementedError, match='norm1 is a GroupNorm'):
        set_gate_execution(model, 'skip')


def test_gates_unchanged_by_skip():
    """The gating modules run and record their outputs in both modes."""
    model, size = _backbone('bottleneck-both')
    x = torch.randn(2, 3, size, size)
    set_gate_execution(model, 'skip')
    with torch.no_grad():
        model(x)
    for gate in gate_modules(model).values():
        assert isinstance(gate, ChannelGate)
        assert gate.output is not None and gate.output.input_size
    set_gate_execution(model, 'mask')


def _in_both_executions(model, value, seed, run):
    """``run()`` in mask and in skip execution with the same forced gates;
    the model is left in mask execution."""
    results = {}
    for execution in ('mask', 'skip'):
        set_gate_execution(model, execution)
        with force_gates(model, value, seed=seed):
            results[execution] = run()
    set_gate_execution(model, 'mask')
    return results


def test_count_macs_in_skip_mode():
    """The MAC accounting (which traces the model) is the same in both
    executions: tracing sees the dense graph."""
    from mmgated.analysis import count_macs
    model, size = _backbone('bottleneck-after_conv2')
    x = torch.randn(2, 3, size, size)
    results = _in_both_executions(model, 0.4, 7, lambda: count_macs(model, x))
    assert results['mask']['dense'] == results['skip']['dense']
    torch.testing.assert_close(results['mask']['per_sample'],
                               results['skip']['per_sample'])
    assert results['skip']['per_sample'].max() < 0.8 * results['skip'][
        'dense']


@pytest.mark.parametrize('value', [0.0, 0.5])
def test_conv_bias(value, backend):
    """Convs with a bias: indexed with the open filters, and the whole
    output of a conv whose inputs are all closed."""
    model = build_in(mmpretrain_models, dict(type='GatedResNet', depth=18))
    gen = torch.Generator().manual_seed(3)
    for block in (m for m in model.modules() if is_gated_block(m)):
        for name in ('conv1', 'conv2'):
            conv = getattr(block, name)
            conv.bias = nn.Parameter(
                torch.rand(conv.out_channels, generator=gen) - 0.5)
    _randomize(model)
    model.eval()
    for batch_size in (1, 2):
        _check_equal(model, torch.randn(batch_size, 3, 32, 32), value,
                     backend=backend)


def test_unsupported_conv():
    model = build_in(mmpretrain_models, dict(type='GatedResNet', depth=18))
    old = model.layer3[1].conv2
    model.layer3[1].conv2 = nn.Conv2d(
        old.in_channels, old.out_channels, 3, padding=1, groups=2)
    with pytest.raises(NotImplementedError,
                       match=r"'layer3.1'.*conv2 has groups=2"):
        set_gate_execution(model, 'skip')

    class WeightStandardized(nn.Conv2d):
        pass

    model.layer3[1].conv2 = WeightStandardized(old.in_channels,
                                               old.out_channels, 3)
    with pytest.raises(NotImplementedError, match='WeightStandardized'):
        set_gate_execution(model, 'skip')


def test_cached_weights_follow_updates(backend):
    """Skip execution keeps BN-folded weights; they must follow in-place
    updates (optimizer steps, load_state_dict) and be dropped when
    switching back to mask execution."""
    reference = build_in(mmpretrain_models, dict(type='GatedResNet', depth=18))
    _randomize(reference)
    reference.eval()
    # Two models, so that the one in skip mode never switches (a switch
    # drops the caches, which would hide a stale one).
    fast = copy.deepcopy(reference)
    set_gate_execution(fast, 'skip', backend)
    inputs = (torch.randn(1, 3, 32, 32), torch.randn(2, 3, 64, 64))

    def compare(value=0.6):
        for x in inputs:
            with torch.no_grad():
                with force_gates(reference, value, seed=1):
                    expected = reference(x)
                with force_gates(fast, value, seed=1):
                    actual = fast(x)
            _assert_equal_outputs(expected, actual)

    # All closed (a conv of no inputs is its bias, which the block's
    # shortcut and ReLU must not change in the cache), twice.
    compare(0.0)
    compare(0.0)
    compare()
    for model in (reference, fast):
        with torch.no_grad():
            for block in (m for m in model.modules() if is_gated_block(m)):
                block.conv2.weight.mul_(-0.5)
                block.norm1.running_var.add_(1.0)
                block.norm1.bias.sub_(0.25)
    compare()
    state = {k: v * 1.5 if k.endswith(('conv2.weight', 'bn1.weight')) else v
             for k, v in reference.state_dict().items()}
    for model in (reference, fast):
        model.load_state_dict(state)
    compare()
    assert any('_skip_folded' in m.__dict__ for m in fast.modules())
    set_gate_execution(fast, 'mask')
    assert not any('_skip_folded' in m.__dict__ for m in fast.modules())
