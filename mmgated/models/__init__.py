"""Gated models: gates, backbones, losses, segmentor and classifier."""
import importlib.util

from .backbones import *  # noqa: F401,F403
from .backbones import __all__ as _backbones
from .gates import (ChannelGate, GateOutput, clear_gates, collect_gates,
                    force_gates, gate_modules)
from .losses import BatchShapingLoss, GateL0Loss, PRIORS
from .skip_execution import set_gate_execution

__all__ = list(_backbones) + [
    'ChannelGate', 'GateOutput', 'collect_gates', 'clear_gates',
    'force_gates', 'gate_modules', 'BatchShapingLoss', 'GateL0Loss', 'PRIORS',
    'set_gate_execution'
]

if importlib.util.find_spec('mmseg') is not None:
    from .segmentors import GatedEncoderDecoder
    __all__.append('GatedEncoderDecoder')
if importlib.util.find_spec('mmpretrain') is not None:
    from .classifiers import GatedImageClassifier
    __all__.append('GatedImageClassifier')
