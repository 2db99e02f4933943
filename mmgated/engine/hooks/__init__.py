from .gate_histogram_hook import GateHistogramHook
from .loss_weight_schedule_hooks import (BatchShapingWeightHook, L0WeightHook,
                                         LossWeightScheduleHook)
from .progress_bar_hook import TrainProgressBarHook

__all__ = [
    'BatchShapingWeightHook', 'GateHistogramHook', 'L0WeightHook',
    'LossWeightScheduleHook', 'TrainProgressBarHook'
]
