"""Gated ResNets for MMPretrain, built on mmpretrain's ``ResNet``, and the
CIFAR ResNets of the paper (depth 6n+2) in a dense and a gated version."""
from mmpretrain.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from mmpretrain.models.backbones.resnet_cifar import ResNet_CIFAR
from mmpretrain.registry import MODELS

from ..blocks import GatedBasicBlockMixin, GatedBottleneckMixin
from .gated_backbone import GatedBackboneMixin


class GatedBasicBlock(GatedBasicBlockMixin, BasicBlock):
    """mmpretrain ``BasicBlock`` with a channel gate between its
    convolutions."""


class GatedBottleneck(GatedBottleneckMixin, Bottleneck):
    """mmpretrain ``Bottleneck`` with channel gates."""


def _gated_arch(arch_settings):
    gated = {BasicBlock: GatedBasicBlock, Bottleneck: GatedBottleneck}
    return {depth: (gated[block], stages)
            for depth, (block, stages) in arch_settings.items()}


@MODELS.register_module()
class GatedResNet(GatedBackboneMixin, ResNet):
    """mmpretrain ``ResNet`` whose residual blocks gate their inner channels.

    Accepts every argument of :class:`mmpretrain.models.ResNet` (depth 18,
    34, 50, 101, 152) plus ``gate_cfg``, and returns the same feature tuple.

    Args:
        gate_cfg (dict, optional): Gating options, see
            :func:`mmgated.models.gates.parse_gate_cfg`.
        **kwargs: The arguments of mmpretrain's ``ResNet``.
    """

    arch_settings = _gated_arch(ResNet.arch_settings)


@MODELS.register_module()
class GatedResNetV1c(GatedResNet):
    """Gated version of mmpretrain's ``ResNetV1c`` (deep 3x3 stem)."""

    def __init__(self, **kwargs):
        super().__init__(deep_stem=True, avg_down=False, **kwargs)


@MODELS.register_module()
class GatedResNetV1d(GatedResNet):
    """Gated version of mmpretrain's ``ResNetV1d``."""

    def __init__(self, **kwargs):
        super().__init__(deep_stem=True, avg_down=True, **kwargs)


@MODELS.register_module()
class ResNetCifar(ResNet_CIFAR):
    """The CIFAR ResNets of He et al. used by the paper (ResNet-20/32/...).

    Depth ``6n + 2``: a 3x3 stem with 16 channels, no max-pooling, and three
    stages of ``n`` BasicBlocks with 16, 32 and 64 channels (strides 1, 2, 2).
    Unlike the original option-A (zero-padding) shortcuts, downsampling
    shortcuts are 1x1 convolutions with BN, as in mmpretrain.

    Args:
        depth (int): 20, 32, 44, 56 or 110.
        **kwargs: The arguments of mmpretrain's ``ResNet_CIFAR``; defaults
            changed to ``stem_channels=16, base_channels=16, num_stages=3,
            strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(2, )``.
    """

    arch_settings = {
        depth: (BasicBlock, ((depth - 2) // 6, ) * 3)
        for depth in (20, 32, 44, 56, 110)
    }

    def __init__(self,
                 depth,
                 stem_channels=16,
                 base_channels=16,
                 num_stages=3,
                 strides=(1, 2, 2),
                 dilations=(1, 1, 1),
                 out_indices=(2, ),
                 **kwargs):
        super().__init__(
            depth,
            stem_channels=stem_channels,
            base_channels=base_channels,
            num_stages=num_stages,
            strides=strides,
            dilations=dilations,
            out_indices=out_indices,
            **kwargs)


@MODELS.register_module()
class GatedResNetCifar(GatedBackboneMixin, ResNetCifar):
    """:class:`ResNetCifar` with channel-gated blocks (ResNet20/32-BAS).

    Args:
        depth (int): 20, 32, 44, 56 or 110.
        gate_cfg (dict, optional): See
            :func:`mmgated.models.gates.parse_gate_cfg`.
        **kwargs: The arguments of :class:`ResNetCifar`.
    """

    arch_settings = _gated_arch(ResNetCifar.arch_settings)
