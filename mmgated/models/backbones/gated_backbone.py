"""What every gated ResNet backbone adds to its upstream dense class."""
import torch

from ..compact import apply_channel_layout
from ..gates import check_gated_stages, gate_modules, parse_gate_cfg
from ..skip_execution import set_gate_execution


class GatedBackboneMixin:
    """Pass ``gate_cfg`` to the blocks of the gated stages.

    Put before the upstream ResNet class in the bases. The upstream
    ``__init__`` builds the stages through ``make_res_layer``, in order; this
    mixin adds ``gate_cfg`` to the blocks of the stages listed in
    ``gate_cfg['stages']`` (all stages when it is ``None``). The blocks of
    ``arch_settings`` must be gated blocks, which are dense without a
    ``gate_cfg``.

    Args:
        gate_cfg (dict, optional): See
            :func:`mmgated.models.gates.parse_gate_cfg`.
        channel_layout (dict, optional): The compact architecture of a
            model without its static channels, as
            :func:`mmgated.deploy.compact_model` writes it (see
            :mod:`mmgated.models.compact`). Default: None (all channels).
    """

    def __init__(self, *args, gate_cfg=None, channel_layout=None, **kwargs):
        depth = kwargs['depth'] if 'depth' in kwargs else args[0]
        if depth not in self.arch_settings:
            raise KeyError(f'invalid depth {depth!r} for {type(self).__name__}'
                           f'; allowed depths are {sorted(self.arch_settings)}')
        # Set before the upstream __init__, which calls make_res_layer.
        self.gate_cfg = parse_gate_cfg(gate_cfg)
        self._next_stage = 0
        super().__init__(*args, **kwargs)
        check_gated_stages(self.gate_cfg['stages'], self.num_stages)
        del self._next_stage
        self.channel_layout = dict(channel_layout or {})
        apply_channel_layout(self, self.channel_layout)
        if self.gate_cfg['execution'] == 'skip':
            set_gate_execution(self, 'skip')

    def forward(self, x):
        """Upstream ``forward``, after checking the input's dtype.

        Raises:
            TypeError: A floating input whose dtype differs from the weights'
                outside autocast, e.g. float64 images into a float32 model,
                which PyTorch would report deep inside a convolution.
        """
        weight = next(self.parameters())
        if (x.is_floating_point() and x.dtype != weight.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(
                f'{type(self).__name__} got a {x.dtype} input but its '
                f'weights are {weight.dtype}: cast the input '
                f'(x.to({weight.dtype})) or the model (model.to({x.dtype})),'
                " or feed images through the model's data_preprocessor, "
                'which casts them to float32')
        return super().forward(x)

    def train(self, mode: bool = True):
        """Upstream ``train``; ``norm_eval`` leaves the gates' norms training.

        ``norm_eval`` freezes the statistics of a (pretrained) backbone's
        norm layers; the gating modules are new, so their BN keeps learning
        its statistics, except in ``frozen_stages``.
        """
        super().train(mode)
        if mode and self.norm_eval:
            for name, gate in gate_modules(self).items():
                stage = int(name[len('layer')]) if name.startswith(
                    'layer') else 0
                if stage > self.frozen_stages:
                    gate.norm.train()
        return self

    def make_res_layer(self, **kwargs):
        stage = self._next_stage
        self._next_stage += 1
        stages = self.gate_cfg['stages']
        if stages is None or stage in stages:
            kwargs['gate_cfg'] = self.gate_cfg
        return super().make_res_layer(**kwargs)
