"""Gated ResNets for MMSegmentation, built on mmseg's ``ResNet``."""
from mmseg.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from mmseg.registry import MODELS

from ..blocks import GatedBasicBlockMixin, GatedBottleneckMixin
from .gated_backbone import GatedBackboneMixin


class GatedBasicBlock(GatedBasicBlockMixin, BasicBlock):
    """mmseg ``BasicBlock`` with a channel gate between its convolutions."""


class GatedBottleneck(GatedBottleneckMixin, Bottleneck):
    """mmseg ``Bottleneck`` with channel gates (see :mod:`..blocks`)."""


@MODELS.register_module()
class GatedResNet(GatedBackboneMixin, ResNet):
    """mmseg ``ResNet`` whose residual blocks gate their inner channels.

    Accepts every argument of :class:`mmseg.models.backbones.ResNet` and
    returns the same feature tuple. With all gates open
    (:func:`mmgated.models.force_gates`) it computes what ``ResNet`` computes
    with the same weights; a dense checkpoint loads with only the gate keys
    missing.

    Args:
        gate_cfg (dict, optional): Gating options, see
            :func:`mmgated.models.gates.parse_gate_cfg`. Default: None (the
            paper's module: hidden width 16, tau 2/3).
        **kwargs: The arguments of mmseg's ``ResNet``.

    Example:
        >>> backbone = GatedResNet(depth=18, gate_cfg=dict(tau=2 / 3))
    """

    arch_settings = {
        18: (GatedBasicBlock, (2, 2, 2, 2)),
        34: (GatedBasicBlock, (3, 4, 6, 3)),
        50: (GatedBottleneck, (3, 4, 6, 3)),
        101: (GatedBottleneck, (3, 4, 23, 3)),
        152: (GatedBottleneck, (3, 8, 36, 3))
    }

    def __init__(self, *args, init_cfg=None, pretrained=None, **kwargs):
        # mmseg zero-initialises the last norm of each block only when the
        # block class *is* BasicBlock/Bottleneck; keep that for subclasses.
        self._zero_init_last_norm = init_cfg is None and pretrained is None
        super().__init__(
            *args, init_cfg=init_cfg, pretrained=pretrained, **kwargs)

    def make_res_layer(self, **kwargs):
        if (self.zero_init_residual and self._zero_init_last_norm
                and kwargs.get('init_cfg') is None):
            last_norm = ('norm3' if issubclass(kwargs['block'], Bottleneck)
                         else 'norm2')
            kwargs['init_cfg'] = dict(
                type='Constant', val=0, override=dict(name=last_norm))
        return super().make_res_layer(**kwargs)


@MODELS.register_module()
class GatedResNetV1c(GatedResNet):
    """Gated version of mmseg's ``ResNetV1c`` (deep 3x3 stem), the backbone
    of PSPNet-R50-D8."""

    def __init__(self, **kwargs):
        super().__init__(deep_stem=True, avg_down=False, **kwargs)


@MODELS.register_module()
class GatedResNetV1d(GatedResNet):
    """Gated version of mmseg's ``ResNetV1d`` (deep stem, average-pool
    downsampling)."""

    def __init__(self, **kwargs):
        super().__init__(deep_stem=True, avg_down=True, **kwargs)
