"""Shims that keep the 2023/24 OpenMMLab releases working on a current torch.

Each shim is applied by ``import mmgated`` and never edits installed files.

* ``allow_mmengine_checkpoint_types``: torch >= 2.6 loads checkpoints with
  ``weights_only=True`` by default, which refuses the objects mmengine stores
  in its checkpoints (``HistoryBuffer`` of the message hub and the numpy
  arrays inside it), so ``--resume`` fails with ``UnpicklingError: Weights
  only load failed``. The shim adds exactly these types to torch's
  allow-list; weights-only loading stays on for everything else.
"""
import numpy as np
import torch

from mmengine.logging import HistoryBuffer


def mmengine_checkpoint_types() -> list:
    """The non-tensor types mmengine writes into its checkpoints."""
    types = [HistoryBuffer, np.ndarray, np.dtype]
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


def allow_mmengine_checkpoint_types() -> bool:
    """Allow-list mmengine's checkpoint types for ``weights_only`` loading.

    Returns:
        bool: Whether the torch in use has an allow-list (torch >= 2.4).
    """
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:
        return False
    add_safe_globals(mmengine_checkpoint_types())
    return True


def apply_all() -> None:
    """Apply every shim; idempotent."""
    allow_mmengine_checkpoint_types()
