"""The README demo: train ResNet20-BAS on real data, offline, on a CPU.

Writes scikit-learn's handwritten digits (shipped inside scikit-learn) as a
16x16 folder dataset, trains the gated ResNet-20 of
``configs/demo/resnet20_bas_digits.py`` with mmengine's runner (the same
path as tools/train.py), then reports the accuracy, the conditional MAC
ratio and the gate categories, and draws the gate plots::

    python tools/demo.py                 # about a minute on 2 CPU cores

The demo owns its work dir: a rerun trains again and overwrites the
checkpoint, metrics and plots of the earlier run there.
"""
import argparse
import json
import os
import os.path as osp
import sys

import cv2
import numpy as np

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(REPO, 'configs', 'demo', 'resnet20_bas_digits.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--work-dir', default=osp.join('work_dirs', 'demo'),
        help='where the data, logs, checkpoint and plots go; the demo owns '
        'this dir: a rerun overwrites its checkpoint, metrics and plots')
    parser.add_argument(
        '--epochs', type=int, help='train for this many epochs instead of '
        "the config's 24 (the schedules keep their epochs)")
    parser.add_argument(
        '--max-samples', type=int,
        help='use only this many images per split (a quick check)')
    return parser.parse_args(argv)


def write_digits(data_root, max_samples=None, seed=0):
    """Write sklearn's digits as ``{data_root}/{train,val}/<digit>/*.png``.

    80 % of each class (shuffled with ``seed``) go to train, the rest to
    val. Returns the number of images per split.
    """
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.RandomState(seed)
    counts = {'train': 0, 'val': 0}
    for label in range(10):
        index = np.flatnonzero(digits.target == label)
        rng.shuffle(index)
        n_train = int(round(0.8 * len(index)))
        for split, part in (('train', index[:n_train]),
                            ('val', index[n_train:])):
            if max_samples is not None:
                part = part[:max(1, max_samples // 10)]
            folder = osp.join(data_root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in part:
                # 0..16 ink levels to 0..255; 8x8 upscaled to 16x16, enough
                # for the three stages of the CIFAR ResNet, and fast on a CPU.
                image = (digits.images[i] * (255 / 16)).astype(np.uint8)
                image = cv2.resize(image, (16, 16),
                                   interpolation=cv2.INTER_LINEAR)
                path = osp.join(folder, f'{i:04d}.png')
                if not osp.exists(path):
                    cv2.imwrite(path, cv2.merge([image] * 3))
                counts[split] += 1
    return counts


def _load_tool(relative_path):
    """Import a script of tools/ as a module."""
    import importlib.util
    path = osp.join(REPO, 'tools', relative_path)
    spec = importlib.util.spec_from_file_location(
        osp.splitext(osp.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, REPO)
    import mmgated  # noqa: F401  shims and registration
    from mmengine.runner import Runner

    from mmgated.utils.run_config import load_run_config

    work_dir = osp.abspath(args.work_dir)
    data_root = osp.join(work_dir, 'data')
    if args.max_samples is not None:
        data_root += f'-{args.max_samples}'
    counts = write_digits(data_root, args.max_samples)
    print(f'[demo] digits written to {data_root}: {counts["train"]} train, '
          f'{counts["val"]} val images')

    cfg = load_run_config(CONFIG, work_dir=work_dir)
    for split in ('train', 'val', 'test'):
        cfg[f'{split}_dataloader'].dataset.data_root = data_root
    if args.epochs is not None:
        cfg.train_cfg.max_epochs = args.epochs
        cfg.train_cfg.val_interval = args.epochs
        cfg.default_hooks.checkpoint.interval = args.epochs
    # The progress bar replaces the periodic log lines on the terminal;
    # everything is still in the work dir's vis_data/scalars.json.
    cfg.log_level = 'WARNING'
    cfg.custom_hooks = list(cfg.custom_hooks) + [
        dict(type='TrainProgressBarHook')
    ]

    runner = Runner.from_cfg(cfg)
    print(f'[demo] training ResNet20-BAS for {cfg.train_cfg.max_epochs} '
          'epochs on the CPU')
    runner.train()
    metrics = runner.val()
    checkpoint = osp.join(runner.work_dir,
                          f'epoch_{cfg.train_cfg.max_epochs}.pth')
    report_path = osp.join(runner.work_dir, 'demo_metrics.json')
    with open(report_path, 'w') as f:
        json.dump(metrics, f, indent=2)

    plots_dir = osp.join(runner.work_dir, 'gate_stats')
    gate_stats = _load_tool('analysis_tools/gate_stats.py')
    gate_stats.main([
        # --force: the plots of an earlier demo run are the demo's own.
        CONFIG, checkpoint, '--out-dir', plots_dir, '--force',
        '--cfg-options',
        f'val_dataloader.dataset.data_root={data_root}',
        f'work_dir={work_dir}'
    ])

    print('\n[demo] results on the validation digits')
    print(f'  top-1 accuracy:               '
          f'{metrics["accuracy/top1"]:.2f} %')
    print(f'  conditional MACs / dense MACs: '
          f'{metrics["gates/mac_ratio"]:.3f} '
          f'(spread {metrics["gates/mac_ratio_min"]:.3f} .. '
          f'{metrics["gates/mac_ratio_max"]:.3f})')
    print(f'  dense MACs per image:          '
          f'{metrics["gates/dense_macs"] / 1e6:.1f} M')
    print(f'  gates always on / conditional / always off: '
          f'{metrics["gates/gates_always_on"]:.0%} / '
          f'{metrics["gates/gates_conditional"]:.0%} / '
          f'{metrics["gates/gates_always_off"]:.0%}')
    print(f'  checkpoint: {checkpoint}')
    print(f'  metrics:    {report_path}')
    print(f'  plots:      {plots_dir}/*.png (gate categories per layer, '
          'MACs per image, MACs against loss, gate use per class)')
    return metrics


if __name__ == '__main__':
    main()
