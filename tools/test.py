"""Test (and evaluate) a gated or dense model with a checkpoint.

The interface of mmseg's tools/test.py; works for the mmseg and the
mmpretrain configs of this repo::

    python tools/test.py configs/pspnet_gated_r50_cityscapes.py CKPT
"""
import argparse
import os

from mmengine.config import DictAction
from mmengine.runner import Runner

import mmgated  # noqa: F401  shims and registration
from mmgated.utils.run_config import check_config_data, load_run_config


def parse_args():
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the dir to save the evaluation results')
    parser.add_argument(
        '--out', help='the dir (mmseg) or pickle file (mmpretrain) to save '
        'the predictions to')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir', help='directory where painted images are saved')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value pairs')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument(
        '--tta', action='store_true', help='test time augmentation')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def trigger_visualization_hook(cfg, args):
    """Make the config's visualization hook draw (mmseg or mmpretrain)."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise RuntimeError('--show/--show-dir need a visualization hook in '
                           'default_hooks')
    if hook['type'].endswith('SegVisualizationHook'):
        hook['draw'] = True
        if args.show_dir:
            cfg.visualizer['save_dir'] = args.show_dir
    else:  # mmpretrain's VisualizationHook
        hook['enable'] = True
        if args.show_dir:
            hook['out_dir'] = args.show_dir
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time


def main():
    args = parse_args()
    cfg = load_run_config(args.config, args.cfg_options, args.work_dir,
                          args.launcher)
    check_config_data(cfg, splits=('test', ))
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        trigger_visualization_hook(cfg, args)
    if args.tta:
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    dump_predictions = args.out is not None and \
        cfg.get('default_scope') != 'mmseg'
    if args.out is not None and not dump_predictions:
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    runner = Runner.from_cfg(cfg)
    if dump_predictions:
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(
            DumpResults(out_file_path=args.out))
    runner.test()


if __name__ == '__main__':
    main()
