"""Gated blocks without their static channels.

A trained gate ends up, per channel, always on, always off or conditional
(paper Fig. 4). A *compact* gated map keeps the channels that are not always
off, ordered conditional first and always-on after; the filters of the
removed channels leave the convolution (and norm) that produces the map and
their input slices leave the convolution that reads it. Its
:class:`CompactChannelGate` computes the logits of the conditional channels
only and passes the always-on ones through; a map without conditional
channels keeps no gating module at all.

The architecture is data, a backbone's ``channel_layout``: gate module name
within the backbone (``'layer1.0.gate'``) to ``[kept, conditional]``
channels. A config with that layout builds the compact network and its
checkpoint fills it; :func:`mmgated.deploy.compact_model` derives both from
a trained gated model.
"""
import copy
from typing import Mapping, Optional

import torch
import torch.nn as nn

from .blocks import is_gated_block
from .gates import ChannelGate, GateOutput


class CompactChannelGate(ChannelGate):
    """A :class:`ChannelGate` over ``num_conditional`` channels followed by
    ``num_always_on`` channels that are always open.

    The gating module computes the logits of the conditional channels only;
    the output (and the recorded :class:`GateOutput`) covers all kept
    channels, the always-on ones with gate 1, probability 1 and logit
    ``+inf``, so losses, metrics and MAC accounting read it as any gate.

    Args:
        in_channels (int): Channels of the block input that is pooled.
        num_conditional (int): Channels with a learned gate (>= 1).
        num_always_on (int): Channels after them that are always open.
        **kwargs: Other arguments of :class:`ChannelGate`.
    """

    def __init__(self, in_channels: int, num_conditional: int,
                 num_always_on: int, **kwargs):
        super().__init__(in_channels, num_conditional, **kwargs)
        self.num_always_on = num_always_on
        self.out_channels = num_conditional + num_always_on

    def forward(self,
                x: torch.Tensor,
                fold_norm: bool = False) -> torch.Tensor:
        gates = super().forward(x, fold_norm)
        if not self.num_always_on:
            return gates
        out = self.output
        ones = gates.new_ones(gates.shape[0], self.num_always_on)
        self.output = GateOutput(
            torch.cat([out.logits, torch.full_like(ones, float('inf'))], 1),
            torch.cat([out.probs, ones], 1),
            torch.cat([out.relaxed, ones], 1),
            torch.cat([out.gates, ones], 1), out.input_size)
        return torch.cat([gates, ones], 1)

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, '
                f'num_always_on={self.num_always_on}')


def gated_map_index(block: nn.Module, gate_name: str):
    """The index ``j`` of the map gate ``gate_name`` multiplies: the output
    of ``conv{j+1}`` and ``norm{j+1}``, read by ``conv{j+2}``."""
    for j, (_, _, out_gate) in enumerate(block.gated_convs()):
        if out_gate == gate_name:
            return j
    raise ValueError(f'{type(block).__name__} has no gate {gate_name!r}; '
                     f'its gates are {list(block.gate_names)}')


def check_compactable(block: nn.Module, name: str = 'block') -> None:
    """Raise ``ValueError`` if the compaction cannot rewrite ``block``.

    It rewrites plain convolutions (no groups) and BatchNorm layers (BN,
    SyncBN) around each gated map, with no mmseg plugin in the block.
    """
    if not is_gated_block(block):
        raise ValueError(f'{name} ({type(block).__name__}) is not a gated '
                         'block')
    if getattr(block, 'with_plugins', False):
        raise ValueError(f'{name} has mmseg plugins, whose channels the '
                         'compaction does not know how to remove')
    convs = [conv for conv, _, _ in block.gated_convs()]
    for j, conv in enumerate(convs):
        if type(conv) is not nn.Conv2d or conv.groups != 1:
            raise ValueError(
                f'{name}.conv{j + 1} is a {type(conv).__name__} with '
                f'groups={getattr(conv, "groups", None)}; the compaction '
                'removes channels of plain nn.Conv2d with groups=1 only')
    for j in range(len(convs) - 1):
        norm = getattr(block, f'norm{j + 1}')
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f'{name}.norm{j + 1} is a {type(norm).__name__}; the '
                'compaction removes channels of BatchNorm layers (BN, '
                'SyncBN) only: the statistics of other norms (GN, LN) mix '
                'channels')


def _sliced(module: nn.Module, **slices) -> nn.Module:
    """A copy of ``module`` whose tensors are sliced: ``out`` indexes dim 0
    of every parameter and buffer with a channel axis, ``in_`` dim 1 of a
    conv weight."""
    new = copy.deepcopy(module)
    out, in_ = slices.get('out'), slices.get('in_')
    for key, tensor in list(new.named_parameters(recurse=False)) + list(
            new.named_buffers(recurse=False)):
        if tensor is None or tensor.dim() == 0:
            continue  # num_batches_tracked
        value = tensor.detach()
        if out is not None:
            value = value[out]
        if in_ is not None and key == 'weight' and value.dim() == 4:
            value = value[:, in_]
        value = value.clone()
        if isinstance(tensor, nn.Parameter):
            setattr(new, key, nn.Parameter(value,
                                           tensor.requires_grad))
        else:
            setattr(new, key, value)
    if isinstance(new, nn.Conv2d):
        new.out_channels, new.in_channels = new.weight.shape[:2]
    elif isinstance(new, nn.Linear):
        new.out_features, new.in_features = new.weight.shape
    else:
        new.num_features = new.weight.shape[0] if new.weight is not None \
            else new.running_mean.shape[0]
    return new


def shrink_gated_map(block: nn.Module, gate_name: str, keep: torch.Tensor,
                     num_conditional: int) -> None:
    """Keep only channels ``keep`` of the map gate ``gate_name`` multiplies.

    ``keep`` lists the kept channels, the ``num_conditional`` conditional
    ones first; the others are always on. The producing convolution and
    norm keep the filters ``keep``, the consuming convolution those input
    channels, and the gate becomes a :class:`CompactChannelGate` over the
    conditional channels (or is removed when there is none). Rewrites
    ``block`` in place.

    Args:
        block (nn.Module): A gated block (see :func:`check_compactable`).
        gate_name (str): ``'gate'``, ``'gate1'`` or ``'gate2'``.
        keep (Tensor): Indices of the kept channels, at least one.
        num_conditional (int): How many of them, first, stay gated; they
            must be channels the gate computes a logit for.
    """
    j = gated_map_index(block, gate_name)
    keep = torch.as_tensor(keep, dtype=torch.long)
    gate = getattr(block, gate_name)
    produce, consume = f'conv{j + 1}', f'conv{j + 2}'
    setattr(block, produce, _sliced(getattr(block, produce), out=keep))
    norm_name = getattr(block, f'norm{j + 1}_name')
    setattr(block, norm_name, _sliced(getattr(block, norm_name), out=keep))
    setattr(block, consume, _sliced(getattr(block, consume), in_=keep))
    if num_conditional == 0:
        delattr(block, gate_name)
        return
    rows = keep[:num_conditional]
    new = CompactChannelGate(
        gate.in_channels, num_conditional, len(keep) - num_conditional,
        hidden_channels=gate.fc1.out_features, tau=gate.tau,
        norm_cfg=block._gate_norm_cfg)
    new.fc1 = copy.deepcopy(gate.fc1)
    new.norm = copy.deepcopy(gate.norm)
    new.fc2 = _sliced(gate.fc2, out=rows)
    new.to(gate.fc2.weight.device).train(gate.training)
    setattr(block, gate_name, new)


def check_channel_layout(backbone: nn.Module, layout: Mapping) -> dict:
    """Validate a backbone's ``channel_layout``.

    Returns:
        dict: Gate name to ``(kept, conditional)`` ints.

    Raises:
        ValueError: An entry that names no gate of the backbone, or whose
            counts are not ``1 <= kept <= channels`` and ``0 <= conditional
            <= kept`` (``conditional <= `` the gate's logits).
    """
    if not isinstance(layout, Mapping):
        raise ValueError('channel_layout must be a dict of gate name to '
                         f'[kept, conditional], got {layout!r}')
    parsed = {}
    modules = dict(backbone.named_modules())
    for name, counts in layout.items():
        block_name, _, gate_name = str(name).rpartition('.')
        block = modules.get(block_name)
        gate = getattr(block, gate_name, None) if block is not None else None
        if not isinstance(gate, ChannelGate):
            raise ValueError(f'channel_layout names {name!r}, which is not '
                             f'a gate of {type(backbone).__name__}')
        ok = isinstance(counts, (list, tuple)) and len(counts) == 2 and all(
            isinstance(c, int) and not isinstance(c, bool) for c in counts)
        if not ok or not (1 <= counts[0] <= gate.out_channels
                          and 0 <= counts[1] <= min(
                              counts[0], gate.fc2.out_features)):
            raise ValueError(
                f'channel_layout[{name!r}] = {counts!r}: allowed is '
                '[kept, conditional] with 1 <= kept <= '
                f'{gate.out_channels} and 0 <= conditional <= '
                f'min(kept, {gate.fc2.out_features})')
        check_compactable(block, block_name)
        parsed[name] = (counts[0], counts[1])
    return parsed


def apply_channel_layout(backbone: nn.Module,
                         layout: Optional[Mapping]) -> None:
    """Build the compact architecture a ``channel_layout`` describes (the
    weights are the freshly initialised ones, cut to size; a checkpoint of
    the compact model fills them)."""
    for name, (kept, conditional) in check_channel_layout(
            backbone, layout or {}).items():
        block_name, _, gate_name = name.rpartition('.')
        shrink_gated_map(backbone.get_submodule(block_name), gate_name,
                         torch.arange(kept), conditional)
