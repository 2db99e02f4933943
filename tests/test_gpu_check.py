"""benchmarks/gpu_check.py on the CPU: the exit without CUDA, the summary
and exit status, the timing arithmetic, and the training and skip == mask
checks on a tiny gated model."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from data_utils import REPO, load_script

pytest.importorskip('mmpretrain')

SCRIPT = osp.join(REPO, 'benchmarks', 'gpu_check.py')

gpu_check = load_script('benchmarks/gpu_check.py')


pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_classifier():
    """The check's gated classifier config with a CIFAR ResNet-20."""
    cfg = gpu_check.classifier_cfg(num_classes=10)
    cfg['backbone'] = dict(type='GatedResNetCifar', depth=20)
    cfg['head'].update(in_channels=64, topk=(1, ))
    return gpu_check.build('mmpretrain', cfg, 'cpu')


def test_main_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert gpu_check.main([]) == 0
    assert 'CUDA is unavailable' in capsys.readouterr().out


def test_script_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([sys.executable, SCRIPT, '--quick'],
                          capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'CUDA is unavailable' in proc.stdout


def test_main_reports_every_section(monkeypatch, capsys, tmp_path):
    """A failed check and a section that raises both end in exit 1, and
    the other sections still run and reach the table and the JSON."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'fake')

    def broken(args, device, add):
        raise RuntimeError('boom')

    monkeypatch.setattr(gpu_check, 'section_train', broken)
    monkeypatch.setattr(
        gpu_check, 'section_skip_mask',
        lambda args, device, add: add('skip_mask', 'm', False, 'differs'))
    monkeypatch.setattr(
        gpu_check, 'section_overhead',
        lambda args, device, add: add('overhead', 'r', None, '1.02'))
    out = tmp_path / 'gpu.json'
    sections = ['train', 'skip_mask', 'overhead']
    assert gpu_check.main(['--sections', *sections, '--out', str(out)]) == 1
    rows = json.loads(out.read_text())['rows']
    assert [(r['section'], r['status']) for r in rows] == [
        ('train', 'FAIL'), ('skip_mask', 'FAIL'), ('overhead', 'INFO')]
    assert 'boom' in rows[0]['detail']
    assert '2 check(s) failed' in capsys.readouterr().out
    assert gpu_check.main(['--sections', 'overhead']) == 0


def test_parse_args():
    args = gpu_check.parse_args([])
    assert args.sections == list(gpu_check.SECTIONS)
    assert (args.iters, args.rounds, args.warmup) == (5, 10, 2)
    args = gpu_check.parse_args(['--quick', '--sections', 'realized'])
    assert (args.iters, args.rounds, args.warmup) == (2, 5, 1)
    assert args.sections == ['realized']


def test_ratios():
    # Per-round ratios 2, 2, 3: the median is 2, the ratio of the medians
    # (4 / 2) too here; a drift of one round does not move it.
    assert gpu_check.paired_ratio([2, 4, 9], [1, 2, 3]) == 2
    assert gpu_check.paired_ratio([2, 4, 90], [1, 2, 3]) == 2
    with pytest.raises(ValueError):
        gpu_check.paired_ratio([1, 2], [1])
    with pytest.raises(ValueError):
        gpu_check.paired_ratio([], [])
    # Twice as fast for 2.5x fewer MACs: 80 % of the savings realized.
    assert gpu_check.realized_ratio(10, 5, 100, 40) == pytest.approx(0.8)
    assert gpu_check.realized_ratio(10, 5, 100, 50) == pytest.approx(1.0)


def test_time_paired_alternates():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in 'ab'}
    times = gpu_check.time_paired(fns, rounds=3, warmup=1, device='cpu')
    assert calls == list('ab' 'ab' 'ba' 'ab')
    assert {k: len(v) for k, v in times.items()} == dict(a=3, b=3)
    assert all(t >= 0 for v in times.values() for t in v)


def test_train_check_cpu():
    model = tiny_classifier()
    inputs, samples = gpu_check.cls_batch(2, 16, 'cpu', num_classes=10)
    failures, missing, last = gpu_check.train_check(
        model, inputs, samples, 'fp32', iters=2)
    assert failures == []
    assert missing == []
    assert {'loss', 'loss_bs', 'loss_l0'} <= set(last)


def test_train_check_reports_every_failure():
    model = tiny_classifier()
    with torch.no_grad():
        model.head.fc.weight[0, 0] = float('nan')
    inputs, samples = gpu_check.cls_batch(2, 16, 'cpu', num_classes=10)
    failures, _, _ = gpu_check.train_check(
        model, inputs, samples, 'fp32', iters=2)
    # Losses and gradients, at both steps: no stop at the first.
    assert sum('non-finite [' in f for f in failures) == 2
    assert sum('non-finite grads' in f for f in failures) == 2


def test_skip_mask_check_cpu():
    backbone = gpu_check.build(
        'mmpretrain', dict(type='GatedResNetCifar', depth=20), 'cpu')
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = gpu_check.skip_mask_check(backbone, x)
    assert result['same_gates']
    assert result['ok'], result
    assert result['max_abs'] < 1e-4
    assert 0.3 < result['open_rate'] < 0.7


def test_sections_cpu(monkeypatch):
    """The glue of the skip_mask and realized sections, on tiny inputs."""
    monkeypatch.setitem(gpu_check.SIZES, 'skip_mask_cls', (2, 32))
    monkeypatch.setitem(gpu_check.SIZES, 'skip_mask_seg', (1, 32))
    monkeypatch.setitem(gpu_check.SIZES, 'realized', 32)
    monkeypatch.setitem(gpu_check.SIZES, 'realized_batches', (1, ))
    rows = []
    args = gpu_check.parse_args(['--quick'])
    add = lambda section, check, ok, detail, **values: rows.append(  # noqa
        (section, check, ok, values))
    gpu_check.section_skip_mask(args, torch.device('cpu'), add)
    gpu_check.section_realized(args, torch.device('cpu'), add)
    assert [row[:3] for row in rows] == [
        ('skip_mask', 'resnet18', True),
        ('skip_mask', 'pspnet_backbone', True),
        ('realized', 'resnet34 skip 50% batch 1', None)]
    realized = rows[-1][3]
    assert 0.4 < realized['mac_ratio'] < 0.6
    assert realized['realized'] > 0
    assert realized['dense_ms'] > 0 and realized['skip_ms'] > 0
