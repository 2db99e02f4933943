"""Bad input gets a clear, early error (issue 24); one test per probe.

docs/reliability.md lists the probes, the commands a user would run and the
behaviour now. The probes of the tools (overwriting, checkpoints, data
checks) are in test_bad_input_tools.py.
"""
import math
import time
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from data_utils import CIFAR_AS_FOLDER_TINY_SETTINGS, write_tiny_config
from mmgated.engine import (BatchShapingWeightHook, FiniteInputsHook,
                            L0WeightHook)
from mmgated.evaluation import GateMetric, gate_metric
from mmgated.models import (BatchShapingLoss, GateL0Loss, collect_gates,
                            set_gate_execution)
from mmgated.models.backbones.mmpretrain_resnet import GatedResNetCifar
from mmgated.models.losses import batch_shaping_loss
from mmgated.models.losses.priors import BetaPrior
from mmgated.ops import native_available

NON_FINITE = [float('nan'), float('inf'), -float('inf')]


@pytest.mark.parametrize('weight', NON_FINITE + [-0.5, True])
@pytest.mark.parametrize('loss_type', [BatchShapingLoss, GateL0Loss])
def test_loss_weight_must_be_finite_and_not_negative(loss_type, weight):
    with pytest.raises(ValueError, match=f'loss_weight={weight!r} is invalid'):
        loss_type(loss_weight=weight)


@pytest.mark.parametrize('kwargs,bad', [
    (dict(start=float('nan'), end=2, gamma=0.1), 'start=nan'),
    (dict(start=0, end=float('nan'), gamma=0.1), 'end=nan'),
    (dict(start=0, end=float('inf'), gamma=0.1), 'end=inf'),
    (dict(start=0, end=2, gamma=float('nan')), 'gamma=nan'),
])
def test_l0_schedule_points_must_be_finite(kwargs, bad):
    with pytest.raises(ValueError, match=f'{bad} is invalid'):
        L0WeightHook(**kwargs)


@pytest.mark.parametrize('kwargs,bad', [
    (dict(end=float('nan')), 'end=nan'),
    (dict(start_weight=float('inf')), 'start_weight=inf'),
])
def test_batch_shaping_schedule_must_be_finite(kwargs, bad):
    with pytest.raises(ValueError, match=f'{bad} is invalid'):
        BatchShapingWeightHook(**kwargs)


def test_l0_gamma_nan_in_a_run_fails_before_the_first_iteration(
        tiny_imagenet, tmp_path):
    """``tools/train.py CONFIG --cfg-options l0_gamma=nan`` trained to the
    end with NaN checkpoints; now the run stops before training."""
    from mmgated.utils.run_config import load_run_config
    path = write_tiny_config(tmp_path / 'r20.py',
                             'configs/resnet20_bas_cifar10.py',
                             CIFAR_AS_FOLDER_TINY_SETTINGS, tiny_imagenet)
    work_dir = tmp_path / 'work'
    cfg = load_run_config(path, dict(l0_gamma=float('nan')), str(work_dir))
    cfg.experiment_name = f'l0_gamma_nan_{time.time_ns()}'
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match='l0_gamma=nan is invalid'):
        runner.train()
    assert not list(work_dir.glob('*.pth'))


@pytest.mark.parametrize('key,value,allowed', [
    ('tau', True, 'a finite number > 0'),
    ('tau', float('nan'), 'a finite number > 0'),
    ('init_bias', float('nan'), 'a finite number'),
    ('init_bias', float('-inf'), 'a finite number'),
])
def test_gate_cfg_numbers(key, value, allowed):
    with pytest.raises(ValueError,
                       match=f'gate_cfg {key}={value!r} is invalid; '
                       f'allowed: {allowed}'):
        GatedResNetCifar(depth=20, gate_cfg={key: value})


def test_gate_cfg_stages_must_be_a_list():
    with pytest.raises(ValueError, match='stages must be None or a list'):
        GatedResNetCifar(depth=20, gate_cfg=dict(stages=7))


def _cifar_backbone():
    torch.manual_seed(0)
    return GatedResNetCifar(depth=20, gate_cfg={}).eval()


def test_nan_input_gives_the_same_gates_in_every_execution():
    """The gates of a NaN image are closed, in mask execution and in skip
    execution with either backend (the compiled inference gate of earlier
    versions opened them)."""
    model = _cifar_backbone()
    x = torch.randn(2, 3, 32, 32)
    x[0, :, 4:8, 4:8] = float('nan')
    backends = ['torch'] + (['compiled'] if native_available() else [])
    runs = []
    with torch.no_grad():
        model(x)
        runs.append(collect_gates(model))
        for backend in backends:
            set_gate_execution(model, 'skip', backend=backend)
            model(x)
            runs.append(collect_gates(model))
        set_gate_execution(model, 'mask')
    for gates in runs[1:]:
        for name, reference in runs[0].items():
            assert torch.equal(gates[name].gates, reference.gates), name
    first = next(iter(runs[0].values())).gates
    assert not first[0].any() and first[1].any()


def test_non_finite_training_batch_stops_training_at_its_iteration():
    hook = FiniteInputsHook()
    runner = SimpleNamespace(iter=41, epoch=2)
    images = [torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)]
    hook.before_train_iter(runner, 5, dict(inputs=images))
    hook.before_train_iter(
        runner, 5, dict(inputs=torch.zeros(2, 3, 8, 8, dtype=torch.uint8)))
    images[1][0, 0, 0] = float('inf')
    with pytest.raises(FloatingPointError,
                       match=r'training iteration 42 \(batch 5 of epoch 3\) '
                       'holds 1 non-finite'):
        hook.before_train_iter(runner, 5, dict(inputs=images))


def test_recipes_check_their_inputs_and_checkpoints():
    """The configs users inherit keep the checks when they replace
    custom_hooks, and ``mim train`` (not our tools) gets them too."""
    for name in ('resnet20_bas_cifar10', 'resnet34_bas_in1k',
                 'pspnet_gated_r50_cityscapes'):
        cfg = Config.fromfile(f'configs/{name}.py')
        assert cfg.default_hooks.finite_inputs.type == 'FiniteInputsHook'
        assert cfg.default_hooks.checkpoint_integrity.type == \
            'CheckpointIntegrityHook'


def _record_logs(monkeypatch, module):
    """The messages ``module`` logs through mmengine's print_log."""
    messages = []
    monkeypatch.setattr(module, 'print_log',
                        lambda msg, *args, **kwargs: messages.append(msg))
    return messages


def test_batch_shaping_loss_batch_sizes(monkeypatch):
    loss = BatchShapingLoss()
    with pytest.raises(ValueError, match='empty batch'):
        loss(torch.rand(0, 4))
    with pytest.raises(ValueError, match=r'C >= 1 features, got shape '
                       r'\(8, 0\)'):
        loss(torch.rand(8, 0))
    x = torch.rand(1, 4, requires_grad=True)
    messages = _record_logs(monkeypatch, batch_shaping_loss)
    values = [loss(x), loss(x)]
    assert all(float(v.detach()) == 0 for v in values)
    assert len(messages) == 1 and 'batch of 1 sample' in messages[0]
    values[0].backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert float(loss(torch.rand(2, 4))) > 0


def test_huge_beta_prior_is_refused_at_once():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r'a=100000.0 is invalid; allowed: '
                       r'0 < a <= 1000'):
        BetaPrior(a=1e5, b=0.4)
    assert time.perf_counter() - start < 1


def test_float64_input_names_the_dtype_and_the_fix():
    model = _cifar_backbone()
    with pytest.raises(TypeError, match=r'torch.float64 input but its '
                       r'weights are torch.float32: cast the input'):
        model(torch.rand(1, 3, 32, 32, dtype=torch.float64))
    assert model.double()(torch.rand(1, 3, 32, 32,
                                     dtype=torch.float64))[-1].isfinite().all()


def test_padded_validation_images_are_reported(monkeypatch):
    """Images of different sizes in one batch are zero-padded; GateMetric
    says their MACs are counted at the padded size."""
    metric = GateMetric()
    gates = dict(gate_open={'layer1.0.gate': torch.tensor([True, False])},
                 gate_input_sizes={'layer1.0.gate': (8, 8)},
                 model_input_shape=(3, 40, 48))
    metric.process(None, [dict(gates, img_shape=(40, 48)),
                          dict(gates, img_shape=(32, 48))])
    metric.mac_counter = lambda record: dict(conditional_macs=1.0,
                                             dense_macs=2.0)
    messages = _record_logs(monkeypatch, gate_metric)
    metrics = metric.compute_metrics(metric.results)
    assert math.isclose(metrics['mac_ratio'], 0.5)
    assert len(messages) == 1 and '1 of 2 samples' in messages[0], messages
    assert '(32, 48) in a batch of (40, 48)' in messages[0]
