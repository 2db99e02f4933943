"""What tools/train.py and tools/test.py do to a config before running it."""
import os.path as osp

from mmengine.config import Config

from .data_check import check_datasets


def load_run_config(config_path, cfg_options=None, work_dir=None,
                    launcher='none') -> Config:
    """Load a config as mmseg's/mmpretrain's tools do, and check its data.

    Args:
        config_path (str): The config file.
        cfg_options (dict, optional): ``--cfg-options`` overrides.
        work_dir (str, optional): ``--work-dir``; defaults to the config's
            ``work_dir`` or ``./work_dirs/<config name>``.
        launcher (str): ``--launcher``.

    Returns:
        Config: The config, ready for ``Runner.from_cfg``.
    """
    cfg = Config.fromfile(config_path)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config_path))[0])
    return cfg


def enable_amp(cfg: Config) -> None:
    """Switch the config's optimizer wrapper to automatic mixed precision."""
    optim_type = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if optim_type == 'AmpOptimWrapper':
        return
    if optim_type != 'OptimWrapper':
        raise ValueError(f'--amp needs an OptimWrapper, the config has '
                         f'{optim_type!r}')
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')


def check_config_data(cfg: Config, splits=('train', 'val', 'test')) -> None:
    """Fail early when a dataloader's data is missing (see
    :func:`mmgated.utils.data_check.check_datasets`)."""
    loaders = [cfg.get(f'{split}_dataloader') for split in splits]
    check_datasets([l['dataset'] for l in loaders if l])
