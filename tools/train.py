"""Train a gated (or dense) segmentor or classifier.

The interface of mmseg's tools/train.py; works for the mmseg and the
mmpretrain configs of this repo (and any other mmengine config)::

    python tools/train.py configs/pspnet_gated_r50_cityscapes.py
    python tools/train.py configs/resnet20_bas_cifar10.py --amp
"""
import argparse
import logging
import os

from mmengine.config import DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import mmgated  # noqa: F401  shims and registration
from mmgated.utils.run_config import (
    check_config_data, close_distributed, enable_amp, load_run_config)


def parse_args():
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
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main():
    args = parse_args()
    cfg = load_run_config(args.config, args.cfg_options, args.work_dir,
                          args.launcher)
    check_config_data(cfg)
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
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg \
        else RUNNERS.build(cfg)
    runner.train()
    close_distributed()


if __name__ == '__main__':
    main()
