"""Gated residual blocks, as mixins over the upstream mmseg/mmpretrain blocks.

The mixins add :class:`~mmgated.models.gates.ChannelGate` modules to an
upstream ``BasicBlock``/``Bottleneck`` and replace its ``forward``; every
convolution and norm layer is the upstream one, under its upstream name, so a
dense checkpoint loads with only the gate keys missing.

BasicBlock (paper Eq. 4)::

    x_{l+1} = relu(W2 * (G(x_l) . relu(W1 * x_l)) + x_l)

Bottleneck: the paper does not say where the gate goes. ``position`` selects
the 1x1-reduced channels after conv1 (``'after_conv1'``), the 3x3 outputs after
conv2 (``'after_conv2'``, the default) or both (``'both'``). With ``p`` planes
and stride 1, conv1, conv2 and conv3 cost ``4p^2``, ``9p^2`` and ``4p^2`` MACs
per output pixel:

* ``after_conv1`` switches conv1's filters and conv2's input channels:
  ``4p^2 + 9p^2 = 13p^2`` of ``17p^2`` (76 %) scale with the open fraction.
* ``after_conv2`` switches conv2's filters and conv3's input channels:
  ``9p^2 + 4p^2 = 13p^2`` (76 %) too, and mirrors the BasicBlock, whose gate
  also sits on the input of the block's last convolution, right before the
  projection back onto the residual stream. It is the default.
* ``both``: conv2 scales with the product of the two open fractions, so the
  gated share is all of conv2 and conv1 and conv3 (100 % reachable), at the
  price of twice the gating modules and of gates that interact.

In the first block of a strided stage (pytorch style) conv1 runs at the input
resolution, four times the pixels of conv2/conv3, which makes ``after_conv1``
the position that controls most MACs there.

The gate always multiplies a map after its ReLU: a closed channel then passes
no gradient back to the filter that made it (the paper's reason, section 4).
"""
import torch
import torch.utils.checkpoint as cp

from .gated_relu import batch_norm_gated_relu
from .gates import ChannelGate, parse_gate_cfg
from .skip_execution import check_skip_mode, skip_residual


def _build_gate(in_channels, out_channels, gate_cfg, norm_cfg):
    return ChannelGate(
        in_channels,
        out_channels,
        hidden_channels=gate_cfg['hidden_channels'],
        tau=gate_cfg['tau'],
        init_bias=gate_cfg['init_bias'],
        norm_cfg=norm_cfg)


def conv_output_size(conv, height, width):
    """Spatial output size of ``conv`` for an input of ``height x width``."""
    sizes = []
    for i, size in enumerate((height, width)):
        k, s = conv.kernel_size[i], conv.stride[i]
        p, d = conv.padding[i], conv.dilation[i]
        sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(sizes)


def channel_macs(produced_by, consumed_by, height, width):
    """MACs that one channel of a ``height x width`` map controls: its filter
    in ``produced_by`` and its input slice in ``consumed_by``."""
    kh, kw = produced_by.kernel_size
    produce = produced_by.in_channels // produced_by.groups * kh * kw
    kh, kw = consumed_by.kernel_size
    out_h, out_w = conv_output_size(consumed_by, height, width)
    consume = consumed_by.out_channels // consumed_by.groups * kh * kw
    return float(produce * height * width + consume * out_h * out_w)


class _GatedBlockMixin:
    """Shared construction and the checkpointed forward of gated blocks.

    Subclasses name their gates in ``gate_names`` and implement
    ``_residual(x, *gates)``, the residual branch with the gates applied.
    ``gate_cfg=None`` builds the block without gates (an ungated stage).
    """

    def __init__(self, *args, gate_cfg=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate_cfg = None if gate_cfg is None else parse_gate_cfg(gate_cfg)
        self._gate_norm_cfg = kwargs.get('norm_cfg') or dict(type='BN')
        # 'mask' or 'skip' (see skip_execution.py); set_gate_execution
        # switches it on a built model.
        self.gate_execution = 'mask' if gate_cfg is None \
            else self.gate_cfg['execution']

    @property
    def gated(self) -> bool:
        return self.gate_cfg is not None

    def _activate(self, out, norm, gate, name, produced_by, consumed_by):
        """``relu(norm(out))``, times the gate of module ``name`` if
        gated."""
        if gate is None:
            return self.relu(norm(out))
        module = getattr(self, name)
        map_size = tuple(out.shape[2:])
        if module.map_size != map_size or module.controlled_macs is None:
            module.map_size = map_size
            module.controlled_macs = channel_macs(produced_by, consumed_by,
                                                  *map_size)
        if type(self.relu) is torch.nn.ReLU \
                and not torch.jit.is_tracing():
            return batch_norm_gated_relu(out, norm, gate)
        # Other activations, and the MAC counters' traces, which count
        # the norm and the product as the operations they are.
        out = self.relu(norm(out))
        return out * gate.to(out.dtype)[:, :, None, None]

    def gated_convs(self):
        """The convolutions of the residual branch with the names of the
        gates on their input and output channels (``None`` where ungated).

        Returns:
            list[tuple[nn.Conv2d, str | None, str | None]]
        """
        names = list(self.gate_names)
        convs = [getattr(self, f'conv{i + 1}') for i in range(len(names) + 1)]
        present = [n if hasattr(self, n) else None for n in names]
        return [(conv, ([None] + present)[i], (present + [None])[i])
                for i, conv in enumerate(convs)]

    def _gates(self, x):
        modules = self._modules
        return [modules[name](x) if name in modules else None
                for name in self.gate_names]

    def _shortcut(self, x):
        return x if self.downsample is None else self.downsample(x)

    def _inner_forward(self, x, *gates):
        """Residual branch plus shortcut, before the final activation."""
        identity = self._shortcut(x)
        out = self._residual(x, *gates)
        drop_path = self._modules.get('drop_path')  # mmpretrain only
        if drop_path is not None:
            out = drop_path(out)
        # In place, as upstream: no backward needs the branch output.
        out += identity
        return out

    def forward(self, x):
        """Forward with gates computed from the block input ``x``."""
        if self.gate_execution == 'skip':
            return self._skip_forward(x)
        # The gates are computed outside the checkpointed function so that
        # their outputs keep a graph for the gate losses under with_cp.
        gates = self._gates(x)
        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(self._inner_forward, x, *gates,
                                use_reentrant=False)
        else:
            out = self._inner_forward(x, *gates)
        return self.relu(out)

    def _skip_forward(self, x):
        """Forward in skip execution (eval only, where drop path is the
        identity): the shortcut and the final ReLU go into the residual
        branch's last convolution."""
        check_skip_mode(self)
        gates = self._gates(x)
        identity = self._shortcut(x)
        return skip_residual(self, x, *gates, shortcut=identity, relu=True)


class GatedBasicBlockMixin(_GatedBlockMixin):
    """Gate the output of ``relu(norm1(conv1(x)))`` (paper Eq. 4)."""

    gate_names = ('gate', )

    def __init__(self, *args, gate_cfg=None, **kwargs):
        super().__init__(*args, gate_cfg=gate_cfg, **kwargs)
        if self.gated:
            self.gate = _build_gate(self.conv1.in_channels,
                                    self.conv1.out_channels, self.gate_cfg,
                                    self._gate_norm_cfg)

    def _residual(self, x, gate):
        out = self._activate(self.conv1(x), self.norm1, gate, 'gate',
                             self.conv1, self.conv2)
        return self.norm2(self.conv2(out))


class GatedBottleneckMixin(_GatedBlockMixin):
    """Gate the bottleneck after conv1, after conv2 or both (see module doc).

    Gates sit right after the ReLU, before any mmseg plugin at the same
    position.
    """

    gate_names = ('gate1', 'gate2')

    def __init__(self, *args, gate_cfg=None, **kwargs):
        super().__init__(*args, gate_cfg=gate_cfg, **kwargs)
        if self.gated:
            position = self.gate_cfg['position']
            in_channels = self.conv1.in_channels
            if position in ('after_conv1', 'both'):
                self.gate1 = _build_gate(in_channels, self.conv1.out_channels,
                                         self.gate_cfg, self._gate_norm_cfg)
            if position in ('after_conv2', 'both'):
                self.gate2 = _build_gate(in_channels, self.conv2.out_channels,
                                         self.gate_cfg, self._gate_norm_cfg)

    def _plugins(self, out, position):
        if getattr(self, 'with_plugins', False):
            out = self.forward_plugin(
                out, getattr(self, f'after_{position}_plugin_names'))
        return out

    def _residual(self, x, gate1, gate2):
        out = self._activate(self.conv1(x), self.norm1, gate1, 'gate1',
                             self.conv1, self.conv2)
        out = self._plugins(out, 'conv1')
        out = self._activate(self.conv2(out), self.norm2, gate2, 'gate2',
                             self.conv2, self.conv3)
        out = self._plugins(out, 'conv2')
        return self._plugins(self.norm3(self.conv3(out)), 'conv3')


def is_gated_block(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a gated residual block with its gates built."""
    return isinstance(module, _GatedBlockMixin) and module.gated
