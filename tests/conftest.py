import os
import os.path as osp
import sys

import pytest
import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from data_utils import (make_cityscapes, make_imagenet,  # noqa: E402
                        make_seg_folder)

if os.environ.get('PYTEST_XDIST_WORKER'):
    # The workers (pytest.ini: -n 2) share the cores: one intra-op thread
    # each, or their OpenMP threads wait on each other's preempted threads
    # (a 0.6 s test took 23 s).
    torch.set_num_threads(1)


@pytest.fixture(scope='session')
def tiny_cityscapes(tmp_path_factory):
    """Root of a tiny Cityscapes dataset (4 train, 2 val images, 64x128)."""
    return make_cityscapes(str(tmp_path_factory.mktemp('cityscapes')))


@pytest.fixture(scope='session')
def tiny_imagenet(tmp_path_factory):
    """Root of a tiny ImageNet folder dataset (3 classes x 4 train / 2 val
    images, 32x32, with meta/train.txt and meta/val.txt)."""
    return make_imagenet(str(tmp_path_factory.mktemp('imagenet')))


@pytest.fixture(scope='session')
def tiny_seg_folder(tmp_path_factory):
    """Root of a tiny mmseg custom dataset (img_dir/ *.jpg, ann_dir/ *.png,
    3 classes, 4 train / 2 val images of 64x128)."""
    return make_seg_folder(str(tmp_path_factory.mktemp('seg_folder')))


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for a module of tiny models: as fast, and far
    faster when other processes share the cores (no OpenMP barriers
    waiting on a preempted thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
