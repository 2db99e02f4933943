from .checkpoint_integrity_hook import CheckpointIntegrityHook
from .finite_inputs_hook import FiniteInputsHook
from .gate_histogram_hook import GateHistogramHook
from .gate_metric_hook import GateMetricHook
from .loss_weight_schedule_hooks import (BatchShapingWeightHook, L0WeightHook,
                                         LossWeightScheduleHook)
from .progress_bar_hook import TrainProgressBarHook

__all__ = [
    'BatchShapingWeightHook', 'CheckpointIntegrityHook', 'FiniteInputsHook',
    'GateHistogramHook', 'GateMetricHook', 'L0WeightHook',
    'LossWeightScheduleHook', 'TrainProgressBarHook'
]
