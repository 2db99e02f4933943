"""Give :class:`~mmgated.evaluation.GateMetric` the model whose MACs it
counts."""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ...analysis.macs import MacCounter
from ...evaluation.gate_metric import GateMetric


@HOOKS.register_module()
class GateMetricHook(Hook):
    """Before validation and testing, hand the runner's model to every
    :class:`~mmgated.evaluation.GateMetric` of the loop's evaluator.

    A metric sees only predictions; the MACs of a prediction also depend on
    the network (one trace per input shape, see
    :class:`~mmgated.analysis.MacCounter`), so the metric counts them with
    the model this hook gives it. Add it wherever a ``GateMetric`` is used::

        custom_hooks = [dict(type='GateMetricHook')]
    """

    priority = 'LOW'

    def _bind(self, runner, loop_name: str) -> None:
        loop = getattr(runner, loop_name, None)
        evaluator = getattr(loop, 'evaluator', None)
        for metric in getattr(evaluator, 'metrics', ()):
            if isinstance(metric, GateMetric):
                metric.mac_counter = MacCounter(runner.model)

    def before_val(self, runner) -> None:
        self._bind(runner, 'val_loop')

    def before_test(self, runner) -> None:
        self._bind(runner, 'test_loop')
