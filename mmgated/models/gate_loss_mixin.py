"""The gate losses of a gated model, shared by the segmentor and the
classifier."""
import torch

from .gates import clear_gates, gate_modules

SHAPED_QUANTITIES = ('probs', 'relaxed')


class GateLossMixin:
    """Add ``loss_bs``, ``loss_l0`` and the gate-open rate to a loss dict.

    Put before the upstream model class in the bases; the subclass sets
    ``models_registry`` to the ``MODELS`` registry its losses are built from.

    Args:
        batch_shaping_loss (dict, optional): Config of a
            :class:`~mmgated.models.BatchShapingLoss`. Its ``loss_weight`` is
            the lambda that :class:`~mmgated.engine.BatchShapingWeightHook`
            schedules. Default: Beta(0.6, 0.4) prior, weight 0.
        l0_loss (dict, optional): Config of a
            :class:`~mmgated.models.GateL0Loss`; its ``loss_weight`` is the
            gamma that :class:`~mmgated.engine.L0WeightHook` schedules.
            Default: weight 0.
        shaped_quantity (str): What of each gate the batch-shaping loss
            shapes: ``'probs'`` (default), the probability
            ``sigmoid(logit)`` the gating module predicts, which is what the
            Beta prior's support [0, 1] and the paper's Fig. 1b (smooth gate
            output distributions) imply, and which makes the logits
            themselves conditional on the input; or ``'relaxed'``, the Binary
            Concrete sample ``sigmoid((logit + noise) / tau)``, whose spread
            partly comes from the noise rather than from the input.
    """

    models_registry = None

    def __init__(self,
                 *args,
                 batch_shaping_loss=dict(type='BatchShapingLoss',
                                         loss_weight=0.0),
                 l0_loss=dict(type='GateL0Loss', loss_weight=0.0),
                 shaped_quantity='probs',
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not gate_modules(self):
            raise ValueError(
                f'{type(self).__name__} needs a gated backbone, but '
                f'{type(self.backbone).__name__} has no ChannelGate; use one '
                'of GatedResNet, GatedResNetV1c, GatedResNetCifar')
        if shaped_quantity not in SHAPED_QUANTITIES:
            raise ValueError(f'shaped_quantity {shaped_quantity!r} is not '
                             f'one of {SHAPED_QUANTITIES}')
        self.shaped_quantity = shaped_quantity
        self._dense_macs_cache = {}
        self.batch_shaping_loss = self.models_registry.build(
            batch_shaping_loss) if batch_shaping_loss else None
        self.l0_loss = self.models_registry.build(
            l0_loss) if l0_loss else None

    def loss(self, inputs, data_samples) -> dict:
        """The parent's losses plus :meth:`gate_losses`."""
        # One traversal of the model per step (some 0.3 ms for a ResNet):
        # the gates cleared before the forward are those read after it.
        gates = list(gate_modules(self).values())
        clear_gates(gates)
        losses = super().loss(inputs, data_samples)
        losses.update(self.gate_losses(gates))
        return losses

    def predict(self, inputs, data_samples=None):
        """The parent's predictions, each with its gate record.

        Adds to the metainfo of every returned data sample, for
        :class:`mmgated.evaluation.GateMetric` and the analysis tools:
        ``gate_open`` (dict: gate name to the sample's 0/1 decisions, a
        bool tensor), ``conditional_macs`` and ``dense_macs`` (float, whole
        inference network, see :func:`mmgated.analysis.count_macs`).
        """
        from ..analysis.macs import dense_macs, gated_savings
        shape = tuple(inputs.shape[1:])
        if shape not in self._dense_macs_cache:
            self._dense_macs_cache[shape] = dense_macs(self, inputs[:1])
        clear_gates(self)
        results = super().predict(inputs, data_samples)
        if not self._gates_cover_batch(inputs.shape[0]):
            return results
        counted = self._dense_macs_cache[shape]
        dense = counted['total'] - counted['gating']
        conditional = counted['total'] - gated_savings(self)
        gates = {name: module.output.gates.detach().bool().cpu()
                 for name, module in gate_modules(self).items()
                 if module.output is not None}
        for i, sample in enumerate(results):
            sample.set_metainfo(
                dict(
                    gate_open={k: v[i] for k, v in gates.items()},
                    conditional_macs=float(conditional[i]),
                    dense_macs=float(dense)))
        return results

    def _gates_cover_batch(self, batch_size) -> bool:
        # Sliding-window inference runs the backbone once per crop; the
        # recorded gates then describe the last crop only.
        for module in gate_modules(self).values():
            output = module.output
            if output is None or output.gates.shape[0] != batch_size:
                return False
        test_cfg = getattr(self, 'test_cfg', None) or {}
        return test_cfg.get('mode', 'whole') == 'whole'

    def gate_losses(self, gates=None) -> dict:
        """Gate losses and statistics of the last forward pass.

        Args:
            gates (list[ChannelGate], optional): The gating modules to
                read. Default: all of the model's.

        Returns:
            dict: ``loss_bs`` and ``loss_l0`` where their loss exists and its
            weight is not 0, and ``gate_open_rate`` (the mean of the hard
            gates, a logged scalar that is not summed into the loss).
        """
        if gates is None:
            gates = gate_modules(self).values()
        outputs, macs = [], []
        for module in gates:
            if module.output is not None:
                outputs.append(module.output)
                macs.append(module.controlled_macs)
        if not outputs:
            raise RuntimeError('no gate ran in the forward pass; is the '
                               'backbone gated in the stages that run?')
        losses = {}
        bs = self.batch_shaping_loss
        if bs is not None and bs.loss_weight != 0:
            shaped = torch.cat(
                [getattr(o, self.shaped_quantity) for o in outputs], dim=1)
            losses[bs.loss_name] = bs(shaped)
        l0 = self.l0_loss
        if l0 is not None and l0.loss_weight != 0:
            losses[l0.loss_name] = l0([o.probs for o in outputs], macs)
        with torch.no_grad():
            hard = torch.cat([o.gates.detach().float() for o in outputs], 1)
            losses['gate_open_rate'] = hard.mean()
        return losses
