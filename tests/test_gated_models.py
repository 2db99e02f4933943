"""GatedEncoderDecoder and GatedImageClassifier: gate losses in the loss
dict, distributed batch-shaping, optimizer wiring."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.config import ConfigDict
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData

from mmgated.models import BatchShapingLoss

NORM = dict(type='BN', requires_grad=True)


def seg_model_cfg(**overrides):
    cfg = dict(
        type='GatedEncoderDecoder',
        data_preprocessor=dict(
            type='SegDataPreProcessor', mean=[0, 0, 0], std=[1, 1, 1]),
        backbone=dict(
            type='GatedResNetV1c',
            depth=18,
            dilations=(1, 1, 2, 4),
            strides=(1, 2, 1, 1),
            contract_dilation=True,
            norm_cfg=NORM),
        decode_head=dict(
            type='PSPHead',
            in_channels=512,
            in_index=3,
            channels=16,
            pool_scales=(1, 2),
            num_classes=4,
            norm_cfg=NORM,
            loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)),
        auxiliary_head=dict(
            type='FCNHead',
            in_channels=256,
            in_index=2,
            channels=8,
            num_convs=1,
            num_classes=4,
            norm_cfg=NORM,
            loss_decode=dict(type='CrossEntropyLoss', loss_weight=0.4)),
        batch_shaping_loss=dict(type='BatchShapingLoss', loss_weight=0.5),
        l0_loss=dict(type='GateL0Loss', loss_weight=0.1),
        train_cfg=dict(),
        test_cfg=ConfigDict(mode='whole'))
    cfg.update(overrides)
    return cfg


def cls_model_cfg(**overrides):
    cfg = dict(
        type='GatedImageClassifier',
        data_preprocessor=dict(
            type='ClsDataPreprocessor', mean=[0, 0, 0], std=[1, 1, 1]),
        backbone=dict(type='GatedResNetCifar', depth=20),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=3,
            in_channels=64,
            loss=dict(type='CrossEntropyLoss')),
        batch_shaping_loss=dict(type='BatchShapingLoss', loss_weight=0.5),
        l0_loss=dict(type='GateL0Loss', loss_weight=0.1))
    cfg.update(overrides)
    return cfg


def build(scope, cfg):
    init_default_scope(scope)
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmpretrain.registry import MODELS
    return MODELS.build(cfg)


def seg_batch(n=2, size=32):
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(n):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 4, (1, size, size)))
        sample.set_metainfo(
            dict(img_shape=(size, size), ori_shape=(size, size),
                 pad_shape=(size, size)))
        samples.append(sample)
    return torch.randn(n, 3, size, size), samples


def cls_batch(n=4, size=16):
    from mmpretrain.structures import DataSample
    samples = [DataSample().set_gt_label(i % 3) for i in range(n)]
    return torch.randn(n, 3, size, size), samples


CASES = [('mmseg', seg_model_cfg, seg_batch),
         ('mmpretrain', cls_model_cfg, cls_batch)]


@pytest.mark.parametrize('scope,make_cfg,make_batch', CASES)
def test_loss_dict_has_gate_losses(scope, make_cfg, make_batch):
    model = build(scope, make_cfg())
    model.train()
    inputs, samples = make_batch()
    losses = model.loss(inputs, samples)
    assert {'loss_bs', 'loss_l0', 'gate_open_rate'} <= set(losses)
    assert 0 <= losses['gate_open_rate'].item() <= 1
    assert not losses['gate_open_rate'].requires_grad
    # mmengine sums the keys containing 'loss' and only logs the rate.
    total, log_vars = model.parse_losses(losses)
    assert 'gate_open_rate' in log_vars
    expected = sum(v for k, v in losses.items() if 'loss' in k)
    torch.testing.assert_close(total, expected)
    total.backward()
    gate = next(m for m in model.modules()
                if type(m).__name__ == 'ChannelGate')
    assert gate.fc1.weight.grad is not None


@pytest.mark.parametrize('scope,make_cfg,make_batch', CASES)
def test_gate_losses_read_the_collected_gates(scope, make_cfg, make_batch):
    """loss() clears the gates before its forward; gate_losses reads what
    collect_gates gives, which leaves out gates that did not run."""
    from mmgated.models import clear_gates, gate_modules
    model = build(scope, make_cfg())
    model.train()
    losses = model.loss(*make_batch())
    gates = list(gate_modules(model).values())
    assert all(g.output is not None for g in gates)
    for name, value in model.gate_losses().items():
        torch.testing.assert_close(value, losses[name])
    first = gates[0]
    clear_gates(gates[1:])
    assert gates[1].output is None and first.output is not None
    rate = model.gate_losses()['gate_open_rate']
    assert rate == first.output.gates.float().mean()
    clear_gates(model)
    with pytest.raises(RuntimeError, match='no gate ran'):
        model.gate_losses()


@pytest.mark.parametrize('scope,make_cfg,make_batch', CASES)
def test_zero_weight_losses_are_skipped(scope, make_cfg, make_batch,
                                        monkeypatch):
    model = build(scope, make_cfg())
    model.batch_shaping_loss.loss_weight = 0.0
    model.l0_loss.loss_weight = 0.0

    def fail(*args, **kwargs):
        raise AssertionError('a zero-weight loss was computed')

    monkeypatch.setattr(model.batch_shaping_loss, 'forward', fail)
    monkeypatch.setattr(model.l0_loss, 'forward', fail)
    model.train()
    losses = model.loss(*make_batch())
    assert 'loss_bs' not in losses and 'loss_l0' not in losses
    assert 'gate_open_rate' in losses
    model = build(scope, make_cfg(batch_shaping_loss=None, l0_loss=None))
    assert model.batch_shaping_loss is None
    assert 'loss_bs' not in model.loss(*make_batch())


@pytest.mark.parametrize('scope,make_cfg,make_batch', CASES)
def test_shaped_quantity(scope, make_cfg, make_batch):
    model = build(scope, make_cfg(shaped_quantity='relaxed'))
    model.train()
    assert 'loss_bs' in model.loss(*make_batch())
    with pytest.raises(ValueError, match="'logits'.*'probs', 'relaxed'"):
        build(scope, make_cfg(shaped_quantity='logits'))


def test_batch_shaping_loss_uses_the_gate_probabilities():
    model = build('mmpretrain', cls_model_cfg())
    model.train()
    inputs, samples = cls_batch()
    losses = model.loss(inputs, samples)
    from mmgated.models import collect_gates
    probs = torch.cat([o.probs for o in collect_gates(model).values()], 1)
    expected = BatchShapingLoss(loss_weight=0.5)(probs)
    torch.testing.assert_close(losses['loss_bs'], expected)


@pytest.mark.parametrize('scope,make_cfg,backbone', [
    ('mmseg', seg_model_cfg, dict(type='ResNetV1c', depth=18,
                                  dilations=(1, 1, 2, 4),
                                  strides=(1, 2, 1, 1), norm_cfg=NORM)),
    ('mmpretrain', cls_model_cfg, dict(type='ResNet_CIFAR', depth=18)),
])
def test_backbone_without_gates_fails_at_construction(scope, make_cfg,
                                                      backbone):
    with pytest.raises(ValueError, match='has no ChannelGate'):
        build(scope, make_cfg(backbone=backbone))


@pytest.mark.parametrize('scope,make_cfg,make_batch', CASES)
def test_predict_attaches_gate_records(scope, make_cfg, make_batch):
    model = build(scope, make_cfg())
    model.eval()
    inputs, samples = make_batch()
    with torch.no_grad():
        results = model.predict(inputs, samples)
    from mmgated.analysis import MacCounter, count_macs
    reference = count_macs(model, inputs)
    counter = MacCounter(model)
    for i, result in enumerate(results):
        gate_open = result.gate_open
        assert all(v.dtype == torch.bool for v in gate_open.values())
        assert result.model_input_shape == tuple(inputs.shape[1:])
        counted = counter(result.metainfo)
        assert counted['dense_macs'] == reference['dense']
        assert counted['conditional_macs'] == pytest.approx(
            reference['per_sample'][i].item(), rel=1e-12)


def test_gate_weight_decay_through_paramwise_cfg():
    model = build('mmpretrain', cls_model_cfg())
    optim_wrapper = build_optim_wrapper(
        model,
        dict(
            optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-4),
            paramwise_cfg=dict(custom_keys={'.gate': dict(decay_mult=0.01)})))
    decays = {}
    for group in optim_wrapper.optimizer.param_groups:
        for p in group['params']:
            decays[id(p)] = group['weight_decay']
    for name, p in model.named_parameters():
        expected = 1e-6 if '.gate' in name else 1e-4
        assert decays[id(p)] == pytest.approx(expected), name


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _gather_worker(rank, world, port, x_all, result_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        sizes = [3, 2]  # ranks may hold different batch sizes
        start = sum(sizes[:rank])
        local = x_all[start:start + sizes[rank]].clone().requires_grad_(True)
        loss = BatchShapingLoss(loss_weight=0.8)(local)
        loss.backward()
        torch.save(dict(loss=loss.detach(), grad=local.grad),
                   os.path.join(result_dir, f'rank{rank}.pth'))
    finally:
        dist.destroy_process_group()


def test_distributed_batch_shaping_sees_the_global_batch(tmp_path):
    torch.manual_seed(0)
    x_all = torch.rand(5, 4, dtype=torch.float64)
    mp.spawn(
        _gather_worker,
        args=(2, _free_port(), x_all, str(tmp_path)),
        nprocs=2,
        join=True)
    single = x_all.clone().requires_grad_(True)
    expected = BatchShapingLoss(loss_weight=0.8)(single)
    expected.backward()
    results = [torch.load(tmp_path / f'rank{r}.pth') for r in (0, 1)]
    for r in results:
        torch.testing.assert_close(r['loss'], expected.detach())
    # Each rank's gradient reaches its own part, scaled by the world size so
    # that DDP's averaging gives the gradient of the global-batch loss.
    grads = torch.cat([r['grad'] for r in results]) / 2
    torch.testing.assert_close(grads, single.grad)
