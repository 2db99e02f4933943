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

from .gates import ChannelGate, parse_gate_cfg


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


def gate_mul(out: torch.Tensor, gate) -> torch.Tensor:
    """``G(x) . out``: each sample's channels times its 0/1 gates (none:
    ungated)."""
    if gate is None:
        return out
    return out * gate.to(out.dtype)[:, :, None, None]


class _GatedBlockMixin:
    """Shared construction and forward of gated blocks.

    Subclasses name their gates in ``gate_names`` and implement
    ``residual(x, *gates)``, the residual branch with the gates applied.
    ``gate_cfg=None`` builds the block without gates (an ungated stage).

    A block in skip execution (see :func:`mmgated.models.set_gate_execution`)
    holds a ``skip_runner`` that computes the whole block from its input;
    in mask execution it is ``None``.
    """

    def __init__(self, *args, gate_cfg=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate_cfg = None if gate_cfg is None else parse_gate_cfg(gate_cfg)
        self._gate_norm_cfg = kwargs.get('norm_cfg') or dict(type='BN')
        self.skip_runner = None

    @property
    def gated(self) -> bool:
        return self.gate_cfg is not None

    @property
    def gate_execution(self) -> str:
        """``'skip'`` or ``'mask'``; set with ``set_gate_execution``."""
        return 'mask' if self.skip_runner is None else 'skip'

    def gates(self, x):
        """The block's gates for input ``x``, in ``gate_names`` order (None
        where the block has no such gate)."""
        return [getattr(self, name)(x) if hasattr(self, name) else None
                for name in self.gate_names]

    def forward(self, x):
        """``relu(residual(x, G(x)) + shortcut(x))``."""
        if self.skip_runner is not None:
            return self.skip_runner(x)
        # The gates are computed outside the checkpointed function so that
        # their outputs keep a graph for the gate losses under with_cp.
        gates = self.gates(x)

        def residual_plus_shortcut(x, *gates):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.residual(x, *gates)
            drop_path = getattr(self, 'drop_path', None)  # mmpretrain only
            if drop_path is not None:
                out = drop_path(out)
            return out + identity

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(residual_plus_shortcut, x, *gates,
                                use_reentrant=False)
        else:
            out = residual_plus_shortcut(x, *gates)
        return self.relu(out)

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

    def gated_map_sizes(self, input_size):
        """Spatial size of the map each gate of the block multiplies, for a
        block input of ``input_size`` ``(H, W)``.

        Returns:
            dict[str, tuple[int, int]]: Gate name to ``(H, W)``.
        """
        sizes, size = {}, tuple(input_size)
        for conv, _, out_gate in self.gated_convs()[:-1]:
            size = conv_output_size(conv, *size)
            if out_gate is not None:
                sizes[out_gate] = size
        return sizes

    def controlled_macs(self, input_size):
        """MACs that one channel of each gate controls (its filter and the
        next convolution's input slice), for a block input of
        ``input_size``.

        Returns:
            dict[str, float]: Gate name to MACs.
        """
        convs = self.gated_convs()
        sizes = self.gated_map_sizes(input_size)
        return {out_gate: channel_macs(conv, convs[i + 1][0],
                                       *sizes[out_gate])
                for i, (conv, _, out_gate) in enumerate(convs[:-1])
                if out_gate is not None}


class GatedBasicBlockMixin(_GatedBlockMixin):
    """Gate the output of ``relu(norm1(conv1(x)))`` (paper Eq. 4)."""

    gate_names = ('gate', )

    def __init__(self, *args, gate_cfg=None, **kwargs):
        super().__init__(*args, gate_cfg=gate_cfg, **kwargs)
        if self.gated:
            self.gate = _build_gate(self.conv1.in_channels,
                                    self.conv1.out_channels, self.gate_cfg,
                                    self._gate_norm_cfg)

    def residual(self, x, gate):
        """``W2 * (G(x) . relu(W1 * x))`` of Eq. 4, with the norms."""
        out = self.relu(self.norm1(self.conv1(x)))
        out = gate_mul(out, gate)
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

    def residual(self, x, gate1, gate2):
        """``W3 * (G2(x) . relu(W2 * (G1(x) . relu(W1 * x))))``, with the
        norms (and mmseg's plugins after each convolution)."""
        out = self.relu(self.norm1(self.conv1(x)))
        out = self._plugins(gate_mul(out, gate1), 'conv1')
        out = self.relu(self.norm2(self.conv2(out)))
        out = self._plugins(gate_mul(out, gate2), 'conv2')
        return self._plugins(self.norm3(self.conv3(out)), 'conv3')


def is_gated_block(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a gated residual block with its gates built."""
    return isinstance(module, _GatedBlockMixin) and module.gated
