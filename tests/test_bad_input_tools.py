"""The command-line tools facing bad input: nothing a user made is
overwritten silently, checkpoints are written whole and verified when read,
unreadable images are found before a run.

The tools run in this process on the tiny datasets of tests/data_utils.py;
the one trained checkpoint (``r20``: ResNet20-BAS, one epoch of 3
iterations on 32x32 images) is shared.
"""
import os
import os.path as osp
import pickle
import shutil
import struct
import subprocess
import zipfile

import pytest
import torch
from mmengine.fileio import LocalBackend
from mmengine.runner import Runner

from data_utils import (CIFAR_AS_FOLDER_TINY_SETTINGS, REPO,
                        SEG_TINY_SETTINGS, load_script, make_cityscapes,
                        make_imagenet, write_tiny_config)
from mmgated.engine.hooks import CheckpointIntegrityHook
from mmgated.utils.checkpoint_io import (CHECKSUM_KEY, CheckpointError,
                                         read_checkpoint)
from mmgated.utils.data_check import UnreadableDataError
from mmgated.utils.outputs import OutputExistsError
from mmgated.utils.run_config import load_run_config

CONFIGS = osp.join(REPO, 'configs')
SEG_CONFIG = osp.join(CONFIGS, 'pspnet_gated_r50_cityscapes.py')


train_tool = load_script('tools/train.py')
test_tool = load_script('tools/test.py')
gate_stats_tool = load_script('tools/analysis_tools/gate_stats.py')


pytestmark = pytest.mark.usefixtures('one_thread')


def r20_config(path, data_root, base='resnet20_bas_cifar10.py'):
    return write_tiny_config(path, osp.join(CONFIGS, base),
                             CIFAR_AS_FOLDER_TINY_SETTINGS, data_root)


@pytest.fixture(scope='module')
def r20(tiny_imagenet, tmp_path_factory):
    """tools/train.py --check-data on the ResNet20-BAS recipe; its work dir
    and checkpoint are only read by the tests."""
    tmp = tmp_path_factory.mktemp('r20')
    cfg = r20_config(tmp / 'resnet20_bas_tiny.py', tiny_imagenet)
    work_dir = str(tmp / 'work')
    train_tool.main([cfg, '--work-dir', work_dir, '--check-data'])
    return dict(cfg=cfg, work_dir=work_dir,
                checkpoint=osp.join(work_dir, 'epoch_1.pth'))


def listing(folder):
    """Every path under ``folder`` with its size and mtime."""
    result = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = osp.join(root, name)
            result[path] = (osp.getsize(path), os.stat(path).st_mtime_ns)
    return result


def flip_a_weight_byte(src, dst):
    """Copy ``src`` with one bit of its largest tensor flipped, as a bad
    disk or copy would (torch itself loads such a file without error)."""
    data = bytearray(open(src, 'rb').read())
    with zipfile.ZipFile(src) as archive:
        entry = max((i for i in archive.infolist() if '/data/' in i.filename),
                    key=lambda i: i.file_size)
    # The local header: 30 bytes, then the name and the extra field.
    name_len, extra_len = struct.unpack(
        '<HH', data[entry.header_offset + 26:entry.header_offset + 30])
    data[entry.header_offset + 30 + name_len + extra_len + 100] ^= 0x01
    with open(dst, 'wb') as f:
        f.write(data)
    return str(dst)


# ----------------------------------------- 1. nothing is overwritten silently


def test_gate_stats_refuses_a_non_empty_out_dir(r20, tmp_path):
    out_dir = tmp_path / 'stats'
    out_dir.mkdir()
    (out_dir / 'mine.txt').write_text('keep me')
    args = [r20['cfg'], r20['checkpoint'], '--out-dir', str(out_dir)]
    with pytest.raises(OutputExistsError) as error:
        gate_stats_tool.main(args)
    assert f'--out-dir {str(out_dir)!r}' in str(error.value)
    assert '--force' in str(error.value)
    assert os.listdir(out_dir) == ['mine.txt']

    gate_stats_tool.main(args + ['--force'])
    assert (out_dir / 'gate_stats.json').is_file()
    assert (out_dir / 'mine.txt').read_text() == 'keep me'


def test_test_tool_refuses_an_existing_out(r20, tiny_cityscapes, tmp_path):
    # mmpretrain: --out is the predictions' pickle file.
    out = tmp_path / 'predictions.pkl'
    out.write_bytes(b'mine')
    args = [r20['cfg'], r20['checkpoint'], '--work-dir',
            str(tmp_path / 'test'), '--out', str(out)]
    with pytest.raises(OutputExistsError, match=f'--out {str(out)!r}'):
        test_tool.main(args)
    assert out.read_bytes() == b'mine'
    # mmseg: --out is the directory of the predicted maps.
    seg_cfg = write_tiny_config(tmp_path / 'pspnet_tiny.py', SEG_CONFIG,
                                SEG_TINY_SETTINGS,
                                tiny_cityscapes)
    out_dir = tmp_path / 'maps'
    out_dir.mkdir()
    (out_dir / 'mine.png').write_bytes(b'mine')
    with pytest.raises(OutputExistsError, match=f'--out {str(out_dir)!r}'):
        test_tool.main([seg_cfg, 'any.pth', '--out', str(out_dir)])
    assert os.listdir(out_dir) == ['mine.png']

    test_tool.main(args + ['--force'])
    with open(out, 'rb') as f:
        assert len(pickle.load(f)) == 6  # the tiny val split


def test_train_refuses_a_work_dir_with_checkpoints(r20, tmp_path):
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    shutil.copy(r20['checkpoint'], work_dir)
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'epoch_1.pth'))
    before = listing(work_dir)
    with pytest.raises(OutputExistsError) as error:
        train_tool.main([r20['cfg'], '--work-dir', str(work_dir)])
    message = str(error.value)
    assert repr(str(work_dir)) in message
    assert 'epoch_1.pth, last_checkpoint' in message
    assert '--resume' in message and '--force' in message
    assert listing(work_dir) == before  # nothing written, not even logs

    train_tool.main([r20['cfg'], '--work-dir', str(work_dir), '--force'])
    assert listing(work_dir)[str(work_dir / 'epoch_1.pth')] != \
        before[str(work_dir / 'epoch_1.pth')]


def test_demo_reruns_over_its_own_outputs(tmp_path):
    """A second demo run meets the checkpoint and plots of the first (the
    demo owns its work dir and passes --force to gate_stats)."""
    demo = load_script('tools/demo.py')
    (tmp_path / 'gate_stats').mkdir()
    (tmp_path / 'gate_stats' / 'gate_stats.json').write_text('{}')
    (tmp_path / 'epoch_1.pth').write_bytes(b'earlier run')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_1.pth'))
    demo.main(['--work-dir', str(tmp_path), '--max-samples', '20',
               '--epochs', '1'])
    assert osp.getsize(tmp_path / 'gate_stats' / 'gate_stats.json') > 100
    assert CHECKSUM_KEY in torch.load(
        tmp_path / 'epoch_1.pth', weights_only=False)['meta']


def test_checkpoints_are_replaced_atomically(r20, tmp_path, monkeypatch):
    """A save that dies half-way through writing leaves the earlier
    checkpoint intact; a complete save replaces it and leaves no temporary
    file."""
    cfg = load_run_config(r20['cfg'], work_dir=str(tmp_path))
    runner = Runner.from_cfg(cfg)
    hook, = [h for h in runner.hooks
             if isinstance(h, CheckpointIntegrityHook)]
    hook.before_run(runner)  # what runner.train() calls first
    target = tmp_path / 'epoch_1.pth'
    shutil.copy(r20['checkpoint'], target)
    earlier = target.read_bytes()

    def put_half_then_die(backend, obj, filepath):
        with open(filepath, 'wb') as f:
            f.write(obj[:len(obj) // 2])
        raise KeyboardInterrupt('killed while writing')

    save = dict(save_optimizer=False, save_param_scheduler=False)
    with monkeypatch.context() as patch:
        patch.setattr(LocalBackend, 'put', put_half_then_die)
        with pytest.raises(KeyboardInterrupt):
            runner.save_checkpoint(str(tmp_path), 'epoch_1.pth', **save)
    assert target.read_bytes() == earlier

    runner.save_checkpoint(str(tmp_path), 'epoch_1.pth', **save)
    assert target.read_bytes() != earlier
    read_checkpoint(str(target))  # complete, and its checksum matches
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


# ---------------------------------------------------- 2. checkpoint integrity


def test_damaged_checkpoint_is_an_error_naming_it(r20, tmp_path):
    meta = torch.load(r20['checkpoint'], weights_only=False)['meta']
    assert meta[CHECKSUM_KEY].startswith('sha256:')
    damaged = flip_a_weight_byte(r20['checkpoint'], tmp_path / 'damaged.pth')
    with pytest.raises(CheckpointError) as error:
        test_tool.main([r20['cfg'], damaged, '--work-dir',
                        str(tmp_path / 'test')])
    assert f'checkpoint {damaged!r} is damaged' in str(error.value)
    with pytest.raises(CheckpointError, match='is damaged'):
        train_tool.main([r20['cfg'], '--work-dir', str(tmp_path / 'work'),
                         '--resume', damaged])

    # Checkpoints without a checksum (upstream weights) are tested as ever.
    checkpoint = torch.load(r20['checkpoint'], weights_only=False)
    del checkpoint['meta'][CHECKSUM_KEY]
    plain = str(tmp_path / 'plain.pth')
    torch.save(checkpoint, plain)
    test_tool.main([r20['cfg'], plain, '--work-dir', str(tmp_path / 'test')])


def test_checkpoint_of_another_model_is_an_error(r20, tiny_imagenet,
                                                 tmp_path):
    r32_cfg = r20_config(tmp_path / 'resnet32_bas_tiny.py', tiny_imagenet,
                         'resnet32_bas_cifar10.py')
    with pytest.raises(CheckpointError) as error:
        test_tool.main([r32_cfg, r20['checkpoint'], '--work-dir',
                        str(tmp_path / 'test')])
    message = str(error.value)
    assert f"checkpoint {r20['checkpoint']!r} does not fit" in message
    # ResNet-32 has 5 blocks a stage, ResNet-20 3.
    assert 'keys the checkpoint lacks' in message
    assert 'backbone.layer1.3.' in message

    # A dense checkpoint still initialises the gated model for fine-tuning
    # (load_from; the gates' keys are missing).
    checkpoint = torch.load(r20['checkpoint'], weights_only=False)
    dense = {k: v for k, v in checkpoint['state_dict'].items()
             if '.gate' not in k}
    assert len(dense) < len(checkpoint['state_dict'])
    torch.save(dict(state_dict=dense, meta={}), tmp_path / 'dense.pth')
    work_dir = tmp_path / 'finetune'
    train_tool.main([r20['cfg'], '--work-dir', str(work_dir),
                     '--cfg-options', f'load_from={tmp_path}/dense.pth'])
    assert (work_dir / 'epoch_1.pth').is_file()


@pytest.mark.parametrize('content', [b'', os.urandom(4096)],
                         ids=['empty', 'garbage'])
def test_unreadable_checkpoint_file(r20, tmp_path, capsys, content):
    path = tmp_path / 'model.pth'
    path.write_bytes(content)
    calls = [
        (test_tool, [r20['cfg'], str(path), '--work-dir', str(tmp_path)]),
        (train_tool, [r20['cfg'], '--work-dir', str(tmp_path / 'work'),
                      '--resume', str(path)]),
    ]
    for tool, args in calls:
        with pytest.raises(CheckpointError) as error:
            tool.main(args)
        assert f'{str(path)!r} is not a readable PyTorch checkpoint' in \
            str(error.value)
        # torch's advice to load with weights_only=False is not passed on:
        # neither in the message nor as the shown cause.
        assert error.value.__suppress_context__
        output = str(error.value) + ''.join(capsys.readouterr())
        assert 'weights_only' not in output


# ------------------------------------------------------------ 3. --check-data


def test_check_data_lists_unreadable_images(tmp_path, capsys):
    # mmpretrain (img_path), through tools/train.py.
    root = make_imagenet(str(tmp_path / 'imagenet'))
    broken = osp.join(root, 'train', 'n01443537', 'n01443537_1.png')
    empty = osp.join(root, 'val', 'n01440764', 'n01440764_0.png')
    with open(broken, 'wb') as f:
        f.write(b'not a png')
    open(empty, 'wb').close()
    cfg = r20_config(tmp_path / 'resnet20_bas_tiny.py', root)
    work_dir = tmp_path / 'work'
    with pytest.raises(UnreadableDataError) as error:
        train_tool.main([cfg, '--work-dir', str(work_dir), '--check-data'])
    assert str(error.value).startswith(
        '2 of the 18 image files of the train/val data cannot be read')
    assert repr(broken) in str(error.value) and repr(empty) in \
        str(error.value)
    assert '18/18' in capsys.readouterr().out  # the progress bar
    assert not osp.exists(work_dir)

    # mmseg (img_path and seg_map_path), through tools/test.py.
    seg_root = make_cityscapes(str(tmp_path / 'cityscapes'), 1, 1)
    label = osp.join(seg_root, 'gtFine', 'val', 'frankfurt',
                     'frankfurt_000000_000019_gtFine_labelTrainIds.png')
    with open(label, 'r+b') as f:
        f.truncate(40)
    seg_cfg = write_tiny_config(tmp_path / 'pspnet_tiny.py', SEG_CONFIG,
                                SEG_TINY_SETTINGS,
                                seg_root)
    with pytest.raises(UnreadableDataError) as error:
        test_tool.main([seg_cfg, 'any.pth', '--check-data'])
    assert str(error.value).startswith(
        '1 of the 2 image files of the test data cannot be read: '
        f'{label!r}')


# ------------------------------------------------------------ 4. dist_train.sh


def test_dist_train_runs_the_python_variable(tmp_path):
    fake = tmp_path / 'python'
    record = tmp_path / 'args.txt'
    fake.write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    fake.chmod(0o755)
    subprocess.run(['bash', osp.join(REPO, 'tools', 'dist_train.sh'),
                    'cfg.py', '2', '--amp'],
                   env=dict(os.environ, PYTHON=str(fake)), check=True,
                   timeout=60)
    args = record.read_text().split()
    assert args[:2] == ['-m', 'torch.distributed.run']
    assert '--nproc_per_node=2' in args and args[-3:] == \
        ['--launcher', 'pytorch', '--amp']
    with open(osp.join(REPO, 'tools', 'dist_train.sh')) as f:
        assert '${PYTHON:-python}' in f.read().split('\nCONFIG=')[0]
