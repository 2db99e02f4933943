"""Schedules of the gate-loss weights, in isolation and inside a runner."""
import glob
import json
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from mmengine.registry import DATASETS
from mmengine.runner import Runner

from mmgated.engine import BatchShapingWeightHook, L0WeightHook


def test_batch_shaping_schedule_boundaries():
    hook = BatchShapingWeightHook(start_weight=0.75, end=100)
    assert hook.weight_at(0) == 0.75
    assert hook.weight_at(50) == pytest.approx(0.375)
    assert hook.weight_at(99.99) == pytest.approx(0.75 * 1e-4)
    assert hook.weight_at(100) == 0.0
    assert hook.weight_at(150) == 0.0
    constant = BatchShapingWeightHook(start_weight=0.2, end=None)
    assert constant.weight_at(0) == constant.weight_at(1e6) == 0.2


def test_l0_schedule_boundaries():
    hook = L0WeightHook(start=100, end=300, gamma=0.1)
    assert hook.weight_at(0) == 0.0
    assert hook.weight_at(99.999) == 0.0
    assert hook.weight_at(100) == 0.0
    assert hook.weight_at(100.5) == pytest.approx(0.1 * 0.5 / 200)
    assert hook.weight_at(200) == pytest.approx(0.05)
    assert hook.weight_at(299.9) == pytest.approx(0.1 * 199.9 / 200)
    assert hook.weight_at(300) == 0.1
    assert hook.weight_at(500) == 0.1
    step = L0WeightHook(start=10, end=10, gamma=0.3)
    assert step.weight_at(9.99) == 0.0 and step.weight_at(10) == 0.3


def test_progress_by_epoch_is_fractional_and_by_iter_is_iter():
    runner = SimpleNamespace(iter=25, train_dataloader=[None] * 10)
    assert L0WeightHook(0, 1, gamma=1).progress(runner) == 2.5
    assert L0WeightHook(0, 1, gamma=1, by_epoch=False).progress(runner) == 25


@pytest.mark.parametrize('kwargs,match', [
    (dict(start=5, end=2, gamma=0.1), 'end=2 must not be before start=5'),
    (dict(start=-1, end=2, gamma=0.1), r'start=-1 is invalid; allowed: a '
     'finite number >= 0'),
    (dict(start=0, end=2, gamma='0.1'), "gamma='0.1' is invalid"),
])
def test_l0_hook_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        L0WeightHook(**kwargs)


def test_batch_shaping_hook_bad_arguments():
    with pytest.raises(ValueError, match='end must be > 0'):
        BatchShapingWeightHook(end=0)
    with pytest.raises(ValueError, match='start_weight=-0.5 is invalid'):
        BatchShapingWeightHook(start_weight=-0.5)


@DATASETS.register_module(force=True)
class TinyRandomClsDataset(torch.utils.data.Dataset):
    """A fixed set of random 16x16 images with 3 labels."""

    def __init__(self, num_samples=12):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(
            0, 255, (num_samples, 3, 16, 16), generator=generator,
            dtype=torch.uint8)
        self.metainfo = dict(classes=('a', 'b', 'c'))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from mmpretrain.structures import DataSample
        return dict(
            inputs=self.images[index],
            data_samples=DataSample().set_gt_label(index % 3))


def make_runner(work_dir, max_epochs, resume_from=None, hooks=None):
    model = dict(
        type='GatedImageClassifier',
        data_preprocessor=dict(
            type='ClsDataPreprocessor', mean=[0, 0, 0], std=[255] * 3),
        backbone=dict(type='GatedResNetCifar', depth=20),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=3, in_channels=64),
        batch_shaping_loss=dict(type='BatchShapingLoss', loss_weight=0.75),
        l0_loss=dict(type='GateL0Loss', loss_weight=0.0))
    return Runner(
        model=model,
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=dict(type='TinyRandomClsDataset'),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=4,
            num_workers=0),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        custom_hooks=hooks or [
            dict(type='BatchShapingWeightHook', end=2),
            dict(type='L0WeightHook', start=1, end=3),
        ],
        default_hooks=dict(
            logger=dict(type='LoggerHook', interval=1),
            checkpoint=dict(type='CheckpointHook', interval=1)),
        visualizer=dict(
            type='Visualizer', vis_backends=[dict(type='LocalVisBackend')]),
        default_scope='mmpretrain',
        randomness=dict(seed=0),
        cfg=dict(l0_gamma=0.2),
        # Runs started in the same second would otherwise share mmengine's
        # visualizer instance (named after the time) and its files.
        experiment_name=f'{osp.basename(str(work_dir))}-{max_epochs}',
        load_from=resume_from,
        resume=resume_from is not None)


def logged(work_dir):
    (path, ) = glob.glob(osp.join(str(work_dir), '*', 'vis_data',
                                  'scalars.json'))
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_weights_logged_and_resume_continues_the_schedule(tmp_path):
    make_runner(tmp_path / 'full', max_epochs=4).train()
    full = {r['iter']: r for r in logged(tmp_path / 'full') if 'loss' in r}
    # 3 iterations an epoch: lambda 0.75 -> 0 by epoch 2, L0 from 1 to 3.
    assert full[1]['bs_weight'] == pytest.approx(0.75)
    assert full[4]['bs_weight'] == pytest.approx(0.75 * (1 - 1 / 2))
    assert full[7]['bs_weight'] == 0 and 'loss_bs' not in full[7]
    assert full[3]['l0_weight'] == 0 and 'loss_l0' not in full[3]
    assert full[6]['l0_weight'] == pytest.approx(0.2 * (5 / 3 - 1) / 2)
    assert full[12]['l0_weight'] == pytest.approx(0.2)
    assert 'loss_l0' in full[12] and 'gate_open_rate' in full[12]

    make_runner(tmp_path / 'first', max_epochs=2).train()
    checkpoint = str(tmp_path / 'first' / 'epoch_2.pth')
    make_runner(tmp_path / 'resumed', max_epochs=4,
                resume_from=checkpoint).train()
    resumed = {r['iter']: r
               for r in logged(tmp_path / 'resumed') if 'loss' in r}
    assert min(resumed) == 7  # continued after iteration 6
    for it in range(7, 13):
        assert resumed[it]['bs_weight'] == pytest.approx(
            full[it]['bs_weight'])
        assert resumed[it]['l0_weight'] == pytest.approx(
            full[it]['l0_weight'])


def test_l0_hook_without_gamma_needs_l0_gamma(tmp_path):
    runner = make_runner(tmp_path, max_epochs=1,
                         hooks=[dict(type='L0WeightHook', start=0, end=1)])
    runner.cfg.pop('l0_gamma')
    with pytest.raises(KeyError, match='top-level l0_gamma'):
        runner.train()


def test_hook_on_a_model_without_the_loss(tmp_path):
    runner = make_runner(tmp_path, max_epochs=1)
    runner.model.l0_loss = None
    with pytest.raises(RuntimeError, match='model.l0_loss'):
        runner.train()
