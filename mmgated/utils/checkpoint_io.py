"""Checkpoints that are written whole and read back intact.

* :func:`atomic_save` makes a runner write each checkpoint to a hidden
  temporary file in the same directory and ``os.replace`` it into place, so
  that a run killed mid-save (``kill -9``, out of memory, a pre-empted job)
  leaves the previous file or none, never a truncated ``epoch_N.pth``.
* :func:`add_checksum` records the sha256 of the weights in the
  checkpoint's ``meta``; :func:`read_checkpoint` checks it, so that a
  damaged copy is an error naming the file instead of a lower accuracy.
* :func:`check_state_dict_matches` refuses a checkpoint whose weights do not
  fit the model, which mmengine's non-strict loading only logs.

:class:`~mmgated.engine.hooks.CheckpointIntegrityHook` applies the first two
to a training run; tools/test.py and tools/train.py use the others.
"""
import functools
import hashlib
import os
import os.path as osp
import re
from typing import Callable

import torch
import torch.nn as nn
from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend, get_file_backend
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.runner.checkpoint import CheckpointLoader

CHECKSUM_KEY = 'mmgated_checksum'
# How many names of missing or unexpected keys an error lists.
MAX_NAMES = 5


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, damaged or does not fit the
    model."""


def state_dict_checksum(state_dict: dict) -> str:
    """The sha256 of the tensors of a state dict.

    Each tensor contributes its name, dtype, shape and bytes, in the order
    of the sorted names, so the checksum does not depend on the order of the
    dict or on the device or memory layout of the tensors. Entries that are
    not tensors are left out.

    Args:
        state_dict (dict): Name to tensor, as ``checkpoint['state_dict']``.

    Returns:
        str: ``'sha256:<hex digest>'``.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        if not isinstance(value, torch.Tensor):
            continue
        tensor = value.detach().cpu().contiguous()
        digest.update(
            f'{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return 'sha256:' + digest.hexdigest()


def _state_dict(checkpoint: dict) -> dict:
    # mmengine's convention: a checkpoint dict, or a bare state dict.
    return checkpoint.get('state_dict', checkpoint)


def add_checksum(checkpoint: dict) -> None:
    """Record the checksum of ``checkpoint['state_dict']`` in
    ``checkpoint['meta']['mmgated_checksum']``."""
    checkpoint.setdefault('meta', {})[CHECKSUM_KEY] = state_dict_checksum(
        _state_dict(checkpoint))


def verify_checksum(checkpoint: dict, filename: str) -> bool:
    """Check the checksum that :func:`add_checksum` recorded, if any.

    Args:
        checkpoint (dict): A loaded checkpoint.
        filename (str): Its file, for the error message.

    Returns:
        bool: Whether the checkpoint had a checksum (it matched). Upstream
        checkpoints (pretrained weights, other codebases) have none.

    Raises:
        CheckpointError: The weights are not the ones that were saved.
    """
    meta = checkpoint.get('meta')
    expected = meta.get(CHECKSUM_KEY) if isinstance(meta, dict) else None
    if expected is None:
        return False
    actual = state_dict_checksum(_state_dict(checkpoint))
    if actual != expected:
        raise CheckpointError(
            f'checkpoint {filename!r} is damaged: its weights hash to '
            f'{actual}, but they were saved with {expected}. The file '
            'changed after it was written (a broken copy, download or '
            'disk); use an intact copy of it or another checkpoint.')
    return True


def read_checkpoint(filename: str, map_location='cpu') -> dict:
    """Load a checkpoint with mmengine's loaders and verify its checksum.

    mmengine's loader (with :mod:`mmgated.compat`'s allow-list of
    mmengine's own types) does the loading, as the Runner does; what changes
    is the error for a file that is not a checkpoint. torch's own message
    for such a file depends on how it is broken (``EOFError`` for an empty
    file, an unpickling error that advises ``weights_only=False``, which
    would not help and is unsafe for a file of unknown origin) and does not
    name it.

    Args:
        filename (str): A local path or a URL mmengine can load.
        map_location: As :func:`torch.load`. Default: ``'cpu'``.

    Returns:
        dict: The checkpoint.

    Raises:
        FileNotFoundError: There is no such file.
        CheckpointError: The file is not a readable PyTorch checkpoint, or
            its weights do not match their checksum.
    """
    try:
        checkpoint = CheckpointLoader.load_checkpoint(
            filename, map_location=map_location, logger='current')
    except OSError:
        raise  # missing or unreadable file: the OS's message names it
    except Exception as error:
        # `from None`: torch's message would be shown too, with its advice.
        raise CheckpointError(
            f'{filename!r} is not a readable PyTorch checkpoint '
            f'({type(error).__name__}): it is empty, truncated (an '
            'interrupted save or copy), not written by torch.save, or it '
            'holds Python objects other than tensors and mmengine\'s '
            'training state. Give a complete checkpoint file, e.g. the one '
            'named in the last_checkpoint file of a work dir.') from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f'{filename!r} holds a {type(checkpoint).__name__}, not a '
            'checkpoint; allowed: a dict with a "state_dict", or a state '
            'dict')
    verify_checksum(checkpoint, filename)
    return checkpoint


def _names(names) -> str:
    more = ', ...' if len(names) > MAX_NAMES else ''
    return f'{len(names)} ({", ".join(names[:MAX_NAMES])}{more})'


def check_state_dict_matches(model: nn.Module, checkpoint: dict,
                             filename: str) -> None:
    """Refuse a checkpoint whose weights do not fit ``model``.

    mmengine loads checkpoints non-strictly and only logs the keys it
    skipped, so a checkpoint of another model (a ResNet-20 into a ResNet-32
    config, another number of classes) would be tested with partly random
    weights. Keys are compared after mmengine's ``module.`` prefix is
    stripped; a missing ``num_batches_tracked`` (checkpoints older than
    torch 0.4.1) is allowed, as BatchNorm fills it in.

    Args:
        model (nn.Module): The model the checkpoint is for (wrappers and
            test-time-augmentation models are looked through).
        checkpoint (dict): A loaded checkpoint or state dict.
        filename (str): Its file, for the error message.

    Raises:
        CheckpointError: Naming keys that are missing, unexpected or of
            another shape.
    """
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    expected = model.state_dict()
    given = {
        re.sub(r'^module\.', '', name): value
        for name, value in _state_dict(checkpoint).items()
    }
    missing = [
        name for name in expected
        if name not in given and not name.endswith('num_batches_tracked')
    ]
    unexpected = [name for name in given if name not in expected]
    reshaped = [
        f'{name} {tuple(value.shape)} vs {tuple(expected[name].shape)}'
        for name, value in given.items()
        if name in expected and isinstance(value, torch.Tensor)
        and value.shape != expected[name].shape
    ]
    problems = [
        f'{what}: {_names(names)}'
        for what, names in (('keys the checkpoint lacks', missing),
                            ('keys the model does not have', unexpected),
                            ('keys of another shape (checkpoint vs model)',
                             reshaped)) if names
    ]
    if problems:
        raise CheckpointError(
            f'checkpoint {filename!r} does not fit the '
            f'{type(model).__name__} of the config: '
            f'{"; ".join(problems)}. Use the config it was trained with '
            "(its meta['cfg']) or a checkpoint of this config.")


def load_checked_state_dict(model: nn.Module, checkpoint: dict,
                            filename: str) -> None:
    """Load a checkpoint's weights into ``model`` after
    :func:`check_state_dict_matches` (mmengine's ``module.`` prefix
    stripped).

    Raises:
        CheckpointError: See :func:`check_state_dict_matches`.
    """
    check_state_dict_matches(model, checkpoint, filename)
    model.load_state_dict(
        {re.sub(r'^module\.', '', name): value
         for name, value in _state_dict(checkpoint).items()},
        strict=False)


def _is_local(out_dir: str, args: tuple, kwargs: dict) -> bool:
    # Runner.save_checkpoint(out_dir, filename, file_client_args=None, ...,
    # backend_args=None): other storage keeps mmengine's plain write.
    file_client_args = args[0] if args else kwargs.get('file_client_args')
    if file_client_args is not None:
        return False
    backend = get_file_backend(
        out_dir, backend_args=kwargs.get('backend_args'))
    return isinstance(backend, LocalBackend)


def atomic_save(save_checkpoint: Callable) -> Callable:
    """Make a runner's ``save_checkpoint`` replace files atomically.

    The wrapped method saves under a hidden temporary name in the target's
    directory (``.epoch_3.pth.<pid>.tmp``, which no ``*.pth`` pattern
    matches), flushes it to disk and renames it over the target with
    ``os.replace``, which is atomic within a file system. Remote storage
    and non-main processes (which save nothing) are passed through.
    Idempotent.

    Args:
        save_checkpoint (Callable): ``runner.save_checkpoint``.

    Returns:
        Callable: The wrapped method, with the same signature.
    """
    if getattr(save_checkpoint, 'mmgated_atomic', False):
        return save_checkpoint

    @functools.wraps(save_checkpoint)
    def save(out_dir, filename, *args, **kwargs):
        if not is_main_process() or not _is_local(out_dir, args, kwargs):
            return save_checkpoint(out_dir, filename, *args, **kwargs)
        folder, name = osp.split(filename)
        tmp_name = osp.join(folder, f'.{name}.{os.getpid()}.tmp')
        tmp_path = osp.join(out_dir, tmp_name)
        try:
            save_checkpoint(out_dir, tmp_name, *args, **kwargs)
            # Data on disk before the rename, or a power cut could still
            # leave an empty file under the final name.
            with open(tmp_path, 'r+b') as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, osp.join(out_dir, filename))
        finally:
            if osp.exists(tmp_path):
                os.remove(tmp_path)

    save.mmgated_atomic = True
    return save
