"""Skip execution: compute only the open channels of a gated block.

In the default ``'mask'`` execution a gated block computes every channel and
multiplies the closed ones by zero, so the gates save MACs only on paper. In
``'skip'`` execution, for each sample, the convolution that produces a gated
map computes only the open filters and the next convolution reads only the
matching input channels. The result is the mask result up to floating point
order (closed channels contribute exact zeros there).

:func:`set_gate_execution` switches a model: in skip execution each gated
block's ``skip_runner`` (a :class:`SkipRunner`) computes the block's output
from its input, gates included. This module decides what is computed
together; a backend (:mod:`mmgated.models.skip_backends`, chosen once per
model) computes each convolution over the open channels it is given.

How a block runs (see :class:`SkipRunner`):

* Every convolution and its eval-mode BN are one convolution with a bias
  (:class:`FoldedConv`; the folded copy is cached on the conv until a weight
  or statistic changes), so a closed channel costs neither its filter nor
  its BN. The block's shortcut and final ReLU go into its last convolution,
  and each gating module's BN into its first fully connected layer.
* The convolutions before the first and after the last one that touches a
  gated map run for the whole batch with all channels.
* The others run once per group of samples sharing a gate pattern, with
  those samples' open channels. When a batch's patterns differ but the
  union of its open channels is small (gates closed for the whole batch),
  one computation of the union with the closed channels masked is cheaper
  than many small ones; a cost estimate (``PLAN_COSTS``) picks the plan, and
  likewise whether a pattern with most channels open is cheaper computed
  whole and masked than with its weights gathered.

Skip execution is for inference only: the block must be in eval mode (the
per-channel BN uses running statistics). It needs plain zero-padded
``nn.Conv2d`` layers with ``groups=1``, BN layers with running statistics,
``nn.ReLU`` activations and no mmseg plugin right after a gated map
(:func:`check_skip_support`). A trace (mmengine's FlopAnalyzer) records the
computation of the traced batch's open channels: trace with the blocks'
``skip_runner`` set to None (mask execution) to count the dense graph.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .blocks import conv_output_size, is_gated_block
from .folding import cached_fold_bn, fold_bn, is_foldable_bn
from .gates import GATE_EXECUTIONS
from .skip_backends import SKIP_BACKENDS, build_skip_backend

try:  # mmcv's Conv2d only adds empty-tensor support to nn.Conv2d
    from mmcv.cnn.bricks.wrappers import Conv2d as _MMCVConv2d
    _PLAIN_CONVS: Tuple[type, ...] = (nn.Conv2d, _MMCVConv2d)
except ImportError:  # pragma: no cover - mmcv is a dependency
    _PLAIN_CONVS = (nn.Conv2d, )

# How a batch whose samples have different gate patterns is computed is
# decided by a cost estimate, in MAC equivalents, of two plans: one
# computation of the batch's union of open channels (with masks), or one per
# gate pattern. Besides its MACs, every convolution call costs
#
# * ``weight`` per weight element and thread: on a CPU the weights pass
#   through memory about five times per call (gather, oneDNN's reorder into
#   its blocked layout, the convolution), at a bandwidth that more threads
#   do not raise while they raise the MAC rate; about 64 MACs per element
#   and thread on the 2-core test machine. It makes the weight-bound late
#   stages (7x7 maps, large weights) of a batch prefer the union plan;
# * ``call`` per call: launch latency, which dominates small kernels on a
#   GPU (a rough figure: about ten kernel launches at ~10 us against ~1e13
#   MAC/s; not measured in this repository).
#
# Devices not listed use the CPU figures.
PLAN_COSTS = dict(cpu=dict(weight=64, call=0), cuda=dict(weight=1, call=1e8))
# Per-pattern calls run on fewer samples and add a gather and a scatter of
# the samples: the per-pattern plan is chosen when its estimate is below
# this fraction of the union plan's.
GROUP_EFFICIENCY = 0.85
# Plans kept per block (one per input size); more start the cache afresh.
MAX_PLANS = 16
# Name of the folded weight cached on a convolution (see cached_fold_bn).
_FOLDED = '_skip_folded'


def set_gate_execution(model: nn.Module,
                       execution: str,
                       backend: str = 'auto') -> nn.Module:
    """Switch every gated block of a built model to ``'mask'`` or ``'skip'``.

    Args:
        model (nn.Module): A model with gated blocks (backbone, classifier,
            segmentor), possibly inside a model wrapper.
        execution (str): ``'mask'`` (compute all channels, multiply the
            closed ones by 0; needed for training) or ``'skip'`` (compute the
            open channels only; eval only). Switching to ``'mask'`` also
            frees the folded weights that skip execution caches.
        backend (str): For ``'skip'``: ``'auto'``, ``'torch'`` or
            ``'compiled'`` (see
            :func:`~mmgated.models.skip_backends.build_skip_backend`),
            chosen here once for the whole model.

    Returns:
        nn.Module: ``model``, for chaining.

    Raises:
        ValueError: ``execution`` or ``backend`` is not one of the allowed
            values, or the model has no gated block.
        NotImplementedError: ``'skip'`` and a block skip execution cannot
            run (see :func:`check_skip_support`); no block is switched then.
        RuntimeError: ``backend='compiled'`` where the compiled kernels
            cannot be built.
    """
    if execution not in GATE_EXECUTIONS:
        raise ValueError(f'gate execution {execution!r} is not one of '
                         f'{GATE_EXECUTIONS}')
    if backend not in SKIP_BACKENDS:
        raise ValueError(f'skip backend {backend!r} is not one of '
                         f'{SKIP_BACKENDS}')
    blocks = [(name, m) for name, m in model.named_modules()
              if is_gated_block(m)]
    if not blocks:
        raise ValueError(f'{type(model).__name__} has no gated block whose '
                         'gate execution could be set')
    if execution == 'skip':
        # Check all blocks before switching any, so that a failure leaves
        # the model as it was.
        for name, block in blocks:
            check_skip_support(block, name)
        skip_backend = build_skip_backend(backend,
                                          blocks[0][1].conv1.weight.device)
    for _, block in blocks:
        if execution == 'skip':
            block.skip_runner = SkipRunner(block, skip_backend)
        else:
            block.skip_runner = None
            for conv in _block_layers(block)[0]:
                conv.__dict__.pop(_FOLDED, None)
    # Keep the blocks' and backbones' gate_cfg in step, for logs and configs.
    for m in model.modules():
        cfg = getattr(m, 'gate_cfg', None)
        if isinstance(cfg, dict) and 'execution' in cfg:
            cfg['execution'] = execution
    return model


def _block_layers(block):
    """Convolutions, norms, gate names (None where ungated) and plugin
    names of each map of ``block``; map ``j`` is conv ``j + 1``'s output
    after its norm (and activation, gate and plugins). Looked up anew, so
    that modules replaced after construction (``revert_sync_batchnorm``)
    are the ones used."""
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
            GN), an activation that is not ``nn.ReLU``, or an mmseg plugin
            at a gated position.
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
        if not is_foldable_bn(norm):
            raise NotImplementedError(
                f'skip execution of {what}: norm{j + 1} is a '
                f'{type(norm).__name__}; only BN layers with running '
                'statistics can be restricted to the open channels')
    if type(getattr(block, 'relu', None)) is not nn.ReLU:
        raise NotImplementedError(
            f'skip execution of {what}: its activation is a '
            f'{type(getattr(block, "relu", None)).__name__}; only nn.ReLU '
            'is supported (it is fused into the convolutions)')
    for j, (gate, names) in enumerate(zip(gates, plugins)):
        if gate is not None and names:
            raise NotImplementedError(
                f'skip execution of {what}: plugins {list(names)} run after '
                f'the gated map of conv{j + 1} (gate {gate!r}) and would see '
                'its closed channels; remove them or use execution=\'mask\'')


class FoldedConv:
    """A convolution of a block with its eval-mode BN folded in, as a
    backend runs it for inputs of one size.

    Args:
        conv (nn.Conv2d): The convolution (its geometry for the backend).
        norm (nn.Module): The BN after it.
        out_size (tuple[int, int]): Its output's height and width.
    """

    def __init__(self, conv: nn.Conv2d, norm: nn.Module,
                 out_size: Tuple[int, int]):
        self.conv, self.norm, self.out_size = conv, norm, out_size
        # The backend's choice for this layer, made once per plan.
        self.route = None

    def weight_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The folded weight (contiguous) and bias; without autograd the
        copy cached on the conv, so that the BN costs nothing per call."""
        if torch.is_grad_enabled():
            return fold_bn(self.conv, self.norm)
        return cached_fold_bn(self.conv, self.norm, _FOLDED)


def _open_index(row: torch.Tensor) -> Optional[torch.Tensor]:
    """Indices of the open channels of a 0/1 (or bool) gate row; ``None``
    if all are open."""
    idx = row.nonzero().squeeze(1)
    return None if idx.numel() == row.numel() else idx


class _Plan:
    """The layers of a block for inputs of one size, with the backend's
    choices for them fixed."""

    def __init__(self, block: nn.Module, x: torch.Tensor, backend):
        check_skip_support(block)  # modules may have been replaced
        convs, self.norms, gates, self.plugins = _block_layers(block)
        self.block, self.backend = block, backend
        self.layers, size = [], tuple(x.shape[2:])
        for conv, norm in zip(convs, self.norms):
            size = conv_output_size(conv, *size)
            self.layers.append(FoldedConv(conv, norm, size))
        for layer in self.layers:
            layer.route = backend.route(layer, x)
        self.last = len(convs) - 1
        # Convs that read or write a gated map depend on the gate pattern;
        # the gated maps are consecutive and never the last one.
        self.gated = [j for j, name in enumerate(gates) if name is not None]
        self.gate_names = [gates[j] for j in self.gated]
        self.start, self.end = self.gated[0], self.gated[-1] + 1
        self.full_counts = [convs[j].out_channels for j in self.gated]
        self.device_type = x.device.type

    def conv(self, j, h, in_idx=None, out_idx=None, residual=None):
        """Map ``j`` from ``h`` (channels ``in_idx`` of map ``j - 1``),
        channels ``out_idx``; the last map gets ``residual`` and the final
        ReLU, if given."""
        layer = self.layers[j]
        if out_idx is not None and out_idx.numel() == 0:
            # Nothing open: the next conv reads an input without channels.
            return h.new_zeros((h.shape[0], 0) + layer.out_size)
        return self.backend.conv(layer, h, in_idx, out_idx,
                                 j < self.last or residual is not None,
                                 residual)

    def plugins_after(self, j, h):
        for name in self.plugins[j]:
            h = getattr(self.block, name)(h)
        return h

    def segment(self, h, indices, masks=None, residual=None):
        """Convs ``start`` to ``end`` (the pattern-dependent ones) on ``h``.

        Args:
            h (Tensor): Input of conv ``start``.
            indices (list[Tensor | None]): Open channels of each gated map
                (``None``: all).
            masks (list[Tensor], optional): Gates ``(n, k)`` to multiply
                the computed channels of each gated map with, for samples
                that share the computation but not the pattern.
            residual (Tensor, optional): The shortcut, if conv ``end`` is
                the block's last (see :meth:`conv`).

        Returns:
            Tensor: Map ``end``, all channels, before its plugins.
        """
        in_idx = None
        for i, j in enumerate(range(self.start, self.end)):
            h = self.conv(j, h, in_idx, indices[i])
            if masks is not None and h.shape[1] > 0:
                h = h * masks[i][:, :, None, None]
            in_idx = indices[i]
        return self.conv(self.end, h, in_idx, None, residual)

    def gathers(self, n: int) -> bool:
        """Whether some pattern-dependent conv on ``n`` samples gathers its
        open weights rather than reading them in place."""
        return not all(
            self.backend.reads_in_place(self.layers[j], n)
            for j in range(self.start, self.end + 1))

    def cost(self, counts: Sequence[int], n: int) -> float:
        """Estimated cost, in MAC equivalents, of one call of the
        pattern-dependent convs on ``n`` samples when gated map
        ``gated[i]`` has ``counts[i]`` open channels (see ``PLAN_COSTS``);
        a restricted conv that gathers its weight pays one more pass of
        it."""
        costs = PLAN_COSTS.get(self.device_type, PLAN_COSTS['cpu'])
        weight_cost = costs['weight']
        if self.device_type == 'cpu':
            weight_cost *= torch.get_num_threads()
        open_ = dict(zip(self.gated, counts))
        total = 0
        for j in range(self.start, self.end + 1):
            layer = self.layers[j]
            conv = layer.conv
            c_in = open_.get(j - 1, conv.in_channels)
            c_out = open_.get(j, conv.out_channels)
            gathered = (c_in, c_out) != (conv.in_channels, conv.out_channels) \
                and not self.backend.reads_in_place(layer, n)
            (h, w), (kh, kw) = layer.out_size, conv.kernel_size
            total += c_in * c_out * kh * kw * (
                n * h * w + weight_cost * (1 + gathered)) + costs['call']
        return total


def _one_pattern(plan: _Plan, h, rows: List[torch.Tensor], gates,
                 residual):
    """The segment for samples sharing one pattern (``rows``: its open
    channels per gated map): their open channels, or, where gathering the
    weights costs more than the closed channels save, all channels with the
    closed ones masked as in mask execution."""
    indices = [_open_index(row) for row in rows]
    n = h.shape[0]
    if any(idx is not None for idx in indices) and plan.gathers(n):
        counts = [row.numel() if idx is None else idx.numel()
                  for row, idx in zip(rows, indices)]
        if plan.cost(counts, n) >= plan.cost(plan.full_counts, n):
            masks = [g.to(h.dtype) for g in gates]
            return plan.segment(h, [None] * len(rows), masks, residual)
    return plan.segment(h, indices, residual=residual)


def _segment_batch(plan: _Plan, h, gates: List[torch.Tensor], residual):
    """The segment for a batch: per gate pattern, or the union of the
    batch's open channels with masks, whichever is estimated cheaper."""
    open_ = [g > 0 for g in gates]
    n = h.shape[0]
    if n == 1:
        return _one_pattern(plan, h, [o[0] for o in open_], gates, residual)
    patterns, inverse, sizes = torch.unique(
        torch.cat(open_, 1).to(torch.uint8),
        dim=0,
        return_inverse=True,
        return_counts=True)
    patterns = torch.split(patterns.bool(), [g.shape[1] for g in gates], 1)
    if sizes.numel() == 1:
        return _one_pattern(plan, h, [p[0] for p in patterns], gates,
                            residual)
    group_counts = torch.stack([p.sum(1) for p in patterns], 1).tolist()
    group_cost = sum(
        plan.cost(counts, size)
        for counts, size in zip(group_counts, sizes.tolist()))
    union = [o.any(0) for o in open_]
    union_cost = plan.cost([int(u.sum()) for u in union], n)
    if group_cost >= GROUP_EFFICIENCY * union_cost:
        indices = [_open_index(u) for u in union]
        masks = [(g if idx is None else g.index_select(1, idx)).to(h.dtype)
                 for g, idx in zip(gates, indices)]
        return plan.segment(h, indices, masks, residual)
    out = None
    for p in range(sizes.numel()):
        rows = (inverse == p).nonzero().squeeze(1)
        y = plan.segment(
            h.index_select(0, rows), [_open_index(q[p]) for q in patterns],
            residual=None if residual is None else residual.index_select(
                0, rows))
        if out is None:
            out = y.new_empty((n, ) + tuple(y.shape[1:]))
        out.index_copy_(0, rows, y)
    return out


class SkipRunner:
    """The forward of a gated block in skip execution, set as
    ``block.skip_runner`` by :func:`set_gate_execution`.

    Called with the block input, it runs the block's gating modules and
    returns the block output (shortcut added, final ReLU applied), equal
    to mask execution's for eval mode. Its plans (one per input size,
    device, dtype and autograd mode) fix the backend's choices.

    Args:
        block (nn.Module): A gated block that :func:`check_skip_support`
            accepts.
        backend: A skip backend (see :mod:`mmgated.models.skip_backends`).
    """

    def __init__(self, block: nn.Module, backend):
        self.block, self.backend = block, backend
        self.plans = {}

    def plan(self, x: torch.Tensor) -> _Plan:
        """The block's plan for inputs shaped like ``x`` (any batch
        size), made anew when the block's submodules were replaced."""
        key = (tuple(map(id, self.block._modules.values())),
               tuple(x.shape[1:]), x.device, x.dtype,
               torch.is_grad_enabled())
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= MAX_PLANS:
                self.plans.clear()
            plan = self.plans[key] = _Plan(self.block, x, self.backend)
        return plan

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        block = self.block
        plan = self.plan(x)
        if block.training or any(norm.training for norm in plan.norms):
            # A norm in training mode normalises with batch statistics in
            # mask execution; skip execution has only running ones.
            raise RuntimeError(
                f'{type(block).__name__} runs with gate execution \'skip\', '
                'which is for inference only (the open channels are '
                'computed with the BN running statistics and without the '
                "gates' gradient); call model.eval() or "
                "set_gate_execution(model, 'mask') to train")
        # The gates' BN folded into their fc1, as the convolutions' are.
        gates = [getattr(block, name)(x, fold_norm=True)
                 for name in plan.gate_names]
        shortcut = x if block.downsample is None else block.downsample(x)
        # The shortcut goes into the last conv unless plugins follow it.
        fused = not plan.plugins[plan.last]
        h = x
        for j in range(plan.start):
            h = plan.plugins_after(j, plan.conv(j, h))
        h = _segment_batch(plan, h, gates,
                           shortcut if fused and plan.end == plan.last
                           else None)
        # Plugins of the first ungated map run once for the whole batch.
        h = plan.plugins_after(plan.end, h)
        for j in range(plan.end + 1, plan.last + 1):
            h = plan.conv(j, h, residual=shortcut
                          if fused and j == plan.last else None)
            h = plan.plugins_after(j, h)
        return h if fused else (h + shortcut).relu_()
