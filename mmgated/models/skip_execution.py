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
  convolution call per convolution and group. With batch 1 (the latency
  case) that is exactly one gather and one call each. When the batch's
  patterns differ but its union of open channels is small (gates closed for
  the whole batch), computing the union for the whole batch and masking is
  cheaper than many small convolutions; a cost estimate (``PLAN_COSTS``)
  picks the cheaper plan.

How a convolution runs on the CPU: in eval mode each convolution and its BN
are folded into one convolution with a bias (a copy cached on the conv until
a weight or statistic changes; ``set_gate_execution(model, 'mask')`` drops
the copies), so a closed channel costs neither its filter nor its BN.

* A single sample reads the open part of each weight in place, with the
  compiled operations of :mod:`mmgated.ops` (built on first use), instead
  of gathering it into a copy that oneDNN would then reorder into its
  blocked layout (two more passes of the weight through memory, which at
  batch 1 cost as much as they save):

  - a stride-1 convolution larger than 1x1 whose output keeps its input's
    size (the 3x3 convolutions of ResNet blocks, dilated or not) runs as
    :func:`mmgated.ops.gathered_conv2d`, a direct convolution over the open
    input and output channels; the block's last one adds the shortcut and
    applies the final ReLU as it stores its output. With every channel
    open it is used on small maps only (at most ``WEIGHT_BOUND_PIXELS``
    output pixels, layer 4 of a ResNet at 224x224), where the weight, not
    the arithmetic, sets the time; elsewhere oneDNN is as fast;
  - another convolution (strided) with at most ``WEIGHT_BOUND_PIXELS``
    output pixels runs as im2col and :func:`mmgated.ops.gathered_gemm`.

* Otherwise (batches, large strided convolutions, no C compiler) the open
  channels' weights are gathered. The filters of the open output channels
  are contiguous rows of the weight, a cheap gather. The open *input*
  channels are not: they are runs of ``kh*kw`` values strided by
  ``in*kh*kw``. Up to ``STRIDED_GATHER_MAX`` weight elements the strided
  gather is used; a larger weight (stride 1) runs as the equal transposed
  convolution, whose cached ``(in, out, kh, kw)`` weight has the input
  channels as rows. Where PyTorch would run a convolution on a small single
  sample with its slow native kernels instead of oneDNN, oneDNN is called
  directly.

None of this changes the numbers beyond floating point order.

Skip execution is for inference only: the block must be in eval mode (its BN
layers use running statistics, which the per-channel indexing relies on).
It needs plain zero-padded ``nn.Conv2d`` layers with ``groups=1``, BN norm
layers with running statistics, ``nn.ReLU`` activations, and no mmseg plugin
right after a gated map;
:func:`check_skip_support` says which block breaks which of these.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import direct_conv_fast, gathered_gemm, keeps_size
from ..ops.gathered_conv import gathered_conv2d_unchecked
from .folding import bn_scale_shift, cached_on, norm_sources
from .gates import GATE_EXECUTIONS

try:  # mmcv's Conv2d only adds empty-tensor support to nn.Conv2d
    from mmcv.cnn.bricks.wrappers import Conv2d as _MMCVConv2d
    _PLAIN_CONVS: Tuple[type, ...] = (nn.Conv2d, _MMCVConv2d)
except ImportError:  # pragma: no cover - mmcv is a dependency
    _PLAIN_CONVS = (nn.Conv2d, )

_HAS_ONEDNN_CONV = (hasattr(torch, 'mkldnn_convolution')
                    and torch.backends.mkldnn.is_available())

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


def set_gate_execution(model: nn.Module, execution: str) -> nn.Module:
    """Switch every gated block of a built model to ``'mask'`` or ``'skip'``.

    Args:
        model (nn.Module): A model with gated blocks (backbone, classifier,
            segmentor), possibly inside a model wrapper.
        execution (str): ``'mask'`` (compute all channels, multiply the
            closed ones by 0; needed for training) or ``'skip'`` (compute the
            open channels only; eval only). Switching to ``'mask'`` also
            frees the weight copies that skip execution caches.

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
        if execution == 'mask':
            block.__dict__.pop('_skip_plans', None)
            for module in _block_layers(block)[0]:
                for name in _CACHES:
                    module.__dict__.pop(name, None)
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
        if not (isinstance(norm, nn.modules.batchnorm._BatchNorm)
                and norm.running_mean is not None):
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


def _training_error(block: nn.Module) -> RuntimeError:
    return RuntimeError(
        f'{type(block).__name__} runs with gate execution \'skip\', which '
        'is for inference only (the open channels are computed with the BN '
        'running statistics and without the gates\' gradient); call '
        "model.eval() or set_gate_execution(model, 'mask') to train")


def check_skip_mode(block: nn.Module) -> None:
    """Check a block about to run in skip mode.

    Raises:
        RuntimeError: The block is in training mode (its norms are checked
            when the residual runs, see :func:`skip_residual`).
        NotImplementedError: See :func:`check_skip_support`; checked on the
            first call after the mode was set.
    """
    if not block.__dict__.get('_skip_checked', False):
        # A block built with execution='skip' meets its first check here:
        # its gates and plugins do not exist yet when the mixin's __init__
        # runs.
        check_skip_support(block)
        block.__dict__['_skip_checked'] = True
    if block.training:
        raise _training_error(block)


def _transposed_padding(conv: nn.Conv2d) -> Tuple[int, ...]:
    """Padding of the transposed convolution equal to ``conv`` (stride 1)."""
    return tuple(d * (k - 1) - p for k, p, d in zip(
        conv.kernel_size, conv.padding, conv.dilation))


def _transposable(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` equals a transposed convolution of its flipped,
    transposed weight: stride 1 and a padding the transposed convolution
    can express."""
    return (all(s == 1 for s in conv.stride)
            and min(_transposed_padding(conv)) >= 0)


def _small_for_onednn(h: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether PyTorch leaves oneDNN out for this convolution: a single
    float32 CPU sample of at most 20480 values with a kernel of at most
    3x3 goes to its native kernels, which are several times slower for the
    weight-heavy layers skip execution produces."""
    return (h.shape[0] == 1 and h.numel() <= 20480
            and h.dtype == torch.float32 and h.device.type == 'cpu'
            and min(conv.kernel_size) <= 3 and _HAS_ONEDNN_CONV)


def _onednn_conv2d(h, weight, bias, conv):
    """``F.conv2d`` with ``conv``'s geometry, by oneDNN (see
    :func:`_small_for_onednn`)."""
    return torch.mkldnn_convolution(h.contiguous(), weight.contiguous(),
                                    bias, conv.padding, conv.stride,
                                    conv.dilation, 1)


# Weights of at most this many elements are gathered along their input
# channels directly: up to 256x256x3x3 that beat the transposed convolution
# in ResNet-34 at 50 % density (1 thread: 63.5 against 67.0 ms; 2 threads:
# on par), whose oneDNN kernel is slower than the plain one.
STRIDED_GATHER_MAX = 256 * 256 * 9

# A single sample's convolution with at most this many output pixels is
# bound by reading its weight (a 3x3 512-channel weight is 9.4 MB for 49
# pixels, layer 4 of a ResNet at 224x224). Restricted to some channels and
# strided, it runs as im2col and gathered_gemm, which reads the open part of
# the weight in place, instead of a gather and oneDNN; with all channels
# open and stride 1, as gathered_conv2d, which skips oneDNN's reorder of the
# whole weight (on the 2-core test CPU 2.8-3.2 ms against oneDNN's 3.7-4.4
# ms for a dense 512-channel 7x7 convolution; on 14x14 and larger maps
# oneDNN is as fast or faster with all channels open, docs/benchmarks.md).
WEIGHT_BOUND_PIXELS = 64

# gathered_conv2d keeps one operand in L2 while it streams the other: the
# weight (if it has at most 512 KB, see csrc/gathered_product.c) or else the
# zero-padded input map. Where both are larger than this (the 32x32 maps of
# 256-512 channels in PSPNet-R50-D8's stages 3-4) it would read one of them
# from memory for every tile; oneDNN blocks such products better.
DIRECT_WEIGHT_BYTES = 512 * 1024
DIRECT_INPUT_BYTES = 1024 * 1024

# Names of the weight copies cached on a convolution (see cached_on).
_CACHES = ('_skip_folded', '_skip_transposed')


def _fold_bn(conv: nn.Conv2d, norm: nn.Module):
    """Weight and bias of the one convolution equal to ``norm(conv(x))``
    for an eval-mode BN."""
    scale, bias = bn_scale_shift(norm)
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale[:, None, None, None], bias


def _folded(conv: nn.Conv2d, norm: nn.Module):
    """:func:`_fold_bn`, cached while no gradient is needed, so that
    the BN costs nothing and gathering the open channels of a layer is one
    gather of the weight and one of the bias."""
    if torch.is_grad_enabled():
        return _fold_bn(conv, norm)
    params = conv._parameters
    return cached_on(conv, '_skip_folded',
                     (params['weight'], params.get('bias')) +
                     norm_sources(norm), lambda: _fold_bn(conv, norm))


def _folded_transposed(conv: nn.Conv2d, norm: nn.Module):
    """The folded weight as the ``(in, out, kh, kw)`` flipped weight of the
    equal transposed convolution (stride 1), whose rows are the input
    channels; cached like :func:`_folded`."""
    weight = _folded(conv, norm)[0]
    return cached_on(
        conv, '_skip_transposed', (weight, ),
        lambda: weight.transpose(0, 1).flip((2, 3)).contiguous())


def _fits_direct(conv: nn.Conv2d, height: int, width: int) -> bool:
    """Whether the weight or the padded input of ``conv`` on a map of
    ``height x width`` (stride 1, all channels) fits the cache budget of
    gathered_conv2d (``DIRECT_WEIGHT_BYTES``, ``DIRECT_INPUT_BYTES``)."""
    (ph, pw), bytes_ = conv.padding, 4
    padded_input = conv.in_channels * (height + 2 * ph) * (width + 2 * pw)
    return (conv.weight.numel() * bytes_ <= DIRECT_WEIGHT_BYTES
            or padded_input * bytes_ <= DIRECT_INPUT_BYTES)


class _Plan:
    """The layers of one block and what to compute of them for a batch."""

    def __init__(self, block, x):
        from .blocks import conv_output_size  # blocks imports this module
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
            size = conv_output_size(conv, *size)
            sizes.append(size)
        self.sizes = sizes
        # Convs that mmgated.ops.gathered_conv2d can run, and run fast (see
        # direct; stride 1: the output has the input's size). A 1x1 conv is
        # a plain matrix product, which MKL / oneDNN block better: 2-2.5x
        # faster on the 1x1 convs of a ResNet-50 at half their channels.
        self.direct_capable = [
            tuple(conv.stride) == (1, 1) and keeps_size(
                conv.kernel_size, conv.padding, conv.dilation)
            and tuple(conv.kernel_size) != (1, 1)
            and _fits_direct(conv, *size)
            for conv, size in zip(self.convs, sizes)
        ]
        self.device_type = x.device.type

    def record_gate_sizes(self):
        """Set ``map_size`` and ``controlled_macs`` of the gates as the mask
        execution does, for the MAC accounting and the L0 loss."""
        modules = self.block._modules
        for j in self.gated:
            module = modules[self.gate_names[j]]
            if module.map_size != self.sizes[j] \
                    or module.controlled_macs is None:
                from .blocks import channel_macs
                module.map_size = self.sizes[j]
                module.controlled_macs = channel_macs(
                    self.convs[j], self.convs[j + 1], *self.sizes[j])

    def cost(self, counts: Sequence[int], n: int) -> float:
        """Estimated cost, in MAC equivalents, of one call of the
        pattern-dependent convs on ``n`` samples when gated map
        ``gated[i]`` has ``counts[i]`` open channels (see ``PLAN_COSTS``).

        A conv restricted to some channels also pays for gathering its
        weight: one more pass of the gathered weight through memory, except
        a single sample's weight-bound conv on the CPU, which reads the open
        part of its weight in place (:func:`~mmgated.ops.gathered_gemm`)."""
        costs = PLAN_COSTS.get(self.device_type, PLAN_COSTS['cpu'])
        weight_cost = costs['weight']
        if self.device_type == 'cpu':
            weight_cost *= torch.get_num_threads()
        open_ = {j: k for j, k in zip(self.gated, counts)}
        total = 0
        for j in range(self.start, self.end + 1):
            conv = self.convs[j]
            c_in = open_.get(j - 1, conv.in_channels)
            c_out = open_.get(j, conv.out_channels)
            h, w = self.sizes[j]
            kh, kw = conv.kernel_size
            weights = c_in * c_out * kh * kw
            gathered = not self.reads_in_place(j, n) and (c_in, c_out) != (
                conv.in_channels, conv.out_channels)
            total += weights * (n * h * w + weight_cost * (1 + gathered)) \
                + costs['call']
        return total

    def full_counts(self) -> List[int]:
        """Channel counts of the gated maps with every gate open."""
        return [self.convs[j].out_channels for j in self.gated]

    def dense_layer(self, j, h, finish=None):
        """Map ``j`` with all channels (BN folded), then its plugins, then
        ``finish`` (see :meth:`sparse_layer`)."""
        plugins = self.plugins[j]
        h = self.sparse_layer(j, h, None, None, None if plugins else finish)
        for name in plugins:
            h = getattr(self.block, name)(h)
        return _finish(h, finish) if plugins else h

    def sparse_layer(self, j, h, in_idx, out_idx, finish=None):
        """Map ``j`` with the channels ``out_idx`` (``None``: all) from an
        input holding the channels ``in_idx`` of map ``j - 1``, by conv
        ``j`` with its BN folded in (see :func:`_folded`).

        ``finish``, for the last conv only: ``(shortcut, relu)`` to add the
        block's shortcut to the result and apply its ReLU (see
        :func:`_finish`), inside the convolution where it runs directly.
        """
        conv = self.convs[j]
        n = h.shape[0]
        if out_idx is not None and out_idx.numel() == 0:
            # Nothing open: the next layer sees an input without channels.
            return h.new_empty((n, 0) + self.sizes[j])
        weight, bias = _folded(conv, self.norms[j])
        restricted = in_idx is not None or out_idx is not None
        fast = h.device.type == 'cpu' and not torch.is_grad_enabled()
        if fast and h.dtype == torch.float32 and self.direct(
                j, n, restricted):
            shortcut, relu = finish or (None, j < self.last)
            return gathered_conv2d_unchecked(
                h.contiguous(), weight, bias, conv.padding, conv.dilation,
                rows=out_idx, col_groups=in_idx,
                residual=None if shortcut is None else shortcut.to(
                    h.dtype).contiguous(),
                relu=relu)
        if fast and restricted and h.shape[1] > 0 \
                and h.dtype == torch.float32 and self.weight_bound(j, n):
            return _finish(
                self._gathered_product(j, h, weight, bias, in_idx, out_idx),
                finish)
        if out_idx is not None:
            bias = bias.index_select(0, out_idx)
        if h.shape[1] == 0:
            # All inputs closed: the convolution of zeros is its bias.
            y = bias[:, None, None].expand((n, bias.numel()) +
                                           self.sizes[j]).contiguous()
        elif fast and in_idx is not None and out_idx is None:
            y = self._read_open_inputs(j, h, in_idx, bias)
        else:
            if out_idx is not None:
                weight = weight.index_select(0, out_idx)
            if in_idx is not None:
                weight = weight.index_select(1, in_idx)
            if _small_for_onednn(h, conv):
                y = _onednn_conv2d(h, weight, bias, conv)
            else:
                y = F.conv2d(h, weight, bias, conv.stride, conv.padding,
                             conv.dilation)
        if j < self.last:
            y = y.relu_()
        return _finish(y, finish)

    def direct(self, j, n, restricted=True) -> bool:
        """Whether conv ``j`` on ``n`` samples runs as
        :func:`~mmgated.ops.gathered_conv2d` (for float32 inputs without
        gradient): a single sample on the CPU; a stride-1 conv larger than
        1x1 whose output keeps the input's size (the 3x3 convs of ResNet
        blocks) and whose weight or input fits the cache budget
        (``DIRECT_WEIGHT_BYTES``, ``DIRECT_INPUT_BYTES``); the compiled
        operations at hand with their AVX-512 tiles
        (:func:`~mmgated.ops.direct_conv_fast`); and either some channels
        closed (``restricted``) or at most ``WEIGHT_BOUND_PIXELS`` output
        pixels (with every channel open, oneDNN is as fast on larger
        maps)."""
        height, width = self.sizes[j]
        return (n == 1 and self.device_type == 'cpu' and self.direct_capable[j]
                and (restricted or height * width <= WEIGHT_BOUND_PIXELS)
                and direct_conv_fast())

    def weight_bound(self, j, n) -> bool:
        """Whether conv ``j`` on ``n`` samples is a single sample on the
        CPU with at most ``WEIGHT_BOUND_PIXELS`` output pixels, so that
        reading the weight, not the arithmetic, sets its time."""
        height, width = self.sizes[j]
        return (n == 1 and self.device_type == 'cpu'
                and height * width <= WEIGHT_BOUND_PIXELS)

    def reads_in_place(self, j, n) -> bool:
        """Whether conv ``j`` on ``n`` samples, restricted to some
        channels, reads the open part of its weight in place rather than
        gathering it: it runs directly (:meth:`direct`) or is weight-bound
        (:meth:`weight_bound`, then :meth:`_gathered_product`)."""
        return self.direct(j, n) or self.weight_bound(j, n)

    def _gathered_product(self, j, h, weight, bias, in_idx, out_idx):
        """Conv ``j`` (BN folded, ReLU unless last) of a weight-bound
        sample as im2col and :func:`~mmgated.ops.gathered_gemm`, which
        reads the open rows and input channels of the weight in place."""
        conv = self.convs[j]
        kh, kw = conv.kernel_size
        cols = F.unfold(h, conv.kernel_size, conv.dilation, conv.padding,
                        conv.stride)[0]
        y = gathered_gemm(
            weight.view(weight.shape[0], -1),
            cols,
            kh * kw,
            rows=out_idx,
            col_groups=in_idx,
            bias=bias,
            relu=j < self.last)
        return y.view((1, y.shape[0]) + self.sizes[j])

    def _read_open_inputs(self, j, h, in_idx, bias):
        """Conv ``j`` (folded) on ``h``, the channels ``in_idx`` of its
        input, on the CPU without gradient (see the module doc)."""
        conv, norm = self.convs[j], self.norms[j]
        small = _small_for_onednn(h, conv)
        if conv.weight.numel() > STRIDED_GATHER_MAX:
            if not small and _transposable(conv):
                # The equal transposed convolution, whose (in, out, kh, kw)
                # weight has the input channels as rows. (A small single
                # sample would run it on PyTorch's slow native kernel; its
                # gather is cheap at that size.)
                weight = _folded_transposed(conv, norm).index_select(
                    0, in_idx)
                return F.conv_transpose2d(h, weight, bias, 1,
                                          _transposed_padding(conv), 0, 1,
                                          conv.dilation)
        weight = _folded(conv, norm)[0].index_select(1, in_idx)
        if small:
            return _onednn_conv2d(h, weight, bias, conv)
        return F.conv2d(h, weight, bias, conv.stride, conv.padding,
                        conv.dilation)

    def segment(self, h, indices, masks=None, finish=None):
        """Run the pattern-dependent convs on ``h`` (map ``start - 1``).

        Args:
            h (Tensor): Input of conv ``start``.
            indices (list[Tensor | None]): Open channels of each gated map
                (``None``: all of them).
            masks (list[Tensor | None], optional): Gates ``(n, k)`` to
                multiply the computed channels of each gated map with, for
                samples that share the computation but not the pattern.
            finish (tuple, optional): See :meth:`sparse_layer`; only if
                conv ``end`` is the last.

        Returns:
            Tensor: Map ``end``, all channels, before its plugins (after
            ``finish`` if given).
        """
        in_idx = None
        for i, j in enumerate(range(self.start, self.end)):
            out_idx = indices[i]
            h = self.sparse_layer(j, h, in_idx, out_idx)
            if masks is not None and masks[i] is not None \
                    and h.shape[1] > 0:
                h = h * masks[i][:, :, None, None]
            in_idx = out_idx
        return self.sparse_layer(self.end, h, in_idx, None, finish)


# Plans kept per block (one per input size); more sizes than this start
# the cache afresh.
_MAX_PLANS = 16


def _plan_for(block: nn.Module, x: torch.Tensor) -> _Plan:
    """The block's :class:`_Plan` for inputs shaped like ``x``, cached on
    the block per input size and set of submodules, so that modules
    replaced after construction (e.g. by ``revert_sync_batchnorm``) get a
    new plan."""
    key = (tuple(map(id, block._modules.values())), tuple(x.shape[1:]),
           x.device.type)
    plans = block.__dict__.setdefault('_skip_plans', {})
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plan = plans[key] = _Plan(block, x)
    return plan


def _open_index(row: torch.Tensor) -> Optional[torch.Tensor]:
    """Indices of the open channels of a 0/1 gate row; ``None`` if all."""
    idx = row.nonzero().squeeze(1)
    return None if idx.numel() == row.numel() else idx


def _finish(y: torch.Tensor, finish) -> torch.Tensor:
    """``relu(y + shortcut)`` (in place) for ``finish = (shortcut,
    relu)``; ``y`` for None."""
    if finish is None:
        return y
    shortcut, relu = finish
    y += shortcut
    return y.relu_() if relu else y


def _segment_batch(plan: _Plan, h: torch.Tensor, gates: List[torch.Tensor],
                   finish=None) -> torch.Tensor:
    """Run the pattern-dependent part for a whole batch (see module doc),
    then ``finish`` (see :meth:`_Plan.sparse_layer`)."""
    n = h.shape[0]
    if n == 1:
        indices = [_open_index(g[0]) for g in gates]
        # Where every pattern-dependent conv reads its weight in place,
        # fewer channels always cost less: no estimate needed.
        if any(idx is not None for idx in indices) and not all(
                plan.reads_in_place(j, 1)
                for j in range(plan.start, plan.end + 1)):
            counts = [g.shape[1] if idx is None else idx.numel()
                      for g, idx in zip(gates, indices)]
            if plan.cost(counts, 1) >= plan.cost(plan.full_counts(), 1):
                # Most channels open in a weight-bound layer: the gathers
                # would cost more than they save; compute all channels and
                # mask the closed ones, as mask execution does.
                return plan.segment(h, [None] * len(gates),
                                    [g.to(h.dtype) for g in gates], finish)
        return plan.segment(h, indices, finish=finish)
    open_ = [g > 0 for g in gates]
    if all(bool(o.all()) for o in open_):
        return plan.segment(h, [None] * len(gates), finish=finish)
    patterns, inverse, sizes = torch.unique(
        torch.cat(open_, 1).to(torch.uint8),
        dim=0,
        return_inverse=True,
        return_counts=True)
    if patterns.shape[0] == 1:
        return plan.segment(h, [_open_index(o[0]) for o in open_],
                            finish=finish)
    patterns = torch.split(patterns.bool(), [g.shape[1] for g in gates], 1)
    group_counts = torch.stack([p.sum(1) for p in patterns], 1).tolist()
    group_cost = sum(
        plan.cost(counts, size)
        for counts, size in zip(group_counts, sizes.tolist()))
    union = [o.any(0) for o in open_]
    union_cost = plan.cost([int(u.sum()) for u in union], n)
    if group_cost >= GROUP_EFFICIENCY * union_cost:
        # One computation of the batch's open channels; the samples' closed
        # channels among them are masked as in mask execution.
        indices = [_open_index(u) for u in union]
        masks = [(g if idx is None else g.index_select(1, idx)).to(h.dtype)
                 for g, idx in zip(gates, indices)]
        return plan.segment(h, indices, masks, finish)
    out = None
    for p in range(sizes.shape[0]):
        rows = (inverse == p).nonzero().squeeze(1)
        y = plan.segment(
            h.index_select(0, rows), [_open_index(q[p]) for q in patterns])
        if out is None:
            out = y.new_empty((n, ) + tuple(y.shape[1:]))
        out.index_copy_(0, rows, y)
    return _finish(out, finish)


def skip_residual(block: nn.Module,
                  x: torch.Tensor,
                  *gates: Optional[torch.Tensor],
                  shortcut: Optional[torch.Tensor] = None,
                  relu: bool = False) -> torch.Tensor:
    """The residual branch of a gated block, computing open channels only.

    Equal (up to floating point) to ``block._residual(x, *gates)`` for
    hard 0/1 gates in eval mode.

    Args:
        block (nn.Module): A gated BasicBlock or Bottleneck (mmseg or
            mmpretrain) in eval mode.
        x (Tensor): Block input ``(N, C, H, W)``.
        *gates (Tensor | None): The block's gates in ``gate_names`` order,
            ``(N, C_j)`` 0/1 each, ``None`` where the block has no gate.
        shortcut (Tensor, optional): The block's shortcut, added to the
            branch (by its last convolution where that runs directly).
        relu (bool): Apply a ReLU after the shortcut.

    Returns:
        Tensor: The residual branch, plus ``shortcut`` and after the ReLU
        if asked.
    """
    finish = None if shortcut is None else (shortcut, relu)
    if all(g is None for g in gates) or torch.jit.is_tracing():
        # Under tracing (mmengine's FlopAnalyzer, as in count_macs and
        # GateMetric) the graph must be the dense one whose MACs the
        # analyzer counts as the dense network; the per-sample savings come
        # from the gates, as in mask execution.
        return _finish(block._residual(x, *gates), finish)
    plan = _plan_for(block, x)
    if any(norm.training for norm in plan.norms):
        # A norm left in training mode would normalise with batch
        # statistics in mask execution.
        raise _training_error(block)
    plan.record_gate_sizes()
    h = x
    for j in range(plan.start):
        h = plan.dense_layer(j, h)
    last_in_segment = plan.end == plan.last and not plan.plugins[plan.end]
    h = _segment_batch(plan, h, [gates[j] for j in plan.gated],
                       finish if last_in_segment else None)
    # Plugins of the first ungated map run once for the merged batch.
    for name in plan.plugins[plan.end]:
        h = getattr(block, name)(h)
    for j in range(plan.end + 1, plan.last + 1):
        h = plan.dense_layer(j, h, finish if j == plan.last else None)
    if plan.end == plan.last and not last_in_segment:
        h = _finish(h, finish)  # after the last map's plugins
    return h
