"""Shims that keep the 2023/24 OpenMMLab releases working on a current torch.

Each shim is applied by ``import mmgated`` and never edits installed files.

* :func:`allow_mmengine_checkpoint_types`: torch >= 2.6 loads checkpoints
  with ``weights_only=True`` by default, which refuses the objects mmengine
  stores in its own checkpoints (the message hub's ``HistoryBuffer``, the
  numpy arrays inside it and, through ``getattr``, its statistics methods),
  so ``--resume`` fails with ``UnpicklingError: Weights only load failed``.
  The shim wraps mmengine's checkpoint loaders so that they load with
  exactly these types allow-listed. Weights-only loading stays on, and
  nothing changes for ``torch.load`` calls outside mmengine's loaders.
"""
import functools

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader


def mmengine_checkpoint_types() -> list:
    """The non-tensor globals found in mmengine's checkpoints."""
    # HistoryBuffer pickles its statistics methods as
    # getattr(HistoryBuffer, name).
    types = [HistoryBuffer, getattr, np.ndarray, np.dtype]
    # numpy's array pickling helpers moved from numpy.core to numpy._core.
    multiarray = getattr(getattr(np, '_core', None), 'multiarray', None) \
        or np.core.multiarray
    types += [multiarray._reconstruct, multiarray.scalar]
    # numpy >= 1.25 pickles dtypes as instances of numpy.dtypes classes.
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        types += [getattr(dtypes, name) for name in dir(dtypes)
                  if name.endswith('DType')]
    return types


def _allowing_mmengine_types(loader):
    if getattr(loader, 'mmgated_allows_mmengine_types', False):
        return loader

    @functools.wraps(loader)
    def load(*args, **kwargs):
        with torch.serialization.safe_globals(mmengine_checkpoint_types()):
            return loader(*args, **kwargs)

    load.mmgated_allows_mmengine_types = True
    return load


def allow_mmengine_checkpoint_types() -> bool:
    """Make mmengine's checkpoint loaders accept mmengine's own types.

    Returns:
        bool: Whether the shim applies (torch has ``safe_globals``, >= 2.5;
        older torch loads without ``weights_only`` by default anyway).
    """
    if not hasattr(torch.serialization, 'safe_globals'):
        return False
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        CheckpointLoader.register_scheme(
            prefix, _allowing_mmengine_types(loader), force=True)
    return True


def apply_all() -> None:
    """Apply every shim; idempotent."""
    allow_mmengine_checkpoint_types()
