import os.path as osp
import sys

import pytest

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from data_utils import (make_cityscapes, make_imagenet,  # noqa: E402
                        make_seg_folder)


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
