"""What tools/train.py and tools/test.py do to a config before running it."""
import gc
import logging
import os.path as osp
from typing import Sequence

import torch
from mmengine.config import Config
from mmengine.logging import print_log

from .data_check import (UnreadableDataError, build_dataset, check_datasets,
                         dataset_files, find_unreadable_images)

INTEGRITY_HOOK = 'CheckpointIntegrityHook'


def load_run_config(config_path, cfg_options=None, work_dir=None,
                    launcher='none') -> Config:
    """Load a config as mmseg's/mmpretrain's tools do.

    Also adds :class:`~mmgated.engine.hooks.CheckpointIntegrityHook`
    (atomic checkpoints with a checksum) to the default hooks, unless the
    config has it.

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
    _add_integrity_hook(cfg)
    return cfg


def _add_integrity_hook(cfg: Config) -> None:
    # Registers the hook type the config will name.
    from mmgated.engine.hooks import checkpoint_integrity_hook  # noqa: F401
    default_hooks = dict(cfg.get('default_hooks') or {})
    hooks = list(default_hooks.values()) + list(cfg.get('custom_hooks') or [])
    if any(
            isinstance(hook, dict)
            and str(hook.get('type', '')).endswith(INTEGRITY_HOOK)
            for hook in hooks):
        return
    default_hooks['checkpoint_integrity'] = dict(type=INTEGRITY_HOOK)
    cfg.default_hooks = default_hooks


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


def check_config_images(cfg: Config, splits: Sequence[str]) -> None:
    """``--check-data``: read every image (and segmentation map) of the
    datasets of ``splits`` once, and fail listing the unreadable ones.

    The datasets are built from the config in its scope and their
    annotations are read (``get_data_info``); the pipelines do not run.

    Args:
        cfg (Config): A config from :func:`load_run_config`.
        splits (Sequence[str]): ``'train'``, ``'val'``, ``'test'``; splits
            without a dataloader are skipped.

    Raises:
        UnreadableDataError: Naming the unreadable files (all of them are
            logged, one a line).
    """
    files = []
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if loader:
            files += dataset_files(
                build_dataset(loader['dataset'], cfg.get('default_scope')))
    files = list(dict.fromkeys(files))  # val and test often share files
    names = '/'.join(splits)
    if not files:
        print_log(f'--check-data: the {names} datasets list no image files '
                  "(CIFAR's batches, for one, were read when the dataset "
                  'was built)', logger='current')
        return
    print_log(f'--check-data: reading the {len(files)} image files of the '
              f'{names} data', logger='current')
    problems = find_unreadable_images(files)
    if not problems:
        print_log('--check-data: every file is readable', logger='current')
        return
    for path, reason in problems:
        print_log(f'unreadable: {path} ({reason})', logger='current',
                  level=logging.WARNING)
    shown = ', '.join(repr(path) for path, _ in problems[:5])
    more = f' and {len(problems) - 5} more' if len(problems) > 5 else ''
    raise UnreadableDataError(
        f'{len(problems)} of the {len(files)} image files of the {names} '
        f'data cannot be read: {shown}{more} (all listed above). Replace '
        'or re-extract them, or remove them from the dataset.')


def close_distributed() -> None:
    """Destroy the default process group, if one was set up, once a run has
    finished and its runner has been released.

    A gloo group that outlives the interpreter's shutdown may abort its
    process while its worker threads release their last tensors
    ("terminate called without an active exception", pytorch/pytorch#190489),
    which fails the launcher even though the run succeeded. Destroying the
    group is not enough while a DDP wrapper still holds it: the runner lives
    in reference cycles, so its wrapper (with the group and the gradient
    buckets of its last all-reduce) would only be freed at shutdown. The
    caller drops its runner first; the garbage collection here frees it.
    """
    if torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        gc.collect()
        # Every rank first waits for the others to finish their last
        # collective (rank 0 saves and logs longest): a rank that tears its
        # group down while a peer still talks to it aborted that peer.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
