"""Train a gated (or dense) segmentor or classifier.

The interface of mmseg's tools/train.py; works for the mmseg and the
mmpretrain configs of this repo (and any other mmengine config)::

    python tools/train.py configs/pspnet_gated_r50_cityscapes.py
    python tools/train.py configs/resnet20_bas_cifar10.py --amp

A work dir that already holds checkpoints is refused unless ``--resume``
or ``--force``; the checkpoint to resume (or ``load_from``) is verified
before the run (readable, and its checksum if it has one). ``--check-data``
reads every image of the train and val data once before training.
"""
import argparse
import logging
import os
import os.path as osp

from mmengine.config import DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner, find_latest_checkpoint

import mmgated  # noqa: F401  shims and registration
from mmgated.utils.checkpoint_io import read_checkpoint
from mmgated.utils.outputs import check_work_dir_free
from mmgated.utils.run_config import (check_config_data, check_config_images,
                                      close_distributed, enable_amp,
                                      load_run_config)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        const='auto',
        help='resume from the latest checkpoint in the work dir, or from '
        'the given checkpoint')
    parser.add_argument(
        '--force',
        action='store_true',
        help='start a new run in a work dir that already holds checkpoints '
        '(they may be overwritten); without it, or --resume, such a work '
        'dir is refused')
    parser.add_argument(
        '--check-data',
        action='store_true',
        help='before training, read every image (and segmentation map) of '
        'the train and val data once; stop, listing them, if any cannot be '
        'read')
    parser.add_argument(
        '--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value pairs, e.g. '
        'l0_gamma=0.1 train_cfg.max_iters=100')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def checkpoint_to_load(cfg, resume):
    """The local checkpoint file the runner will load, or None.

    Args:
        cfg (Config): The run's config (``load_from`` set as for the
            runner).
        resume (str, optional): ``--resume``: None, ``'auto'`` or a path.

    Returns:
        str or None: ``--resume``'s file (``'auto'``: the one mmengine
        finds through the work dir's ``last_checkpoint``), else
        ``load_from``; None for none or a URL (``'://'``).
    """
    if resume == 'auto':
        pointer = osp.join(cfg.work_dir, 'last_checkpoint')
        path = find_latest_checkpoint(cfg.work_dir) \
            if osp.isfile(pointer) else None
    else:
        path = cfg.get('load_from')
    return path if path and '://' not in path else None


def main(argv=None):
    args = parse_args(argv)
    cfg = load_run_config(args.config, args.cfg_options, args.work_dir,
                          args.launcher)
    # Before anything is written to the work dir (the runner creates it).
    if args.resume is None and not args.force:
        check_work_dir_free(cfg.work_dir)
    check_config_data(cfg)
    if args.check_data:
        check_config_images(cfg, ('train', 'val'))
    if args.amp:
        enable_amp(cfg)
        print_log('AMP training is enabled', logger='current',
                  level=logging.INFO)
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    checkpoint = checkpoint_to_load(cfg, args.resume)
    if checkpoint is not None:
        # A damaged file fails here, naming it; the runner loads it again
        # (from the page cache) as usual. Keys are not compared: a dense
        # checkpoint initialises a gated model without its gates.
        read_checkpoint(checkpoint)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg \
        else RUNNERS.build(cfg)
    runner.train()
    del runner  # its DDP wrapper holds the process group (close_distributed)
    close_distributed()


if __name__ == '__main__':
    main()
