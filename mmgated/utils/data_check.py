"""Fail before training when a dataset is missing, misplaced or damaged.

mmseg and mmpretrain datasets only notice a wrong path deep inside the
runner (or, for CIFAR, try to download). :func:`check_datasets` looks at the
dataset configs first and names the path it expected and how to prepare it.
:func:`find_unreadable_images` (``--check-data`` of the tools) reads every
image of the built datasets once, so that a damaged file is found before
hours of training rather than when a worker reaches it.
"""
import copy
import os
import os.path as osp
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, List, Optional, Tuple

import cv2
import numpy as np
from mmengine import fileio
from mmengine.registry import DATASETS, DefaultScope
from mmengine.utils import ProgressBar

PREPARE_DOCS = 'docs/data_preparation.md'

HINTS = {
    'CityscapesDataset':
    'download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from '
    'the Cityscapes website, unzip them into {root} and create the '
    '*_labelTrainIds.png maps with `pip install cityscapesscripts && '
    'CITYSCAPES_DATASET={root} csCreateTrainIdLabelImgs`',
    'ADE20KDataset':
    'unzip ADEChallengeData2016.zip so that {root}/images and '
    '{root}/annotations exist',
    'ImageNet':
    'put the images under {root}/train/<class>/*.JPEG and {root}/val/... '
    '(or list them in {root}/meta/train.txt, val.txt)',
    'CustomDataset':
    'put the images under {root}/<class>/* or give an ann_file',
    'CIFAR10':
    'download and unpack cifar-10-python.tar.gz into {root} (it then holds '
    'cifar-10-batches-py/), or set download=True with internet access',
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset path of a config does not exist."""


class UnreadableDataError(ValueError):
    """Files of a dataset cannot be read as images."""


def _fail(dataset_type, path, root):
    hint = HINTS.get(dataset_type, 'prepare the dataset there')
    raise DatasetNotFoundError(
        f'{dataset_type}: expected {path!r}, which does not exist. To '
        f'prepare it: {hint.format(root=root)}. See {PREPARE_DOCS}, or point '
        'the config at your copy with --cfg-options '
        '<split>_dataloader.dataset.data_root=PATH')


def _join(root, path):
    return path if not root or osp.isabs(path) else osp.join(root, path)


def _has_file_with_suffix(directory, suffix):
    for _, _, files in os.walk(directory):
        if any(f.endswith(suffix) for f in files):
            return True
    return False


def check_dataset(cfg: dict) -> None:
    """Check the paths of one dataset config.

    Wrapper datasets (``dataset=`` / ``datasets=``) are checked recursively.

    Args:
        cfg (dict): A dataset config as in ``train_dataloader.dataset``.

    Raises:
        DatasetNotFoundError: A path the dataset needs does not exist.
    """
    if 'dataset' in cfg:
        check_dataset(cfg['dataset'])
        return
    if 'datasets' in cfg:
        for sub in cfg['datasets']:
            check_dataset(sub)
        return
    dataset_type = str(cfg.get('type', 'dataset'))
    root = cfg.get('data_root', '') or ''
    if root and not osp.isdir(root):
        _fail(dataset_type, root, root)
    if dataset_type == 'CIFAR10' or dataset_type == 'CIFAR100':
        folder = osp.join(root, 'cifar-10-batches-py'
                          if dataset_type == 'CIFAR10' else 'cifar-100-python')
        if not osp.isdir(folder) and not cfg.get('download', True):
            _fail(dataset_type, folder, root)
        return
    ann_file = cfg.get('ann_file') or ''
    if ann_file and not osp.isfile(_join(root, ann_file)):
        _fail(dataset_type, _join(root, ann_file), root)
    prefix = cfg.get('data_prefix') or {}
    if isinstance(prefix, str):
        prefix = dict(img_path=prefix)
    for key, sub in prefix.items():
        path = _join(root, sub)
        if sub and not osp.exists(path):
            _fail(dataset_type, path, root)
    split = cfg.get('split')
    if split and not prefix and not ann_file:
        # mmpretrain's ImageNet: {root}/{split}/ or {root}/meta/{split}.txt
        if not (osp.isdir(osp.join(root, split))
                or osp.isfile(osp.join(root, 'meta', f'{split}.txt'))):
            _fail(dataset_type, osp.join(root, split), root)
    suffix = cfg.get('seg_map_suffix')
    seg_dir = prefix.get('seg_map_path')
    if dataset_type == 'CityscapesDataset' and seg_dir:
        suffix = suffix or '_gtFine_labelTrainIds.png'
        if not _has_file_with_suffix(_join(root, seg_dir), suffix):
            _fail(dataset_type, f'{_join(root, seg_dir)}/**/*{suffix}', root)


def check_datasets(cfgs: Iterable[dict]) -> None:
    """Check several dataset configs; see :func:`check_dataset`."""
    for cfg in cfgs:
        check_dataset(cfg)


# The files of a sample: mmpretrain's and mmseg's image, mmseg's label map.
FILE_KEYS = ('img_path', 'seg_map_path')


def build_dataset(cfg: dict, scope: Optional[str] = None):
    """Build a dataset config in the registry of ``scope`` (the config's
    ``default_scope``: ``'mmseg'`` or ``'mmpretrain'``), as the Runner
    does."""
    with DefaultScope.overwrite_default_scope(scope):
        return DATASETS.build(copy.deepcopy(cfg))


def dataset_files(dataset) -> List[str]:
    """The image and label-map paths of every sample of a built dataset.

    Read from the annotations (``get_data_info``), without running the
    pipeline. Wrappers (``ConcatDataset``, ``RepeatDataset``, ...) are
    looked through; samples without a path (CIFAR's arrays) add nothing.
    """
    if hasattr(dataset, 'datasets'):
        return [f for sub in dataset.datasets for f in dataset_files(sub)]
    if hasattr(dataset, 'dataset'):
        return dataset_files(dataset.dataset)
    dataset.full_init()
    files = []
    for index in range(len(dataset)):
        info = dataset.get_data_info(index)
        files += [info[key] for key in FILE_KEYS if info.get(key)]
    return files


def _read_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be read as an image, or None if it can."""
    try:
        data = np.frombuffer(fileio.get(path), np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size \
            else None
    except Exception as error:  # missing file, I/O or decoder error
        return f'{type(error).__name__}: {error}'
    return None if image is not None else 'not a decodable image'


def find_unreadable_images(files: Iterable[str],
                           workers: int = 8) -> List[Tuple[str, str]]:
    """Read and decode every file once, with a progress bar on stdout.

    Args:
        files (Iterable[str]): Image paths (local or of an mmengine file
            backend).
        workers (int): Reading threads (OpenCV decodes without the GIL).

    Returns:
        list[tuple[str, str]]: ``(path, reason)`` of the unreadable files.
    """
    files = list(files)
    bar = ProgressBar(len(files), file=sys.stdout)
    problems = []
    with ThreadPoolExecutor(min(workers, os.cpu_count() or 1)) as pool:
        for path, problem in zip(files, pool.map(_read_problem, files)):
            bar.update()
            if problem is not None:
                problems.append((path, problem))
    sys.stdout.write('\n')
    return problems
