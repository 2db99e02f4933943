"""Skip execution: compute only the open channels of a gated block.

In the default ``'mask'`` execution a gated block computes every channel and
multiplies the closed ones by zero, so the gates save MACs only on paper. In
``'skip'`` execution, for each sample, the convolution that produces a gated
map computes only the open filters, its BN uses the running statistics and
affine parameters of the open channels only, and the next convolution reads
only the matching input channels. The result is the mask result up to
floating point reordering (closed channels contribute exact zeros there).

How a batch runs (see :func:`skip_residual`):

* Everything before the first and after the last convolution that touches a
  gated map is computed densely for the whole batch (for example conv1 of a
  Bottleneck gated after conv2, or conv3 of one gated after conv1).
* When every gate of the block is open for the whole batch, the dense layers
  run as they are: no gather, no mask, the cost of the dense block.
* Otherwise the samples are grouped by gate pattern, and each group runs
  with the weights of its open channels gathered with ``index_select``: one
  ``F.conv2d`` per convolution and group. With batch 1 (the latency case)
  that is exactly one gather and one convolution each. When the batch's
  patterns differ but its union of open channels is small (gates closed for
  the whole batch), computing the union for the whole batch and masking is
  cheaper than many small convolutions; a MAC estimate picks the cheaper one.

Skip execution is for inference only: the block must be in eval mode (its BN
layers use running statistics, which the per-channel indexing relies on).
It needs plain zero-padded ``nn.Conv2d`` layers with ``groups=1``, BN norm
layers with running statistics, and no mmseg plugin right after a gated map;
:func:`check_skip_support` says which block breaks which of these.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gates import GATE_EXECUTIONS

try:  # mmcv's Conv2d only adds empty-tensor support to nn.Conv2d
    from mmcv.cnn.bricks.wrappers import Conv2d as _MMCVConv2d
    _PLAIN_CONVS: Tuple[type, ...] = (nn.Conv2d, _MMCVConv2d)
except ImportError:  # pragma: no cover - mmcv is a dependency
    _PLAIN_CONVS = (nn.Conv2d, )

# Per-group convolutions are less efficient than one batched convolution
# (smaller GEMMs, a gather and a scatter each); a grouped plan must save more
# than this fraction of the union plan's MACs to be chosen.
GROUP_OVERHEAD = 0.15


def set_gate_execution(model: nn.Module, execution: str) -> nn.Module:
    """Switch every gated block of a built model to ``'mask'`` or ``'skip'``.

    Args:
        model (nn.Module): A model with gated blocks (backbone, classifier,
            segmentor), possibly inside a model wrapper.
        execution (str): ``'mask'`` (compute all channels, multiply the
            closed ones by 0; needed for training) or ``'skip'`` (compute the
            open channels only; eval only).

    Returns:
        nn.Module: ``model``, for chaining.

    Raises:
        ValueError: ``execution`` is not one of ``('mask', 'skip')``, or the
            model has no gated block.
        NotImplementedError: ``'skip'`` and a block skip execution cannot
            run (see :func:`check_skip_support`); no block is switched then.
    """
    from .blocks import is_gated_block
    if execution not in GATE_EXECUTIONS:
        raise ValueError(f'gate execution {execution!r} is not one of '
                         f'{GATE_EXECUTIONS}')
    blocks = [(name, m) for name, m in model.named_modules()
              if is_gated_block(m)]
    if not blocks:
        raise ValueError(f'{type(model).__name__} has no gated block whose '
                         'gate execution could be set')
    if execution == 'skip':
        # Check all blocks before switching any, so a failure leaves the
        # model as it was.
        for name, block in blocks:
            check_skip_support(block, name)
    for _, block in blocks:
        block.__dict__.pop('_skip_checked', None)
        block.gate_execution = execution
        block.gate_cfg['execution'] = execution
    # Keep the backbones' copies of gate_cfg in step, for logs and configs.
    for m in model.modules():
        cfg = getattr(m, 'gate_cfg', None)
        if isinstance(cfg, dict) and 'execution' in cfg:
            cfg['execution'] = execution
    return model


def _block_layers(block):
    """Convolutions, norms, gate names and plugin names of each map.

    Map ``j`` is the output of conv ``j`` after its norm (and activation,
    gate and plugins, except for the last map). Looked up on every call
    rather than cached, so that modules replaced after construction (for
    example by ``revert_sync_batchnorm``) are the ones used.
    """
    n = len(block.gate_names) + 1
    convs = [getattr(block, f'conv{j + 1}') for j in range(n)]
    norms = [getattr(block, f'norm{j + 1}') for j in range(n)]
    gates = [name if hasattr(block, name) else None
             for name in block.gate_names] + [None]
    if getattr(block, 'with_plugins', False):
        plugins = [getattr(block, f'after_conv{j + 1}_plugin_names')
                   for j in range(n)]
    else:
        plugins = [[] for _ in range(n)]
    return convs, norms, gates, plugins


def check_skip_support(block: nn.Module, name: Optional[str] = None) -> None:
    """Raise ``NotImplementedError`` if ``block`` cannot run in skip mode.

    Args:
        block (nn.Module): A gated block.
        name (str, optional): The block's module name, for the message.

    Raises:
        NotImplementedError: A convolution that is not a plain zero-padded
            ``nn.Conv2d`` with ``groups=1`` (e.g. DCN, weight-standardised
            convs), a norm that is not a BN with running statistics (e.g.
            GN), or an mmseg plugin at a gated position.
    """
    what = f'{type(block).__name__}' + (f' {name!r}' if name else '')
    convs, norms, gates, plugins = _block_layers(block)
    for j, conv in enumerate(convs):
        if type(conv) not in _PLAIN_CONVS:
            raise NotImplementedError(
                f'skip execution of {what}: conv{j + 1} is a '
                f'{type(conv).__name__}; only plain nn.Conv2d is supported')
        if conv.groups != 1 or conv.padding_mode != 'zeros':
            raise NotImplementedError(
                f'skip execution of {what}: conv{j + 1} has groups='
                f'{conv.groups}, padding_mode={conv.padding_mode!r}; only '
                "groups=1 and padding_mode='zeros' are supported")
    for j, norm in enumerate(norms):
        if not (isinstance(norm, nn.modules.batchnorm._BatchNorm)
                and norm.running_mean is not None):
            raise NotImplementedError(
                f'skip execution of {what}: norm{j + 1} is a '
                f'{type(norm).__name__}; only BN layers with running '
                'statistics can be restricted to the open channels')
    for j, (gate, names) in enumerate(zip(gates, plugins)):
        if gate is not None and names:
            raise NotImplementedError(
                f'skip execution of {what}: plugins {list(names)} run after '
                f'the gated map of conv{j + 1} (gate {gate!r}) and would see '
                'its closed channels; remove them or use execution=\'mask\'')


def check_skip_mode(block: nn.Module) -> None:
    """Check a block about to run in skip mode.

    Raises:
        RuntimeError: The block or one of its norms is in training mode.
        NotImplementedError: See :func:`check_skip_support`; checked on the
            first call after the mode was set.
    """
    if not block.__dict__.get('_skip_checked', False):
        # A block built with execution='skip' meets its first check here:
        # its gates and plugins do not exist yet when the mixin's __init__
        # runs.
        check_skip_support(block)
        block.__dict__['_skip_checked'] = True
    if block.training or any(n.training for n in _block_layers(block)[1]):
        raise RuntimeError(
            f'{type(block).__name__} runs with gate execution \'skip\', '
            'which is for inference only (the open channels are computed '
            'with BN running statistics and no mask gradient); call '
            "model.eval() or set_gate_execution(model, 'mask') to train")


def _out_size(conv: nn.Conv2d, size: Sequence[int]) -> Tuple[int, int]:
    """Spatial output size of ``conv`` for an input of spatial ``size``."""
    if isinstance(conv.padding, str):  # 'same' keeps, 'valid' pads nothing
        padding = (0, 0) if conv.padding == 'valid' else None
    else:
        padding = conv.padding
    out = []
    for i, s in enumerate(size):
        if padding is None:
            out.append(s)
            continue
        k, st, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        out.append((s + 2 * padding[i] - d * (k - 1) - 1) // st + 1)
    return tuple(out)


class _Plan:
    """The layers of one block and what to compute of them for a batch."""

    def __init__(self, block, x):
        self.block = block
        self.convs, self.norms, self.gate_names, self.plugins = \
            _block_layers(block)
        self.last = len(self.convs) - 1
        gated = [j for j, g in enumerate(self.gate_names) if g is not None]
        # Convs that read or write a gated map depend on the gate pattern;
        # the gated maps are consecutive and never the last one.
        self.start = gated[0]
        self.end = gated[-1] + 1
        self.gated = gated
        sizes, size = [], tuple(x.shape[2:])
        for conv in self.convs:
            size = _out_size(conv, size)
            sizes.append(size)
        self.sizes = sizes

    def record_gate_sizes(self):
        """Set ``map_size`` and ``controlled_macs`` of the gates as the mask
        execution does, for the MAC accounting and the L0 loss."""
        from .blocks import channel_macs
        for j in self.gated:
            module = getattr(self.block, self.gate_names[j])
            if module.map_size != self.sizes[j] \
                    or module.controlled_macs is None:
                module.map_size = self.sizes[j]
                module.controlled_macs = channel_macs(
                    self.convs[j], self.convs[j + 1], *self.sizes[j])

    def cost(self, counts: Sequence[int]) -> int:
        """MACs per sample of the pattern-dependent convs when gated map
        ``gated[i]`` has ``counts[i]`` open channels."""
        open_ = {j: k for j, k in zip(self.gated, counts)}
        total = 0
        for j in range(self.start, self.end + 1):
            conv = self.convs[j]
            c_in = open_.get(j - 1, conv.in_channels)
            c_out = open_.get(j, conv.out_channels)
            h, w = self.sizes[j]
            total += c_in * c_out * h * w
        return total

    def dense_layer(self, j, h):
        """Map ``j`` with all channels, by the block's own modules."""
        h = self.norms[j](self.convs[j](h))
        if j < self.last:
            h = self.block.relu(h)
        for name in self.plugins[j]:
            h = getattr(self.block, name)(h)
        return h

    def sparse_layer(self, j, h, in_idx, out_idx):
        """Map ``j`` with the channels ``out_idx`` (``None``: all) from an
        input holding the channels ``in_idx`` of map ``j - 1``."""
        conv, norm = self.convs[j], self.norms[j]
        n = h.shape[0]
        if out_idx is not None and out_idx.numel() == 0:
            # Nothing open: the next layer sees an input without channels.
            return h.new_empty((n, 0) + self.sizes[j])
        bias = conv.bias
        if bias is not None and out_idx is not None:
            bias = bias.index_select(0, out_idx)
        if h.shape[1] == 0:
            # All inputs closed: the convolution of zeros is its bias.
            c_out = conv.out_channels if out_idx is None else out_idx.numel()
            y = h.new_zeros((n, c_out) + self.sizes[j])
            if bias is not None:
                y = y + bias[:, None, None]
        else:
            weight = conv.weight
            if out_idx is not None:
                weight = weight.index_select(0, out_idx)
            if in_idx is not None:
                weight = weight.index_select(1, in_idx)
            y = F.conv2d(h, weight, bias, conv.stride, conv.padding,
                         conv.dilation)
        if out_idx is None:
            y = norm(y)
        else:
            y = F.batch_norm(
                y, norm.running_mean.index_select(0, out_idx),
                norm.running_var.index_select(0, out_idx),
                None if norm.weight is None else norm.weight.index_select(
                    0, out_idx),
                None if norm.bias is None else norm.bias.index_select(
                    0, out_idx), False, 0.0, norm.eps)
        if j < self.last:
            y = self.block.relu(y)
        return y

    def segment(self, h, indices, masks=None):
        """Run the pattern-dependent convs on ``h`` (map ``start - 1``).

        Args:
            h (Tensor): Input of conv ``start``.
            indices (list[Tensor | None]): Open channels of each gated map
                (``None``: all of them).
            masks (list[Tensor | None], optional): Gates ``(n, k)`` to
                multiply the computed channels of each gated map with, for
                samples that share the computation but not the pattern.

        Returns:
            Tensor: Map ``end``, all channels, before its plugins.
        """
        in_idx = None
        for i, j in enumerate(range(self.start, self.end)):
            out_idx = indices[i]
            h = self.sparse_layer(j, h, in_idx, out_idx)
            if masks is not None and masks[i] is not None \
                    and h.shape[1] > 0:
                h = h * masks[i][:, :, None, None]
            in_idx = out_idx
        return self.sparse_layer(self.end, h, in_idx, None)


def _open_index(row: torch.Tensor) -> Optional[torch.Tensor]:
    """Indices of the open channels of a 0/1 gate row; ``None`` if all."""
    idx = row.nonzero().squeeze(1)
    return None if idx.numel() == row.numel() else idx


def _segment_batch(plan: _Plan, h: torch.Tensor,
                   gates: List[torch.Tensor]) -> torch.Tensor:
    """Run the pattern-dependent part for a whole batch (see module doc)."""
    n = h.shape[0]
    if n == 1:
        return plan.segment(h, [_open_index(g[0]) for g in gates])
    open_ = [g > 0 for g in gates]
    counts = torch.stack([o.sum(1) for o in open_], 1).tolist()
    full = [g.shape[1] for g in gates]
    if all(c == full for c in counts):
        return plan.segment(h, [None] * len(gates))
    pattern = torch.cat(open_, 1)
    patterns, inverse = torch.unique(
        pattern.to(torch.uint8), dim=0, return_inverse=True)
    if patterns.shape[0] == 1:
        return plan.segment(h, [_open_index(o[0]) for o in open_])
    union = [o.any(0) for o in open_]
    union_counts = [int(u.sum()) for u in union]
    union_cost = n * plan.cost(union_counts)
    group_cost = sum(plan.cost(c) for c in counts)
    if group_cost >= (1 - GROUP_OVERHEAD) * union_cost:
        # Shared computation of the batch's open channels; the samples'
        # closed channels among them are masked as in mask execution.
        indices = [_open_index(u) for u in union]
        masks = [g if idx is None else g.index_select(1, idx)
                 for g, idx in zip(gates, indices)]
        masks = [m.to(h.dtype) for m in masks]
        return plan.segment(h, indices, masks)
    out = None
    splits = torch.split(patterns.bool(), full, dim=1)
    for p in range(patterns.shape[0]):
        rows = (inverse == p).nonzero().squeeze(1)
        y = plan.segment(
            h.index_select(0, rows), [_open_index(s[p]) for s in splits])
        if out is None:
            out = y.new_empty((n, ) + tuple(y.shape[1:]))
        out.index_copy_(0, rows, y)
    return out


def skip_residual(block: nn.Module, x: torch.Tensor,
                  *gates: Optional[torch.Tensor]) -> torch.Tensor:
    """The residual branch of a gated block, computing open channels only.

    Equal (up to floating point) to ``block._residual(x, *gates)`` for
    hard 0/1 gates in eval mode.

    Args:
        block (nn.Module): A gated BasicBlock or Bottleneck (mmseg or
            mmpretrain) in eval mode.
        x (Tensor): Block input ``(N, C, H, W)``.
        *gates (Tensor | None): The block's gates in ``gate_names`` order,
            ``(N, C_j)`` 0/1 each, ``None`` where the block has no gate.

    Returns:
        Tensor: The residual branch (before the shortcut is added).
    """
    if all(g is None for g in gates):
        return block._residual(x, *gates)
    plan = _Plan(block, x)
    plan.record_gate_sizes()
    h = x
    for j in range(plan.start):
        h = plan.dense_layer(j, h)
    h = _segment_batch(plan, h, [gates[j] for j in plan.gated])
    # Plugins of the first ungated map run once for the merged batch.
    for name in plan.plugins[plan.end]:
        h = getattr(block, name)(h)
    for j in range(plan.end + 1, plan.last + 1):
        h = plan.dense_layer(j, h)
    return h
