"""The analysis tools (tools/analysis_tools) and GateHistogramHook on tiny
data: each writes its files.

The datasets come from the ``tiny_imagenet`` and ``tiny_cityscapes``
fixtures (tests/conftest.py); the configs inherit the repo's configs and
shrink them.
"""
import csv
import importlib.util
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config

import mmgated  # noqa: F401
from mmgated.analysis.inference import build_model
from mmgated.analysis.macs import analyzer_macs
from mmgated.engine.hooks import GateHistogramHook
from mmgated.models import gate_modules

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(REPO, 'tools', 'analysis_tools')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def load_tool(name):
    spec = importlib.util.spec_from_file_location(
        f'_tool_{name}', osp.join(TOOLS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_png(path):
    assert osp.isfile(path), path
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_MAGIC, path
    assert osp.getsize(path) > 5000, f'{path} looks empty'


CLS_CONFIG = '''
_base_ = [{base!r}]
model = dict(head=dict(num_classes=3))
data_preprocessor = dict(num_classes=3)
_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root={root!r},
                 data_prefix='train', pipeline=_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root={root!r},
                 data_prefix='val', pipeline=_pipeline))
test_dataloader = val_dataloader
val_evaluator = [dict(type='Accuracy', topk=(1, )), dict(type='GateMetric')]
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=2)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=100))
custom_hooks = []
'''

SEG_CONFIG = '''
_base_ = [{base!r}]
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    backbone=dict(depth=18, norm_cfg=norm_cfg),
    decode_head=dict(in_channels=512, channels=16, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=256, channels=8, norm_cfg=norm_cfg))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 64), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root={root!r}, pipeline=test_pipeline))
test_dataloader = val_dataloader
'''


def spread_gates(model, seed=0):
    """Spread the gate logits so that the gates differ between inputs."""
    g = torch.Generator().manual_seed(seed)
    for gate in gate_modules(model).values():
        with torch.no_grad():
            gate.fc2.weight.normal_(0, 2.0, generator=g)
            gate.fc2.bias.zero_()


def write_checkpoint(config, path):
    model = build_model(Config.fromfile(config))
    spread_gates(model)
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return path


@pytest.fixture(scope='module')
def cls_setup(tiny_imagenet, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('cls')
    config = str(tmp / 'tiny_r20_bas.py')
    with open(config, 'w') as f:
        f.write(CLS_CONFIG.format(
            base=osp.join(REPO, 'configs', 'resnet20_bas_cifar10.py'),
            root=tiny_imagenet))
    checkpoint = write_checkpoint(config, str(tmp / 'tiny.pth'))
    return config, checkpoint, tmp


@pytest.fixture(scope='module')
def seg_setup(tiny_cityscapes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('seg')
    config = str(tmp / 'tiny_pspnet_gated.py')
    with open(config, 'w') as f:
        f.write(SEG_CONFIG.format(
            base=osp.join(REPO, 'configs', 'pspnet_gated_r50_cityscapes.py'),
            root=tiny_cityscapes))
    checkpoint = write_checkpoint(config, str(tmp / 'tiny.pth'))
    return config, checkpoint, tmp


REPORT_KEYS = {
    'dense_macs', 'mean_macs', 'mac_ratio', 'mac_ratio_std', 'gate_metric',
    'per_layer', 'per_class_usage', 'num_samples', 'gating_macs', 'mean_loss'
}
PLOTS = ('gate_categories.png', 'mac_histogram.png', 'macs_vs_loss.png',
         'class_gate_usage.png')


def test_gate_stats_classification(cls_setup):
    config, checkpoint, tmp = cls_setup
    out = str(tmp / 'gate_stats')
    report = load_tool('gate_stats').main([
        config, checkpoint, '--out-dir', out, '--max-samples', '5',
        '--device', 'cpu'
    ])
    with open(osp.join(out, 'gate_stats.json')) as f:
        saved = json.load(f)
    assert REPORT_KEYS <= set(saved)
    assert saved['num_samples'] == report['num_samples'] == 5
    assert saved['task'] == 'classification'
    assert 0 < saved['mac_ratio'] < 1
    assert saved['gate_metric']['mac_ratio'] == saved['mac_ratio']
    assert 'layer3/gates_conditional' in saved['gate_metric']
    assert len(saved['per_layer']) == 9  # ResNet-20: 9 gated blocks
    layer = saved['per_layer']['backbone.layer1.0.gate']
    assert layer['num_gates'] == 16
    assert layer['always_on'] + layer['conditional'] + layer[
        'always_off'] == pytest.approx(1)
    usage = saved['per_class_usage']
    assert len(usage) == 3 and sum(
        c['num_samples'] for c in usage.values()) == 5
    assert set(next(iter(usage.values()))['gates']) == set(saved['per_layer'])
    with open(osp.join(out, 'per_sample.csv')) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    losses = [float(r['loss']) for r in rows]
    assert all(np.isfinite(losses)) and min(losses) >= 0
    macs = [float(r['conditional_macs']) for r in rows]
    assert np.mean(macs) == pytest.approx(saved['mean_macs'])
    npz = np.load(osp.join(out, 'class_gate_usage.npz'))
    assert npz['usage'].shape == (3, 16 * 3 + 32 * 3 + 64 * 3)
    for name in PLOTS:
        assert_png(osp.join(out, name))


def test_gate_stats_segmentation(seg_setup):
    config, checkpoint, tmp = seg_setup
    out = str(tmp / 'gate_stats')
    load_tool('gate_stats').main(
        [config, checkpoint, '--out-dir', out, '--device', 'cpu'])
    with open(osp.join(out, 'gate_stats.json')) as f:
        saved = json.load(f)
    assert REPORT_KEYS <= set(saved)
    assert saved['task'] == 'segmentation'
    assert saved['num_samples'] == 2
    assert 0 < saved['mac_ratio'] < 1
    assert len(saved['per_layer']) == 8  # ResNet-18: 8 gated blocks
    usage = saved['per_class_usage']
    assert len(usage) == 19  # Cityscapes classes
    present = [c for c in usage.values() if c['num_samples']]
    assert present and all(
        0 <= v <= 1 for c in present for v in c['gates'].values())
    assert all(v is None for c in usage.values() if not c['num_samples']
               for v in c['gates'].values())
    assert saved['mean_loss'] > 0  # per-image CE over valid pixels
    for name in PLOTS:
        assert_png(osp.join(out, name))


def test_gate_stats_errors(cls_setup, tmp_path):
    config, checkpoint, _ = cls_setup
    tool = load_tool('gate_stats')
    with pytest.raises(SystemExit):
        tool.parse_args([config, str(tmp_path / 'missing.pth')])
    with pytest.raises(SystemExit):
        tool.parse_args([config, checkpoint, '--max-samples', '0'])


def test_get_flops(cls_setup, capsys):
    config, checkpoint, _ = cls_setup
    tool = load_tool('get_flops')
    result = tool.main([
        config, checkpoint, '--shape', '32', '--num-samples', '4', '--device',
        'cpu'
    ])
    printed = capsys.readouterr().out
    assert 'Dense MACs (inference network)' in printed
    assert 'Gating modules MACs' in printed
    assert 'Expected conditional MACs over 4 val samples' in printed
    # The dense figure is the analyzer's on the dense counterpart.
    dense_cfg = Config.fromfile(osp.join(REPO, 'configs',
                                         'resnet20_cifar10.py'))
    dense_cfg.model.head.num_classes = 3
    dense = build_model(dense_cfg)
    reference = analyzer_macs(dense, torch.zeros(1, 3, 32, 32))
    assert abs(result['dense'] - reference) / reference < 0.01
    assert result['num_samples'] == 4
    assert 0 < result['mac_ratio'] < 1
    assert result['params_gating'] > 0
    # A dense config needs neither a checkpoint nor data.
    result = tool.main([
        osp.join(REPO, 'configs', 'resnet20_cifar10.py'), '--shape', '32',
        '--device', 'cpu'
    ])
    assert result['gating'] == 0 and result['params_gating'] == 0
    with pytest.raises(SystemExit):
        tool.parse_args([config, '--num-samples', '3'])
    with pytest.raises(SystemExit):
        tool.parse_args([config, '--shape', '1', '2', '3'])


def test_get_flops_segmentor(seg_setup, capsys):
    config, _, _ = seg_setup
    result = load_tool('get_flops').main(
        [config, '--shape', '64', '128', '--device', 'cpu'])
    assert 'Auxiliary head MACs' in capsys.readouterr().out
    assert result['aux_head'] > 0 and result['params_aux'] > 0


def write_scalars(work_dir, stamp, lines):
    path = osp.join(work_dir, stamp, 'vis_data')
    os.makedirs(path, exist_ok=True)
    with open(osp.join(path, 'scalars.json'), 'w') as f:
        for line in lines:
            f.write(json.dumps(line) + '\n')


def test_tradeoff_plot(tmp_path):
    train = dict(loss=1.0, lr=0.1, epoch=1, iter=10, step=10)
    runs = {}
    for name, ratio, acc in (('g1', 0.5, 80.0), ('g2', 0.7, 85.0),
                             ('g3', 0.6, 70.0), ('dense', None, 88.0)):
        work_dir = str(tmp_path / name)
        val = {'accuracy/top1': acc, 'step': 1}
        early = {'accuracy/top1': acc - 10, 'step': 0}
        if ratio is not None:
            val['gates/mac_ratio'] = ratio
            early['gates/mac_ratio'] = 0.99
        write_scalars(work_dir, '20240101_000000', [train, early, train, val])
        runs[name] = work_dir
    # A later run that only trained is skipped for the one with metrics.
    write_scalars(runs['g1'], '20240102_000000', [train])
    out = str(tmp_path / 'tradeoff.png')
    tool = load_tool('tradeoff_plot')
    results = tool.main([
        runs['g1'], runs['g2'], runs['g3'], runs['dense'], '--labels', 'A',
        'A', 'B', 'A', '--metric', 'accuracy/top1', '--out', out
    ])
    assert_png(out)
    assert [r['mac_ratio'] for r in results] == [0.5, 0.7, 0.6, None]
    assert [r['metric'] for r in results] == [80.0, 85.0, 70.0, 88.0]
    # --select best and the default labels and metric.
    results = tool.main([runs['g2'], '--select', 'best', '--out', out])
    assert results[0]['label'] == 'g2' and results[0]['metric'] == 85.0
    with pytest.raises(ValueError, match="no validation metric 'mIoU'"):
        tool.main([runs['g1'], '--metric', 'mIoU', '--out', out])
    with pytest.raises(SystemExit):
        tool.parse_args([runs['g1'], runs['g2'], '--labels', 'A'])


def run_training(config, work_dir, name, train_cfg=None, hook=None):
    from mmengine.runner import Runner
    cfg = Config.fromfile(config)
    cfg.work_dir = work_dir
    cfg.experiment_name = name  # distinct visualizer/logger instances
    cfg.custom_hooks = [hook] if hook else []
    if train_cfg is not None:
        cfg.train_cfg = train_cfg
        cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1000)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


def test_gate_histogram_hook_epochs_and_tradeoff(cls_setup, tmp_path):
    config, _, _ = cls_setup
    work_dir = str(tmp_path / 'work')
    runner = run_training(
        config, work_dir, 'hist_epochs',
        train_cfg=dict(by_epoch=True, max_epochs=2, val_interval=2),
        hook=dict(type='GateHistogramHook', gates=3, bins=10))
    hook = next(h for h in runner.hooks if isinstance(h, GateHistogramHook))
    assert len(hook.selected) == 3
    # One histogram per epoch; every training sample (12 per epoch) counted.
    assert [label for label, _, _ in hook.history] == ['epoch 1', 'epoch 2']
    for _, _, counts in hook.history:
        assert counts.shape == (3, 10)
        assert counts.sum(1).tolist() == [12, 12, 12]
    for epoch in (1, 2):
        assert_png(osp.join(work_dir, 'gate_histograms',
                            f'gate_histograms_epoch_{epoch}.png'))
        assert_png(osp.join(runner.log_dir, 'vis_data', 'vis_image',
                            f'gate_histograms_{epoch}.png'))
    # The run's log feeds the trade-off plot: accuracy and MAC ratio.
    out = str(tmp_path / 'tradeoff.png')
    results = load_tool('tradeoff_plot').main([work_dir, '--out', out])
    assert results[0]['metric_name'] == 'accuracy/top1'
    assert results[0]['mac_ratio'] is not None
    assert_png(out)


def test_gate_histogram_hook_iterations(cls_setup, tmp_path):
    config, _, _ = cls_setup
    work_dir = str(tmp_path / 'work')
    spec = 'backbone.layer2.1.gate:5'
    runner = run_training(
        config, work_dir, 'hist_iters',
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=3,
                       val_interval=100),
        hook=dict(type='GateHistogramHook', gates=[spec], interval=2,
                  max_columns=2))
    hook = next(h for h in runner.hooks if isinstance(h, GateHistogramHook))
    assert hook.selected == [('backbone.layer2.1.gate', 5)]
    # Two iterations of 4 samples, then the unfinished third.
    assert [label for label, _, _ in hook.history] == [
        'iter 2', 'iter 3 (partial)'
    ]
    assert [c.sum() for _, _, c in hook.history] == [8, 4]
    for step in (2, 3):
        assert_png(osp.join(work_dir, 'gate_histograms',
                            f'gate_histograms_iter_{step}.png'))


def test_gate_histogram_hook_errors():
    with pytest.raises(ValueError, match="'module_name:channel'"):
        GateHistogramHook(gates=['backbone.layer1.0.gate'])
    with pytest.raises(ValueError, match='gates must be >= 1'):
        GateHistogramHook(gates=0)
    with pytest.raises(ValueError, match='bins'):
        GateHistogramHook(bins=0)
    model = build_model(Config.fromfile(
        osp.join(REPO, 'configs', 'resnet20_bas_cifar10.py')))

    class FakeRunner:
        pass

    runner = FakeRunner()
    runner.model = model
    with pytest.raises(ValueError, match="'backbone.layer9.0.gate' does not"):
        GateHistogramHook(gates=['backbone.layer9.0.gate:0']).before_train(
            runner)
    with pytest.raises(ValueError, match='channels 0..15, got channel 16'):
        GateHistogramHook(gates=['backbone.layer1.0.gate:16']).before_train(
            runner)
    with pytest.raises(ValueError, match='only 336 gates'):
        GateHistogramHook(gates=1000).before_train(runner)
    hook = GateHistogramHook(gates=5)
    assert hook._select(model)[0] == ('backbone.layer1.0.gate', 0)
    assert hook._select(model)[-1] == ('backbone.layer3.2.gate', 63)


def test_gate_overhead_tool(tmp_path, capsys):
    out = str(tmp_path / 'overhead.json')
    results = load_tool('gate_overhead').main(
        ['--depths', '18', '--shape', '64', '--out', out])
    assert '| ResNet-18 | 8 |' in capsys.readouterr().out
    with open(out) as f:
        saved = json.load(f)
    rows = saved['resnet18']['rows']
    assert len(rows) == 8 == len(results[18]['rows'])
    assert all(0 < r['overhead_fc'] < r['overhead'] < 0.01 for r in rows)
