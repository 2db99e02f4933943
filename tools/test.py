"""Test (and evaluate) a gated or dense model with a checkpoint.

The interface of mmseg's tools/test.py; works for the mmseg and the
mmpretrain configs of this repo::

    python tools/test.py configs/pspnet_gated_r50_cityscapes.py CKPT

The checkpoint is verified before the test (readable, its checksum if it
has one, and its keys and shapes against the model's). An existing
``--out`` is refused unless ``--force``. ``--check-data`` reads every image
of the test data once first.
"""
import argparse
import os
import time

import torch
from mmengine.config import DictAction
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import Runner

import mmgated  # noqa: F401  shims and registration
from mmgated.utils.checkpoint_io import (check_state_dict_matches,
                                         read_checkpoint)
from mmgated.utils.outputs import check_output_free
from mmgated.utils.run_config import (check_config_data, check_config_images,
                                      close_distributed, load_run_config)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the dir to save the evaluation results')
    parser.add_argument(
        '--out', help='the dir (mmseg) or pickle file (mmpretrain) to save '
        'the predictions to')
    parser.add_argument(
        '--force',
        action='store_true',
        help='overwrite an existing --out file or non-empty --out dir')
    parser.add_argument(
        '--check-data',
        action='store_true',
        help='before testing, read every image (and segmentation map) of '
        'the test data once; stop, listing them, if any cannot be read')
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
    parser.add_argument(
        '--gate-execution',
        choices=['mask', 'skip'],
        help="run the gated blocks in 'mask' execution (all channels, "
        "closed ones zeroed) or 'skip' execution (open channels only) and "
        'log the speed of the test loop')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
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


class _TestSpeedHook(Hook):
    """Time each test iteration (model forward and evaluator update; the
    data loading before it is left out)."""

    priority = 'VERY_LOW'

    def __init__(self):
        self.times = []
        self.images = 0
        self._start = None

    @staticmethod
    def _sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def before_test_iter(self, runner, batch_idx, data_batch=None):
        self._sync()
        self._start = time.perf_counter()

    def after_test_iter(self, runner, batch_idx, data_batch=None,
                        outputs=None):
        self._sync()
        self.times.append(time.perf_counter() - self._start)
        self.images += len(outputs) if outputs is not None else 0


def _log_test_speed(hook, mode, wall):
    if not hook.times:
        print_log(f'gate execution {mode!r}: no test iteration ran',
                  logger='current')
        return
    busy = sum(hook.times)
    median = sorted(hook.times)[len(hook.times) // 2]
    # The first batch of a gated model also traces it once to count its
    # dense MACs (GateMetric); the median leaves that out.
    print_log(
        f'gate execution {mode!r}: {hook.images} images in '
        f'{len(hook.times)} batches, {hook.images / busy:.2f} images/s, '
        f'{busy / len(hook.times) * 1e3:.1f} ms per batch (mean; median '
        f'{median * 1e3:.1f} ms; model and evaluator, data loading '
        f'excluded), runner.test() took {wall:.1f} s (this process)',
        logger='current')


def main(argv=None):
    args = parse_args(argv)
    check_output_free(args.out, args.force, '--out')
    cfg = load_run_config(args.config, args.cfg_options, args.work_dir,
                          args.launcher)
    check_config_data(cfg, splits=('test', ))
    if args.check_data:
        check_config_images(cfg, ('test', ))
    # Fails on an unreadable or damaged file, naming it; the runner loads
    # it again (from the page cache) once its keys are checked below.
    checkpoint = read_checkpoint(args.checkpoint)
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
    check_state_dict_matches(runner.model, checkpoint, args.checkpoint)
    del checkpoint
    if dump_predictions:
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(
            DumpResults(out_file_path=args.out))
    speed_hook = None
    if args.gate_execution is not None:
        from mmgated.models import set_gate_execution
        set_gate_execution(runner.model, args.gate_execution)
        speed_hook = _TestSpeedHook()
        runner.register_hook(speed_hook)
    start = time.perf_counter()
    metrics = runner.test()
    if speed_hook is not None:
        _log_test_speed(speed_hook, args.gate_execution,
                        time.perf_counter() - start)
    del runner  # its DDP wrapper holds the process group (close_distributed)
    close_distributed()
    return metrics


if __name__ == '__main__':
    main()
