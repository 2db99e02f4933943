"""The benchmark scripts: what they force, count and report (no timing
assertions; tiny inputs, one repeat)."""
import importlib

import pytest
import torch

from data_utils import load_script
from mmgated.models import ChannelGate

pytest.importorskip('mmpretrain')



gated_inference = load_script('benchmarks/gated_inference.py')
train_overhead = load_script('benchmarks/train_overhead.py')
gathered_conv = load_script('benchmarks/gathered_conv.py')


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

    def fail(self, x, fold_norm=False):
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


def test_other_backends():
    """--backend picks skip execution's backend and --other-backends times
    copies with others side by side (each equal to mask execution, see
    tests/test_skip_execution.py)."""
    from mmgated.ops import native_available
    if not native_available():
        pytest.skip('no C compiler: no compiled backend')
    rows = gated_inference.main([
        '--models', 'resnet34', '--batch-sizes', '1', '--size', '32',
        '--repeats', '1', '--warmup', '0', '--densities', '0.5',
        '--threads', '1', '--backend', 'torch', '--other-backends',
        'compiled'
    ])
    row, = rows
    assert row['backend'] == 'torch'
    assert row['skip_ms'] > 0 and row['skip_compiled_ms'] > 0
    table = gated_inference.markdown(rows)
    assert '| skip, compiled backend ms |' in table
    assert len(table.splitlines()[1].split('|')) == len(
        table.splitlines()[2].split('|'))
    with pytest.raises(SystemExit):
        gated_inference.parse_args(['--backend', 'onednn'])


def test_gathered_conv_rows(monkeypatch):
    """benchmarks/gathered_conv.py times each ResNet-34 stage's conv three
    ways, output- and input-gated, and refuses the compiled backend where
    its kernels do not build."""
    from mmgated.ops import native_available
    backends = ['torch'] + ['compiled'] * native_available()
    for backend in backends:
        rows = gathered_conv.main(
            ['--fractions', '0.5', '--repeats', '1', '--copies', '1',
             '--threads', '1', '--backend', backend])
        assert [(r['channels'], r['gated']) for r in rows] == [
            (c, g) for c, _ in gathered_conv.STAGES
            for g in ('output', 'input')]
        for r in rows:
            assert r['open'] == r['channels'] // 2
            assert r['backend'] == backend
            assert min(r['dense_ms'], r['gathered_ms'], r['backend_ms']) > 0
            assert r['backend_vs_dense'] == pytest.approx(r['backend_ms'] /
                                                          r['dense_ms'])
        assert len(gathered_conv.markdown(rows).splitlines()) == 2 + len(
            rows)
    monkeypatch.setattr(importlib.import_module('mmgated.ops.native'),
                        '_library', False)
    with pytest.raises(SystemExit, match="'compiled' needs"):
        gathered_conv.main(['--repeats', '1'])


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


# benchmarks/train_overhead.py


def test_train_overhead_eager_run(tmp_path, capsys):
    """A tiny eager run prints the table and the verdicts, and writes the
    timings and ratios (2 rounds: no interval, every target undecided)."""
    import json
    out = tmp_path / 'train.json'
    results = train_overhead.main([
        '--depths', '18', '--size', '32', '--batch-size', '2', '--rounds',
        '2', '--warmup', '1', '--threads', '1', '--no-compile', '--out',
        str(out)
    ])
    printed = capsys.readouterr().out
    assert f'torch {torch.__version__}, 1 threads' in printed.splitlines()[0]
    table = [line for line in printed.splitlines() if line.startswith('|')]
    assert table[0] == '| | resnet18 |'
    assert [line.split(' | ')[0] for line in table[2:]] == [
        '| dense, ms', '| gated, ms', '| gate losses, ms',
        '| gated/dense, eager', '| gate losses / gated step, %'
    ]
    assert printed.splitlines()[-2:] == [
        '* resnet18: gated/dense, eager <= 1.1: undecided '
        f"({results[0]['ratios']['eager_gated_vs_dense']['median']:.3f})",
        '* resnet18: gate losses / gated step <= 1 %: undecided '
        f"({100 * results[0]['ratios']['gate_loss_share']['median']:.2f} %)"
    ]
    saved = json.loads(out.read_text())
    result, = saved['results']
    times = result['times_s']
    assert set(times) == {'dense', 'gated', 'gate_losses'}
    assert all(len(t) == 2 for t in times.values())
    assert len(result['warmup_s']['gated']) == 1
    assert result['dynamo'] == {} and result['recompiled_in_rounds'] == 0
    ratios = result['ratios']
    assert set(ratios) == {'eager_gated_vs_dense', 'gate_loss_share'}
    assert ratios['eager_gated_vs_dense']['median'] == pytest.approx(
        sum(g / d for g, d in zip(times['gated'], times['dense'])) / 2)
    assert 0 < ratios['gate_loss_share']['median'] < 1
    assert ratios['gate_loss_share']['low'] is None
    assert [v['verdict'] for v in saved['verdicts']] == ['undecided'] * 2
    assert saved['environment']['threads'] == 1


def test_train_overhead_models():
    """The recipe's models and optimizer wrappers: the same weights where
    they share them, both gate losses on, merged groups for the gated
    model; the compiled ones are copies whose train_step is compiled."""
    models = train_overhead.build_models(18, compile_cfg=dict(
        backend='eager'))
    assert list(models) == list(train_overhead.MODELS)
    dense, gated = models['dense'][0], models['gated'][0]
    assert type(dense).__name__ == 'ImageClassifier'
    assert type(gated.backbone).__name__ == 'GatedResNet'
    assert gated.batch_shaping_loss.loss_weight == 0.75
    assert gated.l0_loss.loss_weight == train_overhead.L0_WEIGHT > 0
    gated_state = gated.state_dict()
    for name, value in dense.state_dict().items():
        assert torch.equal(gated_state[name], value)
    groups = {name: wrapper.optimizer.param_groups
              for name, (_, wrapper) in models.items()}
    assert len(groups['dense']) == len(groups['dense_compiled']) == 1
    assert len(groups['gated']) == len(groups['gated_compiled']) == 2
    assert {g['momentum'] for gs in groups.values() for g in gs} == {0.9}
    decay = {id(p): g['weight_decay'] for g in groups['gated']
             for p in g['params']}
    for name, param in gated.named_parameters():
        assert decay[id(param)] == (0.0 if '.gate' in name else 1e-4)
    for name in ('dense', 'gated'):
        compiled = models[f'{name}_compiled'][0]
        assert 'train_step' in vars(compiled)  # the Runner's setattr
        assert 'train_step' not in vars(models[name][0])
        assert not any(p is q for p, q in zip(compiled.parameters(),
                                              models[name][0].parameters()))


def test_train_overhead_compiled_step():
    """The compiled path on a tiny model: train_step compiled as the Runner
    does, stepped by time_rounds, trains the model (the benchmark's own
    compile takes minutes here)."""
    from mmengine.model import BaseModel
    from mmengine.optim import build_optim_wrapper

    class Tiny(BaseModel):

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 1)

        def forward(self, inputs, data_samples=None, mode='loss'):
            return dict(loss=self.fc(inputs).square().mean())

    torch.manual_seed(0)
    model = train_overhead.compile_train_step(Tiny(), {})
    wrapper = build_optim_wrapper(
        model, dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)))
    before = model.fc.weight.detach().clone()
    steps = train_overhead.make_steps(
        {'tiny_compiled': (model, wrapper)},
        dict(inputs=torch.randn(8, 4), data_samples=None))
    assert model.train_step._torchdynamo_orig_callable.__func__ is \
        BaseModel.train_step
    warm, compiled = train_overhead.warm_up(steps, 2)
    times = train_overhead.time_rounds(steps, rounds=2)
    assert len(times['tiny_compiled']) == len(warm['tiny_compiled']) == 2
    assert compiled['tiny_compiled']['graphs'] >= 1
    assert not torch.equal(model.fc.weight, before)


def test_train_overhead_time_rounds_shuffles():
    calls = []

    def step(name):
        def run():
            calls.append(name)
            return {name: len(calls)}
        return run

    steps = {name: step(name) for name in 'abcd'}
    warm, compiled = train_overhead.warm_up(steps, 1)
    times = train_overhead.time_rounds(steps, rounds=6)
    assert calls[:4] == list('abcd')  # the warm-up, in order
    rounds = [calls[i:i + 4] for i in range(4, len(calls), 4)]
    assert all(sorted(r) == list('abcd') for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1
    assert warm == {name: [i + 1] for i, name in enumerate('abcd')}
    assert compiled['a'] == dict(graphs=0, graph_breaks=0)
    assert {k: len(v) for k, v in times.items()} == dict.fromkeys('abcd', 6)


def test_train_overhead_ratios_and_verdicts():
    """Paired ratios, their intervals and verdicts on known numbers."""
    rounds = 9  # at 95 %: the interval is the 2nd to the 8th value
    times = dict(
        dense=[1.0] * rounds,
        gated=[1.0 + i / 100 for i in range(rounds)],  # 1.00 .. 1.08
        gate_losses=[0.0102] * rounds,
        dense_compiled=[0.5] * rounds,
        gated_compiled=[0.5 * 1.06] * rounds)
    ratios = train_overhead.summarize(times)
    eager = ratios['eager_gated_vs_dense']
    assert eager['median'] == pytest.approx(1.04)
    assert (eager['low'], eager['high']) == pytest.approx((1.01, 1.07))
    assert ratios['gated_compiled_vs_eager']['high'] == pytest.approx(
        0.53 / 1.01)
    assert ratios['dense_compiled_vs_eager']['median'] == 0.5
    share = ratios['gate_loss_share']
    assert (share['low'], share['high']) == pytest.approx((0.0102 / 1.07,
                                                          0.0102 / 1.01))
    results = [dict(model='resnet18', ratios=ratios, median_ms={},
                    compile_s={})]
    verdicts = train_overhead.target_verdicts(results)
    assert [(v['ratio'], v['verdict']) for v in verdicts] == [
        ('eager_gated_vs_dense', 'met'),
        ('compiled_gated_vs_dense', 'not met'),
        ('gate_loss_share', 'undecided'),
    ]
    assert [train_overhead.verdict_line(v) for v in verdicts] == [
        'resnet18: gated/dense, eager <= 1.1: met (1.040 [1.010, 1.070])',
        'resnet18: gated/dense, compiled <= 1.05: not met '
        '(1.060 [1.060, 1.060])',
        'resnet18: gate losses / gated step <= 1 %: undecided '
        '(0.98 [0.95, 1.01] %)',
    ]
    # Without compiled timings, no compiled ratios and no verdict on them.
    eager_only = train_overhead.summarize(
        {k: v for k, v in times.items() if 'compiled' not in k})
    assert set(eager_only) == {'eager_gated_vs_dense', 'gate_loss_share'}


def test_train_overhead_markdown():
    ratio = dict(median=1.062, low=1.051, high=1.07)
    results = [
        dict(model=f'resnet{d}',
             median_ms=dict(dense=100.0, gated=106.2, dense_compiled=80.0,
                            gated_compiled=82.0, gate_losses=0.5),
             compile_s=dict(dense_compiled=60.2, gated_compiled=95.0),
             dynamo=dict(dense_compiled=dict(graphs=3, graph_breaks=2),
                         gated_compiled=dict(graphs=5, graph_breaks=4)),
             ratios={key: ratio for key, *_ in train_overhead.RATIOS})
        for d in (18, 34)
    ]
    lines = train_overhead.markdown(results).splitlines()
    assert lines[0] == '| | resnet18 | resnet34 |'
    assert len(lines) == 2 + 5 + 2 + 5
    assert ('| graphs / graph breaks, dense; gated | 3 / 2; 5 / 4 | '
            '3 / 2; 5 / 4 |') in lines
    assert '| gated compiled, ms | 82.0 | 82.0 |' in lines
    assert '| compile s, dense / gated | 60 / 95 | 60 / 95 |' in lines
    assert ('| gated/dense, compiled | 1.062 [1.051, 1.070] | '
            '1.062 [1.051, 1.070] |') in lines
    assert lines[-1] == ('| gate losses / gated step, % | '
                         '106.20 [105.10, 107.00] | '
                         '106.20 [105.10, 107.00] |')


compact_inference = load_script('benchmarks/compact_inference.py')


def test_compact_inference_rows(tmp_path):
    out = tmp_path / 'compact.json'
    common = ['--model', 'resnet34', '--size', '32', '--batch-sizes', '1',
              '2', '--repeats', '1', '--warmup', '0', '--threads', '1',
              '--backends', 'torch']
    rows = compact_inference.main(common + ['--out', str(out)])
    assert out.exists()
    assert [(r['backend'], r['batch_size']) for r in rows] == [
        ('torch', 1), ('torch', 2)]
    for row in rows:
        # Half of every gated map removed halves its two convolutions;
        # stem and shortcuts stay.
        assert 0.4 < row['static_saving'] < 0.95
        ratio = row['compact_ms'] / row['dense_ms']
        assert row['realized'] == pytest.approx(
            (1 - ratio) / row['static_saving'])
    assert compact_inference.target_verdict(rows) == 'not measured'
    # Every channel always on: the compact model is the dense network.
    dense_like = compact_inference.main(common + ['--off', '0', '--on', '1'])
    assert dense_like[0]['static_saving'] == pytest.approx(0, abs=1e-12)
    assert dense_like[0]['realized'] is None


def test_compact_inference_target_verdict():
    row = dict(backend='torch', batch_size=8, realized=0.95,
               realized_low=0.92, realized_high=0.97)
    assert compact_inference.target_verdict([row]) == 'met'
    row.update(realized_low=0.85)
    assert compact_inference.target_verdict([row]) == 'undecided'
