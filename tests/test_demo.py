"""The README demo's code path on a subset of the digits."""
import os
import os.path as osp
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(REPO, 'tools'))

import demo  # noqa: E402


def test_demo_trains_and_reports(tmp_path, capsys):
    metrics = demo.main(['--work-dir', str(tmp_path), '--max-samples', '60',
                         '--epochs', '1'])
    out = capsys.readouterr().out
    assert 'top-1 accuracy' in out and 'conditional MACs / dense MACs' in out
    assert 0 <= metrics['accuracy/top1'] <= 100
    assert 0 < metrics['gates/mac_ratio'] <= 1.01
    assert osp.isfile(tmp_path / 'epoch_1.pth')
    assert osp.isfile(tmp_path / 'demo_metrics.json')
    for plot in ('gate_categories', 'mac_histogram', 'macs_vs_loss',
                 'class_gate_usage'):
        assert osp.isfile(tmp_path / 'gate_stats' / f'{plot}.png'), plot
    # 80 / 20 split of 6 images per class.
    train = os.listdir(tmp_path / 'data-60' / 'train')
    assert sorted(train) == [str(d) for d in range(10)]


def test_digits_are_written_once_per_split(tmp_path):
    counts = demo.write_digits(str(tmp_path), max_samples=None)
    assert counts['train'] + counts['val'] == 1797
    assert 0.79 < counts['train'] / 1797 < 0.81
    again = demo.write_digits(str(tmp_path), max_samples=None)
    assert again == counts
