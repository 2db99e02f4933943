"""The paper's recipes trained end to end on tiny data, on the CPU.

Each main config is inherited by a tiny config (tests/data_utils.py: crop
64x128 or images 32x32, batch 2-4, 2 iterations or 1 epoch, no workers) and
run through the command-line tools as a user would: tools/train.py (train,
validate, checkpoint), --resume, tools/test.py, ``mim train``/``mim test``
with mmpretrain's own scripts, and a 2-process gloo run.
"""
import glob
import json
import math
import os
import os.path as osp
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from data_utils import (CIFAR_AS_FOLDER_TINY_SETTINGS, IN1K_TINY_SETTINGS,
                        SEG_TINY_SETTINGS, make_cityscapes, write_tiny_config)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(REPO, 'configs')
SEG_CONFIG = osp.join(CONFIGS, 'pspnet_gated_r50_cityscapes.py')
IN1K_CONFIG = osp.join(CONFIGS, 'resnet34_bas_in1k.py')
CIFAR_CONFIG = osp.join(CONFIGS, 'resnet20_bas_cifar10.py')

GATE_SCALARS = {'loss_bs', 'bs_weight', 'gate_open_rate'}
L0_SCALARS = {'loss_l0', 'l0_weight'}
# On a CPU, more intra-op threads than cores make the runs several times
# slower; torchrun sets 1 as well.
ENV = dict(
    os.environ,
    OMP_NUM_THREADS='1',
    MKL_NUM_THREADS='1',
    PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get('PYTHONPATH')) if p),
    PATH=os.pathsep.join((osp.dirname(sys.executable), os.environ['PATH'])))


def run(args, timeout=300, expect_ok=True):
    """Run ``python ARGS`` in the repository; returns stdout + stderr."""
    proc = subprocess.run([sys.executable, *args],
                          cwd=REPO,
                          env=ENV,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT,
                          text=True,
                          timeout=timeout)
    if expect_ok and proc.returncode != 0:
        pytest.fail(f'{" ".join(args)} exited with {proc.returncode}:\n'
                    f'{proc.stdout[-6000:]}')
    return proc


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def scalars(work_dir, run_index=-1):
    """The records of vis_data/scalars.json of one run in ``work_dir``."""
    files = sorted(
        glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    assert files, f'no vis_data/scalars.json under {work_dir}'
    with open(files[run_index]) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_records(records):
    return [r for r in records if 'loss' in r]


def assert_gate_scalars(records, with_l0):
    train = train_records(records)
    assert train, records
    keys = set().union(*train)
    expected = GATE_SCALARS | (L0_SCALARS if with_l0 else set())
    assert expected <= keys, f'missing {expected - keys} in {sorted(keys)}'
    for record in train:
        assert 0.0 <= record['gate_open_rate'] <= 1.0
    if with_l0:
        assert max(r['l0_weight'] for r in train) > 0
        assert all('loss_l0' in r for r in train if r['l0_weight'] > 0)


def checkpoint_meta(path):
    """The ``meta`` of a checkpoint written by these tests (trusted; mmap
    leaves the 400 MB of PSPNet tensors unread)."""
    return torch.load(
        path, map_location='cpu', mmap=True, weights_only=False)['meta']


def last_checkpoint(work_dir):
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


@pytest.fixture(scope='module')
def seg_run(tiny_cityscapes, tmp_path_factory):
    """tools/train.py on the gated PSPNet recipe: 2 iterations, validation
    at iteration 2."""
    tmp = tmp_path_factory.mktemp('seg')
    cfg = write_tiny_config(tmp / 'pspnet_tiny.py', SEG_CONFIG,
                            SEG_TINY_SETTINGS, tiny_cityscapes)
    work_dir = str(tmp / 'work')
    proc = run(['tools/train.py', cfg, '--work-dir', work_dir])
    return dict(cfg=cfg, work_dir=work_dir, output=proc.stdout)


@pytest.fixture(scope='module')
def in1k_run(tiny_imagenet, tmp_path_factory):
    """tools/train.py on the ResNet34-BAS recipe: 1 epoch of 3 iterations."""
    tmp = tmp_path_factory.mktemp('in1k')
    cfg = write_tiny_config(tmp / 'resnet34_bas_tiny.py', IN1K_CONFIG,
                            IN1K_TINY_SETTINGS, tiny_imagenet)
    work_dir = str(tmp / 'work')
    proc = run(['tools/train.py', cfg, '--work-dir', work_dir])
    return dict(cfg=cfg, work_dir=work_dir, output=proc.stdout)


# --------------------------------------------------------------- segmentation


def test_seg_train_validates_and_checkpoints(seg_run):
    work_dir = seg_run['work_dir']
    assert osp.isfile(osp.join(work_dir, 'iter_2.pth'))
    assert checkpoint_meta(osp.join(work_dir, 'iter_2.pth'))['iter'] == 2
    records = scalars(work_dir)
    assert_gate_scalars(records, with_l0=False)
    assert [r['iter'] for r in train_records(records)] == [1, 2]
    assert any('mIoU' in r for r in records), records
    assert 'Iter(val)' in seg_run['output']


def test_seg_resume(seg_run, tmp_path):
    work_dir = str(tmp_path / 'work')
    # A copy of the first run's work dir, so the other tests keep theirs.
    os.makedirs(work_dir)
    shutil.copy(osp.join(seg_run['work_dir'], 'iter_2.pth'), work_dir)
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(osp.join(work_dir, 'iter_2.pth'))
    proc = run([
        'tools/train.py', seg_run['cfg'], '--work-dir', work_dir, '--resume',
        '--cfg-options', 'train_cfg.max_iters=4'
    ])
    assert re.search(r'resumed epoch: \d+, iter: 2\b', proc.stdout), \
        proc.stdout[-3000:]
    assert last_checkpoint(work_dir).endswith('iter_4.pth')
    assert checkpoint_meta(osp.join(work_dir, 'iter_4.pth'))['iter'] == 4
    records = scalars(work_dir)
    assert [r['iter'] for r in train_records(records)] == [3, 4]
    assert_gate_scalars(records, with_l0=False)


def test_seg_test_tool_reports_miou(seg_run, tmp_path):
    proc = run([
        'tools/test.py', seg_run['cfg'],
        osp.join(seg_run['work_dir'], 'iter_2.pth'), '--work-dir',
        str(tmp_path)
    ])
    assert re.search(r'mIoU: [\d.]+', proc.stdout), proc.stdout[-3000:]
    assert 'aAcc' in proc.stdout


# ------------------------------------------------------------- classification


def test_in1k_train_validates_and_checkpoints(in1k_run):
    work_dir = in1k_run['work_dir']
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))
    records = scalars(work_dir)
    assert_gate_scalars(records, with_l0=True)
    assert any('accuracy/top1' in r for r in records), records


def test_in1k_resume(in1k_run, tmp_path):
    work_dir = str(tmp_path / 'work')
    os.makedirs(work_dir)
    shutil.copy(osp.join(in1k_run['work_dir'], 'epoch_1.pth'), work_dir)
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(osp.join(work_dir, 'epoch_1.pth'))
    proc = run([
        'tools/train.py', in1k_run['cfg'], '--work-dir', work_dir,
        '--resume', '--cfg-options', 'train_cfg.max_epochs=2'
    ])
    assert re.search(r'resumed epoch: 1, iter: 3\b', proc.stdout), \
        proc.stdout[-3000:]
    assert last_checkpoint(work_dir).endswith('epoch_2.pth')
    meta = checkpoint_meta(osp.join(work_dir, 'epoch_2.pth'))
    assert (meta['epoch'], meta['iter']) == (2, 6)
    records = scalars(work_dir)
    assert [r['iter'] for r in train_records(records)] == [4, 5, 6]
    # The schedules continue from the resumed progress: BS weight 0.75 ->
    # 0 by epoch 2, so it is below half of 0.75 in the second epoch.
    assert all(r['bs_weight'] <= 0.375 for r in train_records(records))
    assert_gate_scalars(records, with_l0=True)


def test_in1k_test_tool_reports_accuracy(in1k_run, tmp_path):
    proc = run([
        'tools/test.py', in1k_run['cfg'],
        osp.join(in1k_run['work_dir'], 'epoch_1.pth'), '--work-dir',
        str(tmp_path)
    ])
    assert re.search(r'accuracy/top1: [\d.]+', proc.stdout), \
        proc.stdout[-3000:]
    assert 'accuracy/top5' in proc.stdout


def test_cifar_recipe_on_folder_dataset(tiny_imagenet, tmp_path):
    cfg = write_tiny_config(tmp_path / 'resnet20_bas_tiny.py', CIFAR_CONFIG,
                            CIFAR_AS_FOLDER_TINY_SETTINGS, tiny_imagenet)
    work_dir = str(tmp_path / 'work')
    run(['tools/train.py', cfg, '--work-dir', work_dir])
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))
    records = scalars(work_dir)
    assert_gate_scalars(records, with_l0=True)
    assert any('accuracy/top1' in r for r in records), records


def test_cifar_recipe_compiled(tiny_imagenet, tmp_path):
    """``compile=True`` (mmengine compiles the model's train_step with
    torch.compile) trains the gated ResNet-20 in mask mode with both gate
    losses: 3 iterations, finite losses, the gate scalars logged."""
    cfg = write_tiny_config(tmp_path / 'resnet20_bas_tiny.py', CIFAR_CONFIG,
                            CIFAR_AS_FOLDER_TINY_SETTINGS, tiny_imagenet)
    work_dir = str(tmp_path / 'work')
    # The tiny hooks weigh L0 from the second iteration: the step is
    # compiled with and without it.
    proc = run([
        'tools/train.py', cfg, '--work-dir', work_dir, '--cfg-options',
        'compile=True', 'val_cfg=None', 'val_dataloader=None',
        'val_evaluator=None'
    ], timeout=600)
    assert 'compile' in proc.stdout
    records = train_records(scalars(work_dir))
    assert [r['iter'] for r in records] == [1, 2, 3]
    assert_gate_scalars(records, with_l0=True)
    for record in records:
        for key in ('loss', 'loss_bs', 'loss_l0'):
            assert math.isfinite(record.get(key, 0.0)), record
    # assert_gate_scalars: L0 is weighed (and logged) in some iteration.
    assert any('loss_l0' in record for record in records), records


def test_mim_train_and_test_mmpretrain(in1k_run, tmp_path):
    """``mim`` runs mmpretrain's own tools/train.py and tools/test.py; the
    config's custom_imports bring in mmgated."""
    work_dir = str(tmp_path / 'work')
    run([
        '-m', 'mim', 'train', 'mmpretrain', in1k_run['cfg'], '--work-dir',
        work_dir, '--cfg-options', 'train_cfg.max_epochs=1'
    ])
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(ckpt)
    assert_gate_scalars(scalars(work_dir), with_l0=True)
    proc = run([
        '-m', 'mim', 'test', 'mmpretrain', in1k_run['cfg'], '--checkpoint',
        ckpt, '--work-dir',
        str(tmp_path / 'test')
    ])
    assert re.search(r'accuracy/top1: [\d.]+', proc.stdout), \
        proc.stdout[-3000:]


# ---------------------------------------------------------------- distributed


def test_distributed_gloo_classification(in1k_run, tmp_path):
    """2 CPU processes through torchrun and tools/train.py
    --launcher pytorch (mmgated.utils.run_config lets mmengine start them
    without CUDA)."""
    work_dir = str(tmp_path / 'work')
    proc = run([
        '-m', 'torch.distributed.run', '--nproc_per_node', '2',
        '--master_port',
        str(free_port()), 'tools/train.py', in1k_run['cfg'],
        '--launcher', 'pytorch', '--work-dir', work_dir, '--cfg-options',
        'env_cfg.dist_cfg.backend=gloo'
    ])
    assert 'Distributed training: True' in proc.stdout
    assert 'GPU number: 2' in proc.stdout  # mmengine's name for world size
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))
    records = scalars(work_dir)
    assert_gate_scalars(records, with_l0=True)
    # 12 images, 2 processes x 4 per batch: 2 iterations.
    assert [r['iter'] for r in train_records(records)] == [1, 2]


def test_distributed_gloo_segmentation(seg_run, tmp_path):
    """tools/dist_train.sh with the gated PSPNet. SyncBN needs CUDA in
    torch's DDP ("SyncBatchNorm layers only work with GPU modules"), so the
    CPU run uses BN."""
    work_dir = str(tmp_path / 'work')
    proc = subprocess.run([
        'bash', 'tools/dist_train.sh', seg_run['cfg'], '2', '--work-dir',
        work_dir, '--cfg-options', 'env_cfg.dist_cfg.backend=gloo',
        'model.backbone.norm_cfg.type=BN',
        'model.decode_head.norm_cfg.type=BN',
        'model.auxiliary_head.norm_cfg.type=BN'
    ],
                          cwd=REPO,
                          env=dict(ENV, PORT=str(free_port())),
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert 'Distributed training: True' in proc.stdout
    assert osp.isfile(osp.join(work_dir, 'iter_2.pth'))
    assert_gate_scalars(scalars(work_dir), with_l0=False)


# -------------------------------------------------------------- missing data


@pytest.mark.parametrize('config,split_key', [
    (SEG_CONFIG, 'CityscapesDataset'),
    (IN1K_CONFIG, 'ImageNet'),
])
def test_missing_dataset_fails_before_training(config, split_key, tmp_path):
    missing = str(tmp_path / 'no_such_dataset')
    proc = run([
        'tools/train.py', config, '--work-dir',
        str(tmp_path / 'work'), '--cfg-options',
        f'train_dataloader.dataset.data_root={missing}'
    ],
               expect_ok=False)
    assert proc.returncode != 0
    assert 'DatasetNotFoundError' in proc.stdout, proc.stdout[-3000:]
    assert f'{split_key}: expected {missing!r}' in proc.stdout
    assert 'docs/data_preparation.md' in proc.stdout
    assert 'Iter(train)' not in proc.stdout
    assert 'Epoch(train)' not in proc.stdout
    assert not glob.glob(osp.join(str(tmp_path / 'work'), '*.pth'))


def test_cityscapes_without_train_ids_fails_before_training(tmp_path):
    """The images are there but csCreateTrainIdLabelImgs was not run."""
    root = make_cityscapes(str(tmp_path / 'cityscapes'), 1, 1)
    for path in glob.glob(
            osp.join(root, 'gtFine', '**', '*_labelTrainIds.png'),
            recursive=True):
        os.rename(path, path.replace('_labelTrainIds', '_labelIds'))
    proc = run(['tools/train.py', SEG_CONFIG, '--work-dir',
                str(tmp_path / 'work'), '--cfg-options'] + [
                    f'{split}_dataloader.dataset.data_root={root}'
                    for split in ('train', 'val', 'test')
                ],
               expect_ok=False)
    assert proc.returncode != 0
    expected = osp.join(root, 'gtFine', 'train',
                        '**', '*_gtFine_labelTrainIds.png')
    assert f'expected {expected!r}' in proc.stdout, proc.stdout[-3000:]
    assert 'csCreateTrainIdLabelImgs' in proc.stdout
    assert 'Iter(train)' not in proc.stdout


def test_close_distributed_destroys_the_process_group(tmp_path):
    """tools/train.py and tools/test.py end with close_distributed: a gloo
    group left alive can abort its process at exit. The group must really
    go, so a DDP wrapper that a released runner kept in a reference cycle
    is freed first."""
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mmgated.utils.run_config import close_distributed

    def alive_wrappers():
        return sum(isinstance(o, DistributedDataParallel)
                   for o in gc.get_objects())

    close_distributed()  # nothing to close: no error
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store',
                            rank=0, world_size=1)
    assert dist.is_initialized()
    runner = dict(model=DistributedDataParallel(torch.nn.Linear(3, 2)))
    runner['self'] = runner  # a reference cycle, as the runner's hooks make
    runner['model'](torch.randn(4, 3)).sum().backward()
    before = alive_wrappers()
    gc.disable()  # only close_distributed may collect the cycle
    try:
        del runner
        assert alive_wrappers() == before
        close_distributed()
    finally:
        gc.enable()
    assert alive_wrappers() == before - 1
    assert not dist.is_initialized()
