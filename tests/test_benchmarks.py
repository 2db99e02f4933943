"""The benchmark scripts: what they force, count and report (no timing
assertions; tiny inputs, one repeat)."""
import importlib.util
import os.path as osp

import pytest
import torch

from mmgated.models import ChannelGate

pytest.importorskip('mmpretrain')

BENCHMARKS = osp.join(osp.dirname(osp.dirname(__file__)), 'benchmarks')


def _load(name):
    spec = importlib.util.spec_from_file_location(
        name, osp.join(BENCHMARKS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gated_inference = _load('gated_inference')
train_overhead = _load('train_overhead')
gathered_conv = _load('gathered_conv')


@pytest.fixture(autouse=True)
def _restore_threads():
    # The scripts' main() sets the thread count of the whole process.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('density', [0.0, 0.25, 0.5, 0.7, 1.0])
def test_exact_gates(density):
    gates = gated_inference.exact_gates((5, 37), density,
                                        torch.Generator().manual_seed(0))
    assert set(gates.unique().tolist()) <= {0.0, 1.0}
    assert gates.sum(1).tolist() == [round(density * 37)] * 5
    # Random places: the rows differ, and the same seed draws the same.
    if 0 < density < 1:
        assert len({tuple(row.tolist()) for row in gates}) > 1
    again = gated_inference.exact_gates((5, 37), density,
                                        torch.Generator().manual_seed(0))
    assert torch.equal(gates, again)


def _small_gated():
    args = gated_inference.parse_args(
        ['--models', 'resnet34', '--size', '32'])
    return gated_inference.build_pair('resnet34', args)[1]


@pytest.mark.parametrize('pattern', ['independent', 'exact'])
def test_gate_control_patterns_and_given_gates(pattern, monkeypatch):
    from mmgated.models import collect_gates, set_gate_execution
    gated = _small_gated()
    set_gate_execution(gated, 'skip')
    control = gated_inference.GateControl(gated, pattern)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        forced = control.call(x, 0.5, 3)()
        outputs = collect_gates(gated)
        again = control.call(x, 0.5, 3)()
    torch.testing.assert_close(forced, again)  # seeded: the same pattern
    counts = [o.gates.sum(1) for o in outputs.values()]
    widths = [o.gates.shape[1] for o in outputs.values()]
    if pattern == 'exact':
        for count, width in zip(counts, widths):
            assert count.tolist() == [width // 2] * 2
    else:
        assert any(c.tolist() != [w // 2] * 2
                   for c, w in zip(counts, widths))
    # Given gates: the gating modules do not run, the pattern is the same.
    given = control.record(x, 0.5, 3)

    def fail(self, x):
        raise AssertionError('a gating module ran with given gates')

    monkeypatch.setattr(ChannelGate, 'forward', fail)
    with torch.no_grad():
        out = control.call(x, None, None, given=given)()
    torch.testing.assert_close(out, forced)
    # A plain call afterwards runs the gating modules again.
    with pytest.raises(AssertionError, match='gating module ran'):
        with torch.no_grad():
            control.call(x, 0.5, 3)()


def test_gated_inference_rows(tmp_path):
    out = tmp_path / 'bench.json'
    rows = gated_inference.main([
        '--models', 'resnet34', '--batch-sizes', '1', '--size', '32',
        '--repeats', '1', '--warmup', '0', '--densities', '1.0', '0.5',
        '--threads', '1', '--pattern', 'exact', '--given-gates', '--out',
        str(out)
    ])
    assert out.exists()
    full, half = rows
    # Gating modules add a little to the dense MACs at 100 %; exactly half
    # of every gated map open leaves the stem and shortcuts dense.
    assert 1.0 < full['mac_ratio'] < 1.01
    assert 0.5 < half['mac_ratio'] < 0.55
    for row in rows:
        assert row['pattern'] == 'exact'
        assert row['realized'] == pytest.approx(row['speedup'] *
                                                row['mac_ratio'])
        assert row['given_realized'] == pytest.approx(
            row['dense_ms'] / row['given_ms'] * row['mac_ratio'])
    for row in rows:
        # One round: the paired median is that round's ratio, with no
        # interval.
        assert row['paired_realized'] == pytest.approx(row['realized'])
        assert row['paired_skip_vs_dense'] == pytest.approx(
            row['skip_vs_dense'])
        assert row['paired_realized_low'] is None
    table = gated_inference.markdown(rows)
    assert 'realized, given gates' in table
    assert len(table.splitlines()) == 2 + len(rows)
    assert gated_inference.target_verdicts(rows) == [
        'skip <= 1.05x dense at 100 % (resnet34, 32x32, cpu, batch 1): '
        'undecided',
        'realized ratio >= 0.8 at 50 % (resnet34, 32x32, cpu, batch 1): '
        'undecided'
    ]


def test_gated_inference_target_verdicts():
    """The realized-ratio target is judged by its paired interval."""
    rows = [dict(model='resnet34', size=224, device='cpu', batch=1,
                 gates='50%', paired_realized=0.83,
                 paired_realized_low=low, paired_realized_high=high)
            for low, high in ((0.81, 0.85), (0.78, 0.82), (0.70, 0.79))]
    assert [v.split(': ')[1] for v in gated_inference.target_verdicts(rows)
            ] == ['met', 'undecided', 'not met']


def test_other_ways(monkeypatch):
    """--weight-bound, --no-direct and --uncompiled time skip execution
    with parts of the library swapped or switched off, and put the library
    back as it was after each call."""
    from mmgated.models import skip_execution
    native = importlib.import_module('mmgated.ops.native')
    original_direct = skip_execution._Plan.direct
    # (the gathered product used, compiled operations on, direct convs on)
    products = []
    original_product = skip_execution._Plan._gathered_product

    def product(plan, j, h, *args):
        products.append((skip_execution.gathered_gemm.__name__,
                         native._library is not False,
                         type(plan).direct is original_direct))
        return original_product(plan, j, h, *args)

    monkeypatch.setattr(skip_execution._Plan, '_gathered_product', product)
    # Whether _Plan.direct was switched off when a layer ran, and when
    # gathered_conv2d ran.
    layers, direct_convs = [], []
    original_layer = skip_execution._Plan.sparse_layer
    original_conv = skip_execution.gathered_conv2d_unchecked

    def sparse_layer(plan, *args):
        layers.append(type(plan).direct is not original_direct)
        return original_layer(plan, *args)

    def conv(*args, **kwargs):
        direct_convs.append(skip_execution._Plan.direct is not
                            original_direct)
        return original_conv(*args, **kwargs)

    monkeypatch.setattr(skip_execution._Plan, 'sparse_layer', sparse_layer)
    monkeypatch.setattr(skip_execution, 'gathered_conv2d_unchecked', conv)
    compiled_gates = []
    original_record = ChannelGate._record

    def record(gate, logits, probs, relaxed, gates):
        compiled_gates.append(native._library is not False)
        return original_record(gate, logits, probs, relaxed, gates)

    monkeypatch.setattr(ChannelGate, '_record', record)
    rows = gated_inference.main([
        '--models', 'resnet34', '--batch-sizes', '1', '--size', '32',
        '--repeats', '1', '--warmup', '0', '--densities', '0.5',
        '--threads', '1', '--weight-bound', 'pytorch', 'onednn',
        '--no-direct', '--uncompiled'
    ])
    # --uncompiled runs its gating modules with the library switched off,
    # and switches it back on.
    assert False in compiled_gates and native._library is not False
    # 'pytorch' swaps the product of the strided small convs, as many calls
    # as with the compiled one; without direct convs and uncompiled (with
    # the compiled product's fallback inside), the small stride-1 convs run
    # as the product too.
    compiled = products.count(('gathered_gemm', True, True))
    assert compiled > 0 and products.count(
        ('gathered_gemm_reference', True, True)) == compiled
    assert products.count(('gathered_gemm', True, False)) > compiled
    assert products.count(('gathered_gemm', False, True)) > compiled
    # --no-direct ran layers without ever reaching gathered_conv2d.
    assert True in layers and direct_convs and True not in direct_convs
    assert skip_execution.gathered_gemm.__name__ == 'gathered_gemm'
    assert skip_execution.WEIGHT_BOUND_PIXELS == 64
    assert skip_execution._Plan.direct is original_direct
    row, = rows
    for way in ('pytorch', 'onednn', 'no_direct', 'uncompiled'):
        assert row[f'{way}_ms'] > 0
    table = gated_inference.markdown(rows)
    assert ('weight-bound by pytorch ms | skip, weight-bound by onednn ms '
            '| skip, no direct convs ms | skip, uncompiled ms |') in table
    assert len(table.splitlines()[1].split('|')) == len(
        table.splitlines()[2].split('|'))


def test_gathered_conv_rows(monkeypatch):
    """benchmarks/gathered_conv.py times each ResNet-34 stage's conv three
    ways, output- and input-gated, and refuses to run without the compiled
    operations (there would be nothing to compare)."""
    from mmgated.ops import native_available
    if not native_available():
        pytest.skip('no C compiler')
    rows = gathered_conv.main(
        ['--fractions', '0.5', '--repeats', '1', '--copies', '1',
         '--threads', '1'])
    assert [(r['channels'], r['gated']) for r in rows] == [
        (c, g) for c, _ in gathered_conv.STAGES for g in ('output', 'input')]
    for r in rows:
        assert r['open'] == r['channels'] // 2
        assert min(r['dense_ms'], r['gathered_ms'], r['direct_ms']) > 0
        assert r['direct_vs_dense'] == pytest.approx(r['direct_ms'] /
                                                     r['dense_ms'])
    assert len(gathered_conv.markdown(rows).splitlines()) == 2 + len(rows)
    monkeypatch.setattr(importlib.import_module('mmgated.ops.native'),
                        '_library', False)
    with pytest.raises(SystemExit, match='not available'):
        gathered_conv.main(['--repeats', '1'])


def test_train_overhead_row():
    args = train_overhead.parse_args([
        '--depths', '18', '--size', '32', '--batch-size', '2', '--repeats',
        '1', '--warmup', '0', '--threads', '1'
    ])
    torch.set_num_threads(1)
    row = train_overhead.benchmark(18, args, torch.device('cpu'))
    assert row['overhead'] == pytest.approx(row['gated_ms'] / row['dense_ms'])
    assert 0 < row['gate_loss_ms'] < row['gated_ms']
    assert row['gate_loss_backward_ms'] > 0
    assert 0 < row['gated_forward_ms'] < row['gated_ms']
    assert 0 < row['dense_forward_ms'] < row['dense_ms']
    assert row['forward_overhead'] == pytest.approx(
        row['gated_forward_ms'] / row['dense_forward_ms'])
    assert row['backward_overhead'] > 0
    # One round: the paired medians are that round's ratios, undecided.
    assert row['paired_overhead'] == pytest.approx(row['overhead'])
    assert row['paired_loss_share'] == pytest.approx(
        row['gate_loss_fwd_bwd_share'])
    assert row['overhead_target'] == row['loss_share_target'] == 'undecided'
    assert row['dense_faults'] >= 0 and row['gated_faults'] >= 0
    lines = train_overhead.markdown([row]).splitlines()
    assert len(lines) == 3
    assert {line.count('|') for line in lines} == {19}


def test_train_overhead_unfused():
    """``--unfused`` times the earlier rounds' gated step in the same run,
    and leaves the library as it was."""
    import mmgated.models.blocks as blocks
    import mmgated.models.gates as gates
    from mmgated.models import collect_gates
    from mmgated.models.backbones.mmpretrain_resnet import GatedResNet
    fused_functions = (gates.fused_training_gate,
                       blocks.batch_norm_gated_relu)
    model = GatedResNet(depth=18).train()
    x = torch.randn(2, 3, 32, 32)
    with train_overhead.unfused():
        model(x)
        names = {type(o.logits.grad_fn).__name__
                 for o in collect_gates(model).values()}
    assert names == {'AddmmBackward0'}
    assert (gates.fused_training_gate,
            blocks.batch_norm_gated_relu) == fused_functions
    model(x)
    names = {o.logits.grad_fn.name() for o in collect_gates(model).values()}
    assert names == {fused_gate_node()}

    args = train_overhead.parse_args([
        '--depths', '18', '--size', '32', '--batch-size', '2', '--repeats',
        '1', '--warmup', '0', '--threads', '1', '--unfused'
    ])
    torch.set_num_threads(1)
    row = train_overhead.benchmark(18, args, torch.device('cpu'))
    assert row['unfused_overhead'] == pytest.approx(row['unfused_ms'] /
                                                    row['dense_ms'])
    assert row['unfused_forward_overhead'] > 0
    # One round: the paired ratio is that round's.
    assert row['gated_vs_unfused'] == pytest.approx(row['gated_ms'] /
                                                    row['unfused_ms'])
    lines = train_overhead.markdown([row]).splitlines()
    assert {line.count('|') for line in lines} == {23}


def fused_gate_node():
    """The autograd node of a fused training gate here: C++ where the
    extension builds."""
    from mmgated.ops.training_nodes import training_nodes
    return ('torch::autograd::CppNode<mmgated::TrainingGate>'
            if training_nodes() is not None else '_TrainingGateBackward')


def test_train_overhead_python_nodes():
    """``--python-nodes`` times the gated step with the Python autograd
    Functions in the same run, and leaves the C++ nodes in place."""
    from mmgated.models import collect_gates
    from mmgated.models.backbones.mmpretrain_resnet import GatedResNet
    from mmgated.ops import training_nodes as nodes
    before = nodes._extension
    model = GatedResNet(depth=18).train()
    x = torch.randn(2, 3, 32, 32)
    with train_overhead.python_nodes():
        model(x)
        names = {o.logits.grad_fn.name()
                 for o in collect_gates(model).values()}
    assert names == {'_TrainingGateBackward'}
    assert nodes._extension is before

    args = train_overhead.parse_args([
        '--depths', '18', '--size', '32', '--batch-size', '2', '--repeats',
        '2', '--warmup', '0', '--threads', '1', '--python-nodes', '--unfused'
    ])
    torch.set_num_threads(1)
    row = train_overhead.benchmark(18, args, torch.device('cpu'))
    assert len(row['python_nodes_all_ms']) == 2
    assert row['python_nodes_overhead'] == pytest.approx(
        row['python_nodes_ms'] / row['dense_ms'])
    low, high = row['gated_vs_python_nodes_low'], \
        row['gated_vs_python_nodes_high']
    assert low is None and high is None  # two rounds decide nothing
    lines = train_overhead.markdown([row]).splitlines()
    assert 'paired gated/unfused' in lines[0]
    assert lines[0].index('unfused') < lines[0].index('python_nodes')
    assert {line.count('|') for line in lines} == {27}


def test_train_overhead_separate_norm():
    """``--separate-norm`` times the gated step with PyTorch's batch norm
    and the gated ReLU as two nodes in the same run, and leaves the
    library's one node in place."""
    import mmgated.models.blocks as blocks
    from mmgated.models.backbones.mmpretrain_resnet import GatedResNet
    from mmgated.ops.native import native_available
    if not native_available():
        pytest.skip('no C compiler: no batch-norm gated ReLU node')
    fused = blocks.batch_norm_gated_relu
    model = GatedResNet(depth=18).train()
    activations = []
    model.layer1[0].conv2.register_forward_pre_hook(
        lambda module, inputs: activations.append(inputs[0].grad_fn.name()))
    x = torch.randn(2, 3, 32, 32)
    with train_overhead.separate_norm():
        model(x)
    model(x)
    assert blocks.batch_norm_gated_relu is fused
    assert 'BatchNorm' not in activations[0]  # the gated ReLU's node
    assert 'BatchNormGatedReLU' in activations[1]

    args = train_overhead.parse_args([
        '--depths', '18', '--size', '32', '--batch-size', '2', '--repeats',
        '1', '--warmup', '0', '--threads', '1', '--separate-norm'
    ])
    torch.set_num_threads(1)
    row = train_overhead.benchmark(18, args, torch.device('cpu'))
    assert row['gated_vs_separate_norm'] == pytest.approx(
        row['gated_ms'] / row['separate_norm_ms'])
    lines = train_overhead.markdown([row]).splitlines()
    assert 'paired gated/separate_norm' in lines[0]


def test_train_overhead_norms_only(tmp_path):
    """``--norms-only`` times the gated maps' norm and activation three
    ways on the maps of one forward (one per basic block)."""
    out = tmp_path / 'norms.json'
    rows = train_overhead.main([
        '--depths', '18', '--size', '32', '--batch-size', '2', '--repeats',
        '3', '--warmup', '1', '--threads', '1', '--norms-only', '--out',
        str(out)
    ])
    (row, ) = rows
    assert row['gates'] == 8
    assert min(row['fused_ms'], row['separate_ms'], row['dense_ms']) > 0
    assert row['fused_vs_dense_low'] is None  # three rounds decide nothing
    assert 0 < row['fused_vs_separate'] < 10
    lines = train_overhead.norms_markdown(rows).splitlines()
    assert len(lines) == 3
    assert lines[2].startswith('| resnet18 | 32x32 | 2 | 8 | cpu |')
    assert {line.count('|') for line in lines} == {11}
    with pytest.raises(SystemExit, match='choose one'):
        train_overhead.parse_args(['--norms-only', '--gates-only'])


def test_train_overhead_losses_only(tmp_path):
    out = tmp_path / 'losses.json'
    rows = train_overhead.main([
        '--depths', '18', '--size', '32', '--batch-size', '2', '--repeats',
        '2', '--warmup', '1', '--threads', '1', '--losses-only', '--out',
        str(out)
    ])
    (row, ) = rows
    assert row['gates'] == 2 * (64 + 128 + 256 + 512)  # one per block
    assert row['gate_losses_ms'] > 0 and row['batch_shaping_fwd_bwd_ms'] > 0
    lines = train_overhead.losses_markdown(rows).splitlines()
    assert len(lines) == 3 and lines[2].startswith('| resnet18 | 2 | 1920 |')
    assert out.exists()


def test_train_overhead_gates_only(monkeypatch):
    """``--gates-only`` times every gating module's forward and backward on
    the input it had in the model (a module that saw another shape fails
    here)."""
    from mmgated.models.gates import ChannelGate
    seen = []
    forward = ChannelGate.forward

    def recording_forward(gate, x):
        seen.append((gate.in_channels, x.shape[1], x.is_leaf))
        return forward(gate, x)

    monkeypatch.setattr(ChannelGate, 'forward', recording_forward)
    rows = train_overhead.main([
        '--depths', '18', '--size', '32', '--batch-size', '2', '--repeats',
        '2', '--warmup', '1', '--threads', '1', '--gates-only'
    ])
    (row, ) = rows
    assert row['gates'] == 8  # one per basic block
    assert row['gates_forward_ms'] > 0 and row['gates_backward_ms'] > 0
    timed = [s for s in seen if s[2]]  # the leaves made for the timing
    assert len(timed) == 8 * 3 and all(c == x for c, x, _ in timed)
    lines = train_overhead.gates_markdown(rows).splitlines()
    assert len(lines) == 3 and lines[2].startswith('| resnet18 | 2 | 8 |')
    with pytest.raises(SystemExit, match='choose one'):
        train_overhead.parse_args(['--gates-only', '--losses-only'])


def test_gated_inference_learned_gates_from_checkpoint(tmp_path):
    """``--checkpoint``: a classifier checkpoint's backbone weights and gate
    layout are loaded, and its learned gates are timed as one more row."""
    from mmpretrain.registry import MODELS
    import mmgated  # noqa: F401
    torch.manual_seed(0)
    backbone = MODELS.build(
        dict(type='GatedResNet', depth=34, gate_cfg=dict(stages=(2, 3))))
    backbone.init_weights()
    with torch.no_grad():  # some gates learned closed
        backbone.layer3[0].gate.fc2.bias[:100] = -5.0
    state = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
    path = tmp_path / 'epoch_1.pth'
    torch.save(dict(state_dict=state, meta=dict()), path)
    rows = gated_inference.main([
        '--models', 'resnet34', '--batch-sizes', '1', '--size', '32',
        '--repeats', '1', '--warmup', '0', '--densities', '1.0', '--threads',
        '1', '--checkpoint', str(path), '--given-gates'
    ])
    assert [r['gates'] for r in rows] == ['100%', 'learned']
    learned = rows[1]
    assert learned['pattern'] is None
    # Only stages 3 and 4 are gated, and some of their gates are closed.
    assert 0.5 < learned['mac_ratio'] < 1.0
    assert learned['given_ms'] > 0


def test_gated_inference_checkpoint_without_gates(tmp_path):
    path = tmp_path / 'dense.pth'
    torch.save(dict(state_dict={'backbone.conv1.weight': torch.zeros(1)}),
               path)
    with pytest.raises(SystemExit, match='no gate weights'):
        gated_inference.main([
            '--models', 'resnet34', '--size', '32', '--checkpoint',
            str(path)
        ])


def test_train_overhead_recipe_optimizer():
    """``--optimizer recipe`` steps each model with the recipe's optimizer:
    merged groups for the gated model, one group per parameter for
    ``--per-param-groups``, the baseline's single group for the dense."""
    args = train_overhead.parse_args([
        '--depths', '18', '--size', '32', '--batch-size', '2', '--repeats',
        '1', '--warmup', '0', '--threads', '1', '--optimizer', 'recipe',
        '--per-param-groups'
    ])
    dense, gated = train_overhead.build_models(18, torch.device('cpu'), 0)
    groups = {
        name: train_overhead.build_optimizer(model, name, args.optimizer,
                                             18).param_groups
        for name, model in (('dense', dense), ('gated', gated),
                            ('per_param_groups', gated))
    }
    assert len(groups['dense']) == 1
    assert len(groups['gated']) == 2
    assert len(groups['per_param_groups']) == len(list(gated.parameters()))
    assert groups['gated'][0]['lr'] == groups['dense'][0]['lr'] == 0.1
    gate_decay = {
        id(p): group['weight_decay']
        for group in groups['gated'] for p in group['params']
    }
    for name, param in gated.named_parameters():
        assert gate_decay[id(param)] == (0.0 if '.gate' in name else 1e-4)

    torch.set_num_threads(1)
    row = train_overhead.benchmark(18, args, torch.device('cpu'))
    assert row['optimizer'] == 'recipe'
    assert row['gated_vs_per_param_groups'] == pytest.approx(
        row['gated_ms'] / row['per_param_groups_ms'])
    with pytest.raises(SystemExit, match='--optimizer recipe'):
        train_overhead.parse_args(['--per-param-groups'])


def test_train_overhead_optimizer_only():
    args = train_overhead.parse_args([
        '--depths', '18', '--repeats', '3', '--warmup', '0', '--threads', '1',
        '--optimizer-only'
    ])
    torch.set_num_threads(1)
    row = train_overhead.optimizer_benchmark(18, args, torch.device('cpu'))
    params = row['params']
    assert params['gated'] == params['per_param_groups'] > params['dense']
    assert row['groups'] == dict(
        dense=1, gated=2, per_param_groups=params['gated'])
    assert min(row['dense_ms'], row['gated_ms'],
               row['per_param_groups_ms']) > 0
    lines = train_overhead.optimizer_markdown([row]).splitlines()
    assert len(lines) == 3
    assert {line.count('|') for line in lines} == {11}
    with pytest.raises(SystemExit, match='choose one'):
        train_overhead.parse_args(['--optimizer-only', '--losses-only'])


def test_keep_heap_sets_glibc_thresholds(monkeypatch):
    """--keep-heap fixes glibc's mmap threshold (M_MMAP_THRESHOLD, -3) at
    64 MiB and its trim threshold (M_TRIM_THRESHOLD, -1) at 1 GiB, and
    stops the run where mallopt is missing or refuses. (Whether a freed
    block is then reused without page faults depends on the heap's layout
    in the process, which differs from run to run; the benchmark's fault
    counts show the effect, docs/benchmarks.md.)"""
    import ctypes
    calls = []

    class FakeLibc:

        def __init__(self, result):
            self.result = result

        def mallopt(self, option, value):
            calls.append((option, value))
            return self.result

    monkeypatch.setattr(ctypes, 'CDLL', lambda name: FakeLibc(1))
    train_overhead.keep_heap()
    assert calls == [(-3, 64 << 20), (-1, 1 << 30)]

    monkeypatch.setattr(ctypes, 'CDLL', lambda name: FakeLibc(0))
    with pytest.raises(SystemExit, match=r'mallopt\(-3, 67108864\) failed'):
        train_overhead.keep_heap()

    monkeypatch.setattr(ctypes, 'CDLL', lambda name: object())
    with pytest.raises(SystemExit, match="needs glibc's mallopt"):
        train_overhead.keep_heap()


def test_keep_heap_runs_in_this_c_library():
    """The real mallopt accepts both settings (in a child process: they
    stay the process's for good)."""
    import subprocess
    import sys
    subprocess.run([
        sys.executable, '-c',
        f'import sys; sys.path.insert(0, {BENCHMARKS!r}); '
        'import train_overhead; train_overhead.keep_heap()'
    ], check=True)
