"""The configs of configs/examples/ (docs/new_dataset.md) train on tiny
data of their documented layouts."""
import os.path as osp

from data_utils import IN1K_TINY_SETTINGS, SEG_TINY_SETTINGS, \
    write_tiny_config
from test_train_e2e import (CONFIGS, assert_gate_scalars, run, scalars,
                            train_records)

EXAMPLES = osp.join(CONFIGS, 'examples')


def test_pspnet_custom_dataset_example(tiny_seg_folder, tmp_path):
    cfg = write_tiny_config(
        tmp_path / 'seg_example_tiny.py',
        osp.join(EXAMPLES, 'pspnet_gated_r50_custom_dataset.py'),
        SEG_TINY_SETTINGS, tiny_seg_folder)
    work_dir = str(tmp_path / 'work')
    proc = run([
        'tools/train.py', cfg, '--work-dir', work_dir, '--cfg-options',
        'train_cfg.max_iters=1', 'train_cfg.val_interval=1',
        'default_hooks.checkpoint.interval=1'
    ])
    assert osp.isfile(osp.join(work_dir, 'iter_1.pth'))
    # The dataset is the example's: 3 classes from its metainfo.
    assert 'vehicle' in proc.stdout and 'road' in proc.stdout
    records = scalars(work_dir)
    assert len(train_records(records)) == 1
    assert_gate_scalars(records, with_l0=False)
    assert any('mIoU' in r for r in records), records


def test_resnet34_custom_folder_example(tiny_imagenet, tmp_path):
    cfg = write_tiny_config(
        tmp_path / 'cls_example_tiny.py',
        osp.join(EXAMPLES, 'resnet34_bas_custom_folder.py'),
        IN1K_TINY_SETTINGS, tiny_imagenet)
    work_dir = str(tmp_path / 'work')
    # One step: the 12 training images in one batch.
    run([
        'tools/train.py', cfg, '--work-dir', work_dir, '--cfg-options',
        'train_dataloader.batch_size=12'
    ])
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))
    records = scalars(work_dir)
    assert len(train_records(records)) == 1
    assert_gate_scalars(records, with_l0=False)
    assert any('accuracy/top1' in r for r in records), records
