"""The compact model (mmgated.deploy.compact_model, tools/deploy/compact.py):
static channels removed, same outputs on the calibration data."""
import json
import os

import pytest
import torch
from mmengine.registry import init_default_scope

from data_utils import (CIFAR_AS_FOLDER_TINY_SETTINGS, SEG_TINY_SETTINGS,
                        load_script, write_tiny_config)
from mmgated.analysis.inference import build_model
from mmgated.deploy import (compact_model, count_open_gates,
                            open_rates_from_counts, static_channels)
from mmgated.models import collect_gates, gate_modules
from mmgated.models.compact import CompactChannelGate
from mmgated.utils.checkpoint_io import CheckpointError, add_checksum
from mmgated.utils.outputs import OutputExistsError
from mmgated.utils.run_config import load_run_config

compact_tool = load_script('tools/deploy/compact.py')
export_tool = load_script('tools/deploy/export_onnx.py')
test_tool = load_script('tools/test.py')
pytestmark = pytest.mark.usefixtures('one_thread')


def mixed_gates(model, seed=0, all_off=True):
    """Give every gate of ``model`` channels that are always off, always on
    and conditional; the second gate closes all its channels (unless not
    ``all_off``) and the third opens all of them."""
    generator = torch.Generator().manual_seed(seed)
    for i, gate in enumerate(gate_modules(model).values()):
        c = gate.fc2.out_features
        bias = torch.randn(c, generator=generator) * 0.5
        weight = torch.randn(gate.fc2.weight.shape, generator=generator)
        bias[:c // 3], weight[:c // 3] = -30, 0  # always off
        bias[c // 3:c // 2], weight[c // 3:c // 2] = 30, 0  # always on
        if i == 1 and all_off:
            bias[:], weight[:] = -30, 0
        if i == 2:
            bias[:], weight[:] = 30, 0
        gate.fc2.bias.data = bias.to(gate.fc2.bias)
        gate.fc2.weight.data = weight.to(gate.fc2.weight) * 3
        gate.fc1.weight.data *= 10
    return model


def _backbone(cfg):
    init_default_scope(cfg.pop('scope'))
    from mmengine.registry import MODELS
    return MODELS.build(cfg)


BACKBONES = {
    'cifar_basic': dict(scope='mmpretrain', type='GatedResNetCifar', depth=20),
    'bottleneck_both': dict(
        scope='mmpretrain', type='GatedResNet', depth=50, stem_channels=16,
        base_channels=8, gate_cfg=dict(position='both')),
    'mmseg_v1c': dict(scope='mmseg', type='GatedResNetV1c', depth=18,
                      stem_channels=16, base_channels=8),
}


def _open_rates(model, x):
    with torch.no_grad():
        return open_rates_from_counts(
            count_open_gates(model, (model(x) for _ in range(1))))


@pytest.mark.parametrize('arch', list(BACKBONES))
def test_compact_backbone_computes_the_gated_outputs(arch):
    torch.manual_seed(0)
    cfg = dict(BACKBONES[arch])
    model = mixed_gates(_backbone(dict(cfg)).double().eval())
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    rates = _open_rates(model, x)
    with torch.no_grad():
        expected = model(x)
        gated = collect_gates(model)
    compact = compact_model(model, rates)
    with torch.no_grad():
        actual = compact(x)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)

    # Each gated map keeps its conditional channels first, then the always
    # on ones; the compact gates repeat the gated model's decisions.
    layout = compact.channel_layout
    compact_gates = collect_gates(compact)
    removed = 0
    for name, output in gated.items():
        kind = static_channels(rates[name])
        keep = torch.cat([torch.nonzero(kind['conditional']).flatten(),
                          torch.nonzero(kind['always_on']).flatten()])
        kept, conditional = layout[name]
        assert conditional == int(kind['conditional'].sum())
        assert kept == max(len(keep), 1)
        gate = getattr(compact.get_submodule(name.rpartition('.')[0]),
                       name.rpartition('.')[2], None)
        if conditional == 0:
            assert gate is None
            removed += 1
            continue
        assert isinstance(gate, CompactChannelGate)
        assert gate.fc2.out_features == conditional
        torch.testing.assert_close(compact_gates[name].gates,
                                   output.gates[:, keep])
    assert removed >= 2  # the all-off and the all-on gate at least
    assert any(c for _, c in layout.values())
    assert sum(p.numel() for p in compact.parameters()) < sum(
        p.numel() for p in model.parameters())

    # A config with the layout builds the same network for the checkpoint.
    rebuilt = _backbone(dict(cfg, channel_layout=layout)).double().eval()
    rebuilt.load_state_dict(compact.state_dict(), strict=True)
    with torch.no_grad():
        for e, a in zip(actual, rebuilt(x)):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_static_channels_by_threshold():
    rate = torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0])

    def kinds(threshold):
        return {k: torch.nonzero(v).flatten().tolist()
                for k, v in static_channels(rate, threshold).items()}

    assert kinds(1.0) == dict(always_on=[4], conditional=[1, 2, 3],
                              always_off=[0])
    assert kinds(0.9) == dict(always_on=[3, 4], conditional=[2],
                              always_off=[0, 1])
    assert kinds(0.5) == dict(always_on=[2, 3, 4], conditional=[],
                              always_off=[0, 1])


def test_threshold_below_one_removes_nearly_static_channels():
    torch.manual_seed(0)
    model = mixed_gates(_backbone(dict(BACKBONES['cifar_basic'])).eval())
    rates = _open_rates(model, torch.randn(8, 3, 32, 32))
    exact = compact_model(model, rates, 1.0).channel_layout
    loose = compact_model(model, rates, 0.5).channel_layout
    assert all(conditional == 0 for _, conditional in loose.values())
    assert sum(c for _, c in exact.values()) > 0


@pytest.mark.parametrize('threshold', [0.49, 1.01, float('nan'), True])
def test_bad_threshold(threshold):
    model = _backbone(dict(BACKBONES['cifar_basic']))
    rates = {n: torch.ones(g.out_channels)
             for n, g in gate_modules(model).items()}
    with pytest.raises(ValueError, match=r'threshold must be a number in '
                       r'\[0.5, 1\]'):
        compact_model(model, rates, threshold)


def test_bad_open_rates():
    model = _backbone(dict(BACKBONES['cifar_basic']))
    rates = {n: torch.ones(g.out_channels)
             for n, g in gate_modules(model).items()}
    name = next(iter(rates))
    with pytest.raises(ValueError, match=f'missing .*{name}'):
        compact_model(model, {k: v for k, v in rates.items() if k != name})
    with pytest.raises(ValueError, match=f'open_rates.*{name}.*fractions'):
        compact_model(model, dict(rates, **{name: torch.ones(3)}))
    with pytest.raises(ValueError, match='fractions in \\[0, 1\\]'):
        compact_model(model, dict(rates, **{name: rates[name] * 2}))


def test_unknown_norm_and_dense_model_are_refused():
    gn = _backbone(dict(BACKBONES['mmseg_v1c'],
                        norm_cfg=dict(type='GN', num_groups=4)))
    rates = {n: torch.ones(g.out_channels)
             for n, g in gate_modules(gn).items()}
    with pytest.raises(ValueError, match='GroupNorm.*BatchNorm'):
        compact_model(gn, rates)
    dense = _backbone(dict(BACKBONES['cifar_basic'], gate_cfg=dict(
        stages=[])))
    with pytest.raises(ValueError, match='no gate'):
        compact_model(dense, {})


def test_bad_channel_layout():
    cfg = BACKBONES['cifar_basic']
    with pytest.raises(ValueError, match="'layer9.0.gate'.*not a gate"):
        _backbone(dict(cfg, channel_layout={'layer9.0.gate': [2, 1]}))
    with pytest.raises(ValueError, match=r"\[0, 0\]: allowed .* 1 <= kept"):
        _backbone(dict(cfg, channel_layout={'layer1.0.gate': [0, 0]}))
    with pytest.raises(ValueError, match=r'\[4, 5\]'):
        _backbone(dict(cfg, channel_layout={'layer1.0.gate': [4, 5]}))


# ---------------------------------------------------------------- the tool


def _checkpoint(config, path, gates=True):
    # No gate closes all its channels: the compact model would keep one of
    # them (see compact_model), which the MAC comparison below would count.
    model = mixed_gates(build_model(load_run_config(config)), all_off=False)
    state = model.state_dict()
    if not gates:
        state = {k: v for k, v in state.items() if '.gate' not in k}
    checkpoint = dict(state_dict=state, meta={})
    add_checksum(checkpoint)
    torch.save(checkpoint, path)
    return str(path)


@pytest.fixture(scope='module')
def r20(tiny_imagenet, tmp_path_factory):
    folder = tmp_path_factory.mktemp('compact_cls')
    config = write_tiny_config(folder / 'r20.py',
                               'configs/resnet20_bas_cifar10.py',
                               CIFAR_AS_FOLDER_TINY_SETTINGS, tiny_imagenet)
    return config, _checkpoint(config, folder / 'r20.pth')


def test_tool_classifier(r20, tmp_path, capsys):
    config, checkpoint = r20
    out = tmp_path / 'compact'
    report = compact_tool.main([config, checkpoint, '--out', str(out)])
    assert sorted(os.listdir(out)) == [
        'compact.pth', 'compact_config.py', 'compact_report.json']
    assert json.loads((out / 'compact_report.json').read_text())[
        'compact_metrics'] == report['compact_metrics']
    # Exact threshold, calibrated on the evaluation data: same predictions.
    # (The GateMetric's figures are relative to each model's own network.)
    task = {k: v for k, v in report['gated_metrics'].items()
            if not k.startswith('gates/')}
    assert task and task.items() <= report['compact_metrics'].items()
    assert report['calibration_samples'] == report['eval_samples'] == 6
    channels = report['channels']
    assert channels['always_off'] > 0 and channels['conditional'] > 0
    assert report['params_compact'] < report['params_gated']
    assert report['compact_static_macs'] < report['dense_macs']
    # The closed channels the gated model skipped are the removed ones: the
    # compact model's mean MACs are those of the gated model, less the
    # gating work that went with the static channels.
    assert report['compact_mean_macs'] <= report['gated_mean_macs']
    assert report['compact_mean_macs'] > 0.99 * report['gated_mean_macs']
    assert 'compact, static' in capsys.readouterr().out

    # tools/test.py runs the written config and checkpoint ...
    metrics = test_tool.main([
        str(out / 'compact_config.py'), str(out / 'compact.pth'),
        '--work-dir', str(tmp_path / 'test')])
    assert metrics['accuracy/top1'] == pytest.approx(
        report['compact_metrics']['accuracy/top1'])
    # ... and the ONNX export matches onnxruntime.
    export_tool.main([
        str(out / 'compact_config.py'), str(out / 'compact.pth'), '--out',
        str(tmp_path / 'compact.onnx')])
    difference = float(capsys.readouterr().out.split(
        'max |difference| ')[1].split()[0])
    assert difference <= 1e-4


def test_tool_segmentor_with_calibration_subset(tiny_cityscapes, tmp_path):
    config = write_tiny_config(tmp_path / 'psp.py',
                               'configs/pspnet_gated_r50_cityscapes.py',
                               SEG_TINY_SETTINGS, tiny_cityscapes)
    checkpoint = _checkpoint(config, tmp_path / 'psp.pth')
    out = tmp_path / 'compact'
    report = compact_tool.main([
        config, checkpoint, '--out', str(out), '--calib-samples', '1'])
    assert report['calibration_samples'] == 1
    assert report['eval_samples'] == 2
    assert 'mIoU' in report['compact_metrics']
    assert report['compact_static_macs'] < report['dense_macs']
    metrics = test_tool.main([
        str(out / 'compact_config.py'), str(out / 'compact.pth'),
        '--work-dir', str(tmp_path / 'test')])
    assert metrics['mIoU'] == pytest.approx(report['compact_metrics']['mIoU'])


def test_tool_bad_input_writes_nothing(r20, tmp_path):
    config, checkpoint = r20
    out = tmp_path / 'compact'
    cases = [
        (['--threshold', '1.5'], ValueError, r'\[0.5, 1\], got 1.5'),
        (['--threshold', '0.3'], ValueError, r'\[0.5, 1\], got 0.3'),
        (['--calib-samples', '0'], ValueError, 'zero images'),
    ]
    for extra, error, message in cases:
        with pytest.raises(error, match=message):
            compact_tool.main([config, checkpoint, '--out', str(out)] + extra)
        assert not out.exists()

    dense = _checkpoint(config, tmp_path / 'dense.pth', gates=False)
    with pytest.raises(CheckpointError, match='no gate weights'):
        compact_tool.main([config, dense, '--out', str(out)])
    assert not out.exists()

    gn_options = ['--cfg-options', 'model.backbone.norm_cfg.type=GN',
                  'model.backbone.norm_cfg.num_groups=4']
    gn_config = load_run_config(
        config, {'model.backbone.norm_cfg': dict(type='GN', num_groups=4)})
    gn_model = mixed_gates(build_model(gn_config))
    gn_checkpoint = dict(state_dict=gn_model.state_dict())
    torch.save(gn_checkpoint, tmp_path / 'gn.pth')
    with pytest.raises(ValueError, match='GroupNorm'):
        compact_tool.main([config, str(tmp_path / 'gn.pth'), '--out',
                           str(out)] + gn_options)
    assert not out.exists()

    out.mkdir()
    (out / 'mine.txt').write_text('keep me')
    with pytest.raises(OutputExistsError, match='--force'):
        compact_tool.main([config, checkpoint, '--out', str(out)])
    assert os.listdir(out) == ['mine.txt']
