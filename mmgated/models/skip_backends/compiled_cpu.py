"""Skip execution's backend with mmgated's compiled kernels (CPU, float32).

At batch 1 a convolution reads its whole weight for few pixels. Gathering
the open channels' weights (one pass through memory) for oneDNN, which
reorders the copy into its blocked layout on every call (another), costs
as much as it saves; the compiled kernels of :mod:`mmgated.ops` read the
open part of the weight in place instead:

* a stride-1 convolution larger than 1x1 whose output keeps its input's
  size (the 3x3 convolutions of ResNet blocks, dilated or not) runs as
  :func:`~mmgated.ops.gathered_conv2d`, which also adds the block's
  shortcut and applies its ReLU as it stores the output. With every channel
  open only on small maps (``WEIGHT_BOUND_PIXELS``), where the weight, not
  the arithmetic, sets the time: on larger ones oneDNN is as fast;
* another convolution (strided, 1x1) with at most ``WEIGHT_BOUND_PIXELS``
  output pixels and some channels closed runs as im2col and
  :func:`~mmgated.ops.gathered_gemm`.

Everything else (batches, other devices and dtypes, autograd) runs as in
:class:`TorchSkipBackend`. Which kernel a convolution may use is fixed
when skip execution plans a block for an input size (:meth:`route`).
"""
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ...ops import gathered_gemm, keeps_size
from ...ops.gathered_conv import gathered_conv2d_unchecked
from .torch_backend import TorchSkipBackend

# A single sample's convolution with at most this many output pixels is
# bound by reading its weight (a 3x3 512-channel weight is 9.4 MB for the
# 49 pixels of layer 4 of a ResNet at 224x224). Dense, gathered_conv2d
# skips oneDNN's reorder of the whole weight there (on the 2-core test CPU
# 2.8-3.2 ms against 3.7-4.4 ms for a 512-channel 7x7 convolution; on
# 14x14 and larger maps oneDNN is as fast or faster, docs/benchmarks.md).
WEIGHT_BOUND_PIXELS = 64

# gathered_conv2d keeps one operand in L2 while it streams the other: the
# weight (if it has at most 512 KB, see csrc/gathered_product.c) or else the
# input map between its zero rows. Where both are larger (the 32x32 maps of
# 256-512 channels in PSPNet-R50-D8's stages 3-4) it would read one of them
# from memory for every tile; oneDNN blocks such products better.
DIRECT_WEIGHT_BYTES = 512 * 1024
DIRECT_INPUT_BYTES = 1024 * 1024


class Route(NamedTuple):
    """A convolution's compiled kernel for single samples."""
    kernel: Callable
    # Also with every channel open (else only with some closed).
    dense: bool


def _direct(layer, x, in_idx, out_idx, relu, residual):
    """The convolution by :func:`~mmgated.ops.gathered_conv2d`."""
    conv = layer.conv
    weight, bias = layer.weight_bias()
    if residual is not None:
        residual = residual.contiguous()
    # Unchecked: the plan guarantees the arguments; the checks would cost
    # about 1 ms per ResNet-34 forward.
    return gathered_conv2d_unchecked(x.contiguous(), weight, bias,
                                     conv.padding, conv.dilation, out_idx,
                                     in_idx, residual, relu)


def _im2col_gemm(layer, x, in_idx, out_idx, relu, residual):
    """The convolution as im2col and :func:`~mmgated.ops.gathered_gemm`."""
    conv = layer.conv
    weight, bias = layer.weight_bias()
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding,
                    conv.stride)[0]
    y = gathered_gemm(weight.view(weight.shape[0], -1), cols,
                      weight.shape[2] * weight.shape[3], rows=out_idx,
                      col_groups=in_idx, bias=bias,
                      relu=relu and residual is None)
    y = y.view((1, y.shape[0]) + layer.out_size)
    if residual is None:
        return y
    y += residual
    return y.relu_() if relu else y


def _fits_direct(conv, height: int, width: int) -> bool:
    """Whether the weight or the input of ``conv`` on a ``height x width``
    map, as gathered_conv2d copies it (between zero rows), fits its cache
    budget."""
    ph, bytes_ = conv.padding[0], 4
    padded_input = conv.in_channels * (height + 2 * ph) * width
    return (conv.weight.numel() * bytes_ <= DIRECT_WEIGHT_BYTES
            or padded_input * bytes_ <= DIRECT_INPUT_BYTES)


class CompiledCPUSkipBackend(TorchSkipBackend):
    """Single float32 CPU samples by mmgated's compiled kernels (see the
    module doc), the rest as :class:`TorchSkipBackend`."""

    name = 'compiled'

    def route(self, layer, x: torch.Tensor):
        """The compiled kernel of ``layer`` for single samples shaped like
        ``x``, or None: float32 on the CPU without autograd (the kernels
        have no backward), and the shape rules of the module doc."""
        if x.device.type != 'cpu' or x.dtype != torch.float32 \
                or torch.is_grad_enabled():
            return None
        conv = layer.conv
        height, width = layer.out_size
        small = height * width <= WEIGHT_BOUND_PIXELS
        # A 1x1 convolution is a plain matrix product, which MKL / oneDNN
        # block better: 2-2.5x faster on a ResNet-50's at half channels.
        if (tuple(conv.stride) == (1, 1)
                and tuple(conv.kernel_size) != (1, 1)
                and keeps_size(conv.kernel_size, conv.padding, conv.dilation)
                and _fits_direct(conv, height, width)):
            return Route(_direct, dense=small)
        return Route(_im2col_gemm, dense=False) if small else None

    def reads_in_place(self, layer, n: int) -> bool:
        return n == 1 and layer.route is not None

    def conv(self, layer, x, in_idx=None, out_idx=None, relu=False,
             residual=None):
        route = layer.route
        # Without open inputs the result is the bias: the torch backend's.
        if route is not None and x.shape[0] == 1 and x.shape[1] > 0 and (
                route.dense or in_idx is not None or out_idx is not None):
            return route.kernel(layer, x, in_idx, out_idx, relu, residual)
        return super().conv(layer, x, in_idx, out_idx, relu, residual)
