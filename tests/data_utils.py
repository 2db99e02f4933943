"""Tiny synthetic datasets in the on-disk layouts the configs expect.

* :func:`make_cityscapes` writes the Cityscapes layout that mmseg's
  ``CityscapesDataset`` reads (``leftImg8bit/`` images and
  ``gtFine/*_gtFine_labelTrainIds.png`` maps, train ids 0..18 and 255).
* :func:`make_imagenet` writes the ImageNet folder layout that mmpretrain's
  ``ImageNet`` and ``CustomDataset`` read (``train/<class>/*.png``,
  ``val/<class>/*.png``) plus ``meta/{train,val}.txt``: mmpretrain's
  ``ImageNet`` checks that a folder dataset has exactly 1000 classes, but
  takes an annotation list with any labels.
* :func:`make_seg_folder` writes mmseg's custom-dataset layout
  (``img_dir/``, ``ann_dir/``) of configs/examples/.

The images are random but deterministic (seeded), small enough that a
ResNet-50 PSPNet trains a step on a CPU in seconds. The ``*_TINY_SETTINGS``
below, with :func:`write_tiny_config`, shrink a repository config to a few
CPU iterations on them.
"""
import importlib.util
import os
import os.path as osp
import re

import cv2
import numpy as np

CITYSCAPES_CITIES = {'train': ('aachen', 'bremen'), 'val': ('frankfurt', )}
IMAGENET_CLASSES = ('n01440764', 'n01443537', 'n01484850')
NUM_CITYSCAPES_CLASSES = 19


def _write_png(path, array):
    os.makedirs(osp.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, array):
        raise OSError(f'could not write {path}')


def _label_map(rng, height, width):
    """Blocky train-id map: a few classes per image and an ignored band."""
    label = np.zeros((height, width), dtype=np.uint8)
    block = 16
    for y in range(0, height, block):
        for x in range(0, width, block):
            label[y:y + block, x:x + block] = rng.integers(
                0, NUM_CITYSCAPES_CLASSES)
    label[:, :4] = 255  # ignore_index, as around the ego vehicle
    return label


def make_cityscapes(root, num_train=4, num_val=2, height=64, width=128,
                    seed=0):
    """Write a tiny Cityscapes-format dataset under ``root``.

    Layout (what ``CityscapesDataset`` with the default suffixes reads)::

        root/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
        root/gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png

    with ``<name>`` = ``<city>_<6-digit index>_000019``.

    Args:
        root (str): The dataset root (created if missing).
        num_train (int): Training images. Default: 4.
        num_val (int): Validation images. Default: 2.
        height (int): Image height. Default: 64.
        width (int): Image width. Default: 128.
        seed (int): Random seed.

    Returns:
        str: ``root``.
    """
    rng = np.random.default_rng(seed)
    for split, count in (('train', num_train), ('val', num_val)):
        cities = CITYSCAPES_CITIES[split]
        for i in range(count):
            city = cities[i % len(cities)]
            name = f'{city}_{i:06d}_000019'
            label = _label_map(rng, height, width)
            # Colour correlates with the class so the task is learnable.
            image = (label.astype(np.int32)[..., None] * 12 +
                     rng.integers(0, 30, (height, width, 3))).clip(0, 255)
            _write_png(
                osp.join(root, 'leftImg8bit', split, city,
                         f'{name}_leftImg8bit.png'), image.astype(np.uint8))
            _write_png(
                osp.join(root, 'gtFine', split, city,
                         f'{name}_gtFine_labelTrainIds.png'), label)
    return root


def make_imagenet(root, num_train=4, num_val=2, size=32, classes=None,
                  seed=0, ann_files=True):
    """Write a tiny ImageNet-format folder dataset under ``root``.

    Layout::

        root/train/<class>/<class>_<i>.png
        root/val/<class>/<class>_<i>.png
        root/meta/train.txt, root/meta/val.txt  ("<class>/<file> <label>")

    Args:
        root (str): The dataset root (created if missing).
        num_train (int): Training images per class. Default: 4.
        num_val (int): Validation images per class. Default: 2.
        size (int): Side of the square images. Default: 32.
        classes (Sequence[str], optional): Class folder names. Default:
            three ImageNet synset ids.
        seed (int): Random seed.
        ann_files (bool): Also write ``meta/{train,val}.txt``.

    Returns:
        str: ``root``.
    """
    classes = tuple(classes or IMAGENET_CLASSES)
    rng = np.random.default_rng(seed)
    for split, count in (('train', num_train), ('val', num_val)):
        lines = []
        for label, cls in enumerate(classes):
            base = np.zeros(3, dtype=np.int32)
            base[label % 3] = 200  # one dominant colour channel per class
            for i in range(count):
                image = (base + rng.integers(0, 55, (size, size, 3))).clip(
                    0, 255).astype(np.uint8)
                name = f'{cls}_{i}.png'
                _write_png(osp.join(root, split, cls, name), image)
                lines.append(f'{cls}/{name} {label}')
        if ann_files:
            os.makedirs(osp.join(root, 'meta'), exist_ok=True)
            with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
                f.write('\n'.join(lines) + '\n')
    return root


def make_seg_folder(root, classes=3, num_train=4, num_val=2, height=64,
                    width=128, img_suffix='.jpg', seg_map_suffix='.png',
                    seed=0):
    """Write a tiny mmseg "custom dataset" (``BaseSegDataset`` layout).

    Layout::

        root/img_dir/{train,val}/<name><img_suffix>
        root/ann_dir/{train,val}/<name><seg_map_suffix>   (labels 0..classes-1
                                                            and 255)

    Returns:
        str: ``root``.
    """
    rng = np.random.default_rng(seed)
    for split, count in (('train', num_train), ('val', num_val)):
        for i in range(count):
            label = np.zeros((height, width), dtype=np.uint8)
            for y in range(0, height, 16):
                for x in range(0, width, 16):
                    label[y:y + 16, x:x + 16] = rng.integers(0, classes)
            label[-2:, :] = 255
            image = (label.astype(np.int32)[..., None] * 60 +
                     rng.integers(0, 40, (height, width, 3))).clip(0, 255)
            name = f'{split}_{i:04d}'
            _write_png(
                osp.join(root, 'img_dir', split, name + img_suffix),
                image.astype(np.uint8))
            _write_png(
                osp.join(root, 'ann_dir', split, name + seg_map_suffix),
                label)
    return root


# --------------------------------------------------------------------------
# Tiny run settings: appended to a config that inherits a repo config, they
# shrink it to a few CPU iterations on the datasets above.

SEG_TINY_SETTINGS = '''
crop_size = (64, 128)
# A quarter of the recipe's widths: the same blocks, gates, heads and
# losses, 1/16 of the weights to compute, checkpoint and load.
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(stem_channels=16, base_channels=16),
    decode_head=dict(in_channels=512, channels=128),
    auxiliary_head=dict(in_channels=256, channels=64))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(128, 64), ratio_range=(0.5, 2.0),
         keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 64), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root={data_root!r}, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root={data_root!r}, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=2)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
'''

# The L0 warm-up starts at once so that loss_l0 appears within the run.
CLS_TINY_HOOKS = '''
default_hooks = dict(logger=dict(interval=1))
custom_hooks = [
    dict(type='BatchShapingWeightHook', end=2),
    dict(type='L0WeightHook', start=0, end=1),
]
'''

# For configs whose datasets read image files (ImageNet, CustomDataset):
# only the root, the image size and the run length change.
IN1K_TINY_SETTINGS = '''
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=32),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=36, edge='short'),
    dict(type='CenterCrop', crop_size=32),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root={data_root!r}, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root={data_root!r}, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_epochs=1)
''' + CLS_TINY_HOOKS

# The CIFAR recipes read the binary CIFAR batches; here a folder dataset of
# 32x32 images stands in (same model, optimizer and hooks).
CIFAR_AS_FOLDER_TINY_SETTINGS = '''
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomCrop', crop_size=32, padding=4),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root={data_root!r},
                 data_prefix='train', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root={data_root!r},
                 data_prefix='val', pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_epochs=1)
''' + CLS_TINY_HOOKS


def write_tiny_config(path, base_config, settings, data_root):
    """Write a config that inherits ``base_config`` and applies
    ``settings`` (one of the ``*_TINY_SETTINGS``) with ``data_root``.

    Returns:
        str: ``path``.
    """
    text = f'_base_ = [{osp.abspath(base_config)!r}]\n' + settings.format(
        data_root=str(data_root))
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    return str(path)


REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_script(relative_path):
    """Import a script of the repository (``tools/test.py`` would clash
    with the standard library's ``test`` package as a plain import).

    Args:
        relative_path (str): E.g. ``'tools/train.py'``.

    Returns:
        module: The script as a module, under a name of its own.
    """
    name = '_script_' + re.sub(r'\W', '_', relative_path[:-3])
    spec = importlib.util.spec_from_file_location(
        name, osp.join(REPO, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
