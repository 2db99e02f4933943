"""The README demo's code path on a subset of the digits."""
import csv
import os
import os.path as osp
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))

import demo  # noqa: E402


def test_demo_trains_and_reports(tmp_path, capsys):
    metrics = demo.main(['--work-dir', str(tmp_path), '--max-samples', '60',
                         '--epochs', '1'])
    out = capsys.readouterr().out
    assert 'top-1 accuracy' in out and 'conditional MACs / dense MACs' in out
    # The runner's top-1 is the share of the validation digits that the
    # gate_stats tool, classifying them again from the checkpoint, got
    # right: 6 validation images per class (--max-samples 60 takes 60 of
    # each split), so a multiple of 100/60.
    with open(tmp_path / 'gate_stats' / 'per_sample.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60
    correct = sum(row['correct'] == 'True' for row in rows)
    assert metrics['accuracy/top1'] == pytest.approx(100 * correct / 60)
    assert 0 < metrics['gates/mac_ratio'] <= 1.01
    assert osp.isfile(tmp_path / 'epoch_1.pth')
    assert osp.isfile(tmp_path / 'demo_metrics.json')
    for plot in ('gate_categories', 'mac_histogram', 'macs_vs_loss',
                 'class_gate_usage'):
        assert osp.isfile(tmp_path / 'gate_stats' / f'{plot}.png'), plot
    train = os.listdir(tmp_path / 'data-60' / 'train')
    assert sorted(train) == [str(d) for d in range(10)]


def test_digits_are_written_once_per_split(tmp_path):
    counts = demo.write_digits(str(tmp_path), max_samples=None)
    assert counts['train'] + counts['val'] == 1797
    assert 0.79 < counts['train'] / 1797 < 0.81
    again = demo.write_digits(str(tmp_path), max_samples=None)
    assert again == counts
