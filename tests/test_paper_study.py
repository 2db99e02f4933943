"""tools/analysis_tools/paper_study.py and its statistics."""
import json
import math
import os

import numpy as np
import pytest
from scipy.stats import spearmanr

from data_utils import load_script
from mmgated.analysis.study import (format_interval, interpolate,
                                    mean_interval, spearman)

study = load_script('tools/analysis_tools/paper_study.py')

# Student's t quantile t(0.975, 2), from a printed table.
T_975_2 = 4.302652729749464


def test_mean_interval_on_known_numbers():
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    half = T_975_2 * 1.0 / math.sqrt(3)  # sample std of 1, 2, 3 is 1
    assert mean == 2.0
    assert low == pytest.approx(2.0 - half, abs=1e-12)
    assert high == pytest.approx(2.0 + half, abs=1e-12)
    # NaN and None (a run without the value) are left out.
    assert mean_interval([1.0, float('nan'), None, 3.0])[0] == 2.0
    assert mean_interval([5.0]) == (5.0, None, None)
    assert math.isnan(mean_interval([])[0])
    # A wider confidence gives a wider interval.
    assert mean_interval([1, 2, 3], 0.99)[1] < low
    with pytest.raises(ValueError, match='confidence'):
        mean_interval([1, 2], 1.0)


def test_spearman_matches_scipy():
    rng = np.random.RandomState(0)
    x = rng.randint(0, 5, 40).astype(float)  # with ties
    y = x + rng.randn(40)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)
    assert spearman(x, -y) == pytest.approx(-spearmanr(x, y)[0], abs=1e-12)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, 2], [1, 2]) is None


def test_interpolate_and_format():
    points = [(1.0, 98.0), (0.25, 90.0), (0.5, 94.0)]
    assert interpolate(points, 0.375) == pytest.approx(92.0)
    assert interpolate(points, 1.0) == pytest.approx(98.0)
    assert interpolate(points, 0.2) is None
    assert format_interval((0.5, 0.25, 0.75), 1, 100) == '50.0 [25.0, 75.0]'
    assert format_interval((0.5, None, None)) == '0.50'


def _run(method, depth, seed, top1, macs, dense_macs=100.0, **extra):
    run = dict(method=method, depth=depth, seed=seed, top1=top1, macs=macs,
               dense_macs=dense_macs)
    run.update(extra)
    return run


def test_summarize_known_numbers():
    gated = dict(always_on=0.5, conditional=0.25, always_off=0.25,
                 spearman=0.3,
                 per_layer={'backbone.layer1.0.gate': dict(
                     always_on=0.5, conditional=0.25, always_off=0.25)})
    runs = [
        _run('dense', 20, 0, 98.0, 100.0, width=16),
        _run('dense', 20, 1, 96.0, 100.0, width=16),
        _run('static', 20, 0, 90.0, 25.0, width=8),
        _run('static', 20, 1, 90.0, 25.0, width=8),
        _run('bas', 20, 0, 95.0, 60.0, gamma=0.01, **gated),
        _run('bas', 20, 1, 93.0, 40.0, gamma=0.01, **gated),
        _run('dense', 32, 0, 99.0, 200.0, dense_macs=200.0, width=16),
        _run('l0', 32, 0, 97.0, 100.0, dense_macs=200.0, gamma=0.01,
             **gated),
    ]
    summary = study.summarize(runs)
    rows = {(r['method'], r['depth']): r for r in summary['settings']}
    bas = rows[('bas', 20)]
    assert bas['seeds'] == 2
    assert bas['top1'][0] == 94.0
    half = 12.706204736174707 * math.sqrt(2) / math.sqrt(2)  # t(.975, 1)
    assert bas['top1'][1] == pytest.approx(94.0 - half)
    assert bas['mac_ratio'][0] == pytest.approx(0.5)
    assert bas['conditional'][0] == 0.25
    assert rows[('l0', 32)]['mac_ratio'][0] == pytest.approx(0.5)
    # The static curve of ResNet-20 runs through (0.25, 90) and (1, 97):
    # at 0.5 it gives 90 + 7 / 3.
    vs_static = {(r['method'], r['depth']): r for r in summary['vs_static']}
    assert vs_static[('bas', 20)]['static_top1'] == pytest.approx(
        90 + 7 / 3)
    assert vs_static[('bas', 20)]['difference'] == pytest.approx(
        94 - 90 - 7 / 3)
    # ResNet-32 has no static runs: no comparison.
    assert vs_static[('l0', 32)]['static_top1'] is None
    (r32, ) = summary['vs_dense_r20']
    assert r32['macs_vs_dense_r20'] == pytest.approx(1.0)
    assert r32['dense_r20_top1'][0] == 97.0
    assert summary['layer_gamma'] == 0.01
    assert summary['per_layer']['bas_r20']['backbone.layer1.0.gate'][
        'always_on'] == 0.5
    table = study.markdown(summary)
    assert '| ResNet-20 BAS, gamma 0.01 | 2 | 94.00 [' in table
    assert '| ResNet-20 BAS, gamma 0.01 | 0.500 | 94.00 | 92.33 | +1.67 |' \
        in table


def test_study_on_two_tiny_runs(tmp_path, monkeypatch, capsys):
    args = ['--work-dir', str(tmp_path), '--methods', 'bas', 'l0',
            '--gammas', '0.01', '--seeds', '1', '--depths', '20',
            '--epochs', '1', '--max-samples', '40', '--jobs', '1']
    summary = study.main(args)
    assert [(r['method'], r['seeds']) for r in summary['settings']] == [
        ('bas', 1), ('l0', 1)]
    for row in summary['settings']:
        assert 0 <= row['top1'][0] <= 100
        assert 0 < row['mac_ratio'][0] <= 1.01
        total = sum(row[k][0] for k in ('always_on', 'conditional',
                                        'always_off'))
        assert total == pytest.approx(1.0)
    for name in ('study.md', 'study.json', 'fig3_tradeoff.png',
                 'fig4_categories.png', 'fig4_per_layer.png',
                 'loss_vs_macs.png'):
        assert (tmp_path / name).is_file(), name
    assert 'Section 5.3' in (tmp_path / 'study.md').read_text()
    metrics = json.loads(
        (tmp_path / 'runs' / 'bas_r20_g0.01_s0' / 'metrics.json').read_text())
    assert metrics['num_images'] == 40
    assert len(metrics['per_image']) == 40

    # Resumes: only the run without metrics trains again.
    os.remove(tmp_path / 'runs' / 'l0_r20_g0.01_s0' / 'metrics.json')
    trained = []
    real = study.train_run

    def counting(spec, *rest):
        trained.append(study.run_name(spec))
        return real(spec, *rest)

    monkeypatch.setattr(study, 'train_run', counting)
    capsys.readouterr()
    study.main(args)
    assert trained == ['l0_r20_g0.01_s0']
    assert '2 runs, 1 cached' in capsys.readouterr().out


def test_mean_interval_limits():
    mean, low, high = mean_interval([99.0, 100.0, 100.0], limits=(0, 100))
    assert high == 100.0 and low < mean < 100.0
