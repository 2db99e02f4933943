"""Gated backbones.

The mmseg implementations are registered in mmseg's ``MODELS`` and the
mmpretrain ones in mmpretrain's, each under the same names (``GatedResNet``,
``GatedResNetV1c``, ``GatedResNetV1d``), so a config finds the one that
matches its ``default_scope``; ``mmgated.models.GatedResNet`` is the mmseg
one when mmseg is installed. ``GatedResNetCifar`` (mmpretrain-based) is
registered in both. Either package may be missing.
"""
import importlib.util

__all__ = []

if importlib.util.find_spec('mmpretrain') is not None:
    from . import mmpretrain_resnet  # noqa: F401
    from .mmpretrain_resnet import GatedResNetCifar, ResNetCifar
    __all__ += ['GatedResNetCifar', 'ResNetCifar']

if importlib.util.find_spec('mmseg') is not None:
    from . import mmseg_resnet  # noqa: F401
    if 'GatedResNetCifar' in __all__:
        # The CIFAR ResNets have no mmseg counterpart; the mmpretrain ones
        # serve both registries.
        from mmseg.registry import MODELS as _SEG_MODELS
        _SEG_MODELS.register_module(module=ResNetCifar)
        _SEG_MODELS.register_module(module=GatedResNetCifar)
    from .mmseg_resnet import GatedResNet, GatedResNetV1c, GatedResNetV1d
else:
    from .mmpretrain_resnet import (GatedResNet, GatedResNetV1c,
                                    GatedResNetV1d)
__all__ += ['GatedResNet', 'GatedResNetV1c', 'GatedResNetV1d']
