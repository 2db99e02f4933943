"""Backends of skip execution: one convolution over given open channels.

Skip execution (:mod:`mmgated.models.skip_execution`) decides which channels
and samples of a block are computed together; its backend, chosen once per
model (:func:`build_skip_backend`), computes each convolution (BN folded
in) over the open input and output channels it is given:
:class:`TorchSkipBackend` with PyTorch operations on any device (the
reference), :class:`CompiledCPUSkipBackend` with mmgated's compiled kernels
for single float32 CPU samples where they win.
"""
import torch

from ...ops import direct_conv_fast, native_available
from .compiled_cpu import CompiledCPUSkipBackend
from .torch_backend import TorchSkipBackend

SKIP_BACKENDS = ('auto', 'torch', 'compiled')


def build_skip_backend(name: str = 'auto', device='cpu'):
    """The skip execution backend ``name`` for a model on ``device``.

    Args:
        name (str): ``'torch'``, ``'compiled'`` or ``'auto'``: the compiled
            backend on the CPU where the compiled kernels build with
            vectorised tiles, AVX-512 or AVX2 (only those beat oneDNN, see
            :func:`~mmgated.ops.direct_conv_fast`), else the torch one.
        device (str | torch.device): Where the model's weights are.

    Returns:
        TorchSkipBackend | CompiledCPUSkipBackend

    Raises:
        ValueError: ``name`` is not one of ``SKIP_BACKENDS``.
        RuntimeError: ``'compiled'`` where the compiled kernels cannot be
            built (no C compiler, or ``MMGATED_NATIVE=0``).
    """
    if name not in SKIP_BACKENDS:
        raise ValueError(f'skip backend {name!r} is not one of '
                         f'{SKIP_BACKENDS}')
    if name == 'auto':
        fast = torch.device(device).type == 'cpu' and direct_conv_fast()
        name = 'compiled' if fast else 'torch'
    if name == 'torch':
        return TorchSkipBackend()
    if not native_available():
        raise RuntimeError(
            "skip backend 'compiled' needs mmgated's compiled kernels, which "
            'could not be built (no C compiler, or MMGATED_NATIVE=0); use '
            "backend='torch' or 'auto'")
    return CompiledCPUSkipBackend()


__all__ = [
    'SKIP_BACKENDS', 'CompiledCPUSkipBackend', 'TorchSkipBackend',
    'build_skip_backend'
]
