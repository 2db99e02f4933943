"""The gate losses of a gated model, shared by the segmentor and the
classifier."""
import torch

from .gates import clear_gates, collect_gates, gate_modules

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
        # A compact model (mmgated.deploy) may have no gate left at all.
        if not gate_modules(self) and not getattr(self.backbone,
                                                  'channel_layout', None):
            raise ValueError(
                f'{type(self).__name__} needs a gated backbone, but '
                f'{type(self.backbone).__name__} has no ChannelGate; use one '
                'of GatedResNet, GatedResNetV1c, GatedResNetCifar')
        if shaped_quantity not in SHAPED_QUANTITIES:
            raise ValueError(f'shaped_quantity {shaped_quantity!r} is not '
                             f'one of {SHAPED_QUANTITIES}')
        self.shaped_quantity = shaped_quantity
        self.batch_shaping_loss = self.models_registry.build(
            batch_shaping_loss) if batch_shaping_loss else None
        self.l0_loss = self.models_registry.build(
            l0_loss) if l0_loss else None

    def loss(self, inputs, data_samples) -> dict:
        """The parent's losses plus :meth:`gate_losses`."""
        clear_gates(self)
        losses = super().loss(inputs, data_samples)
        losses.update(self.gate_losses())
        return losses

    def predict(self, inputs, data_samples=None):
        """The parent's predictions, each with its gate record.

        Adds to the metainfo of every returned data sample, for
        :class:`mmgated.evaluation.GateMetric` and the analysis tools:
        ``gate_open`` (dict: gate name to the sample's 0/1 decisions, a
        bool tensor), ``gate_input_sizes`` (dict: gate name to the ``(H, W)``
        of the block input it saw) and ``model_input_shape`` (``(C, H, W)``
        of the batch the model ran). MACs are counted from these by
        :mod:`mmgated.analysis`, not here.
        """
        clear_gates(self)
        results = super().predict(inputs, data_samples)
        gates = collect_gates(self)
        if not self._gates_cover_batch(gates, inputs.shape[0]):
            return results
        gate_open = {name: g.gates.detach().bool().cpu()
                     for name, g in gates.items()}
        sizes = {name: tuple(g.input_size) for name, g in gates.items()}
        for i, sample in enumerate(results):
            sample.set_metainfo(
                dict(
                    gate_open={k: v[i] for k, v in gate_open.items()},
                    gate_input_sizes=sizes,
                    model_input_shape=tuple(inputs.shape[1:])))
        return results

    def _gates_cover_batch(self, gates, batch_size) -> bool:
        # Sliding-window inference runs the backbone once per crop; the
        # recorded gates then describe the last crop only.
        if len(gates) != len(gate_modules(self)) or any(
                g.gates.shape[0] != batch_size for g in gates.values()):
            return False
        test_cfg = getattr(self, 'test_cfg', None) or {}
        return test_cfg.get('mode', 'whole') == 'whole'

    def controlled_macs(self, gates) -> list:
        """The MACs one channel of each gate controls, at the map sizes of
        the recorded batch (for ``GateL0Loss(weighting='macs')``).

        Args:
            gates (dict[str, GateOutput]): As :func:`collect_gates` gives.

        Returns:
            list[float]: One figure per gate, in the order of ``gates``.
        """
        # Each gate's block by its name: no walk over the whole model on
        # every training step.
        macs = []
        for name, output in gates.items():
            block_name, _, gate_name = name.rpartition('.')
            block = self.get_submodule(block_name)
            macs.append(block.controlled_macs(output.input_size)[gate_name])
        return macs

    def gate_losses(self) -> dict:
        """Gate losses and statistics of the last forward pass.

        Returns:
            dict: ``loss_bs`` and ``loss_l0`` where their loss exists and its
            weight is not 0, and ``gate_open_rate`` (the mean of the hard
            gates, a logged scalar that is not summed into the loss).
        """
        gates = collect_gates(self)
        if not gates:
            if not gate_modules(self):
                return {}  # a compact model whose gates were all static
            raise RuntimeError('no gate ran in the forward pass; is the '
                               'backbone gated in the stages that run?')
        outputs = list(gates.values())
        losses = {}
        bs = self.batch_shaping_loss
        if bs is not None and bs.loss_weight != 0:
            shaped = torch.cat(
                [getattr(o, self.shaped_quantity) for o in outputs], dim=1)
            losses[bs.loss_name] = bs(shaped)
        l0 = self.l0_loss
        if l0 is not None and l0.loss_weight != 0:
            macs = self.controlled_macs(gates) \
                if l0.weighting == 'macs' else None
            losses[l0.loss_name] = l0([o.probs for o in outputs], macs)
        with torch.no_grad():
            hard = torch.cat([o.gates.detach().float() for o in outputs], 1)
            losses['gate_open_rate'] = hard.mean()
        return losses
