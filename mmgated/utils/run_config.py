"""What tools/train.py and tools/test.py do to a config before running it."""
import os.path as osp

import torch
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
    if launcher != 'none' and not torch.cuda.is_available():
        _allow_cpu_distributed_launch()
        # mmengine wraps the model in DDP with device_ids=[LOCAL_RANK],
        # which torch refuses for a model on the CPU (gloo runs); these are
        # mmengine's defaults otherwise.
        wrapper = cfg.get('model_wrapper_cfg') or dict(
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
        if wrapper.get('type', 'MMDistributedDataParallel') == \
                'MMDistributedDataParallel':
            wrapper.setdefault('device_ids', None)
        cfg.model_wrapper_cfg = wrapper
    return cfg


def _allow_cpu_distributed_launch() -> None:
    """Let mmengine's pytorch launcher start CPU-only (gloo) processes.

    mmengine 0.10 calls ``torch.cuda.set_device(LOCAL_RANK)`` before
    ``init_process_group`` unconditionally, which fails with ``Found no
    NVIDIA driver`` on a machine without CUDA. Without CUDA and the other
    accelerators mmengine knows, the process group is initialised without
    selecting a device. Idempotent; installed files are not edited.
    """
    from mmengine.dist import utils as dist_utils
    original = dist_utils._init_dist_pytorch
    if getattr(original, 'mmgated_cpu_launch', False):
        return

    def has_accelerator():
        names = ('is_mlu_available', 'is_npu_available', 'is_musa_available')
        return torch.cuda.is_available() or any(
            getattr(dist_utils, name, lambda: False)() for name in names)

    def _init_dist_pytorch(backend, init_backend='torch', **kwargs):
        if has_accelerator() or init_backend != 'torch':
            return original(backend, init_backend=init_backend, **kwargs)
        torch.distributed.init_process_group(backend=backend, **kwargs)

    _init_dist_pytorch.mmgated_cpu_launch = True
    dist_utils._init_dist_pytorch = _init_dist_pytorch


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


def close_distributed() -> None:
    """Destroy the default process group, if one was set up, once a run has
    finished: a process that exits with a gloo group still alive may abort
    while tearing down its worker threads ("terminate called without an
    active exception", pytorch/pytorch#190489), which fails the launcher
    even though the run succeeded."""
    if torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
