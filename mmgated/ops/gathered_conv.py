"""A stride-1 convolution over selected output and input channels of a
weight, read in place.

:func:`gathered_conv2d` computes, for one sample ``x`` holding input
channels ``col_groups`` of a convolution with weight ``W`` (``(R, C, kh,
kw)``) whose output has the input's size ("same" padding, as the 3x3
convolutions of ResNet blocks, dilated or not),

.. code-block:: none

    y = act(conv2d(x, W[rows][:, col_groups], bias[rows], padding, dilation)
            + residual[rows])

without copying the selected part of ``W`` out and without im2col (the
compiled function makes one copy of ``x`` between zero rows). At batch 1 a
convolution reads its whole weight for few pixels; PyTorch's path gathers
the open channels (a pass through memory) and oneDNN reorders the copy into
its blocked layout on every call (another) before it computes. Skip execution's compiled backend uses this for the
stride-1 convolutions of a single sample (see
:mod:`mmgated.models.skip_backends.compiled_cpu`), with the block's
shortcut as ``residual``.

The product runs as a small C function (``csrc/gathered_product.c``, built
on first use, see :mod:`mmgated.ops.native`); without it,
:func:`gathered_conv2d_reference` computes the same with PyTorch operations.
"""
import ctypes
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .gathered_gemm import check_index, check_ranges, raise_for_status
from .native import check_tensor, native_function, native_library, pointer

# The widest kernel the compiled function takes (KW_MAX in
# csrc/gathered_product.c); wider ones run as the reference.
MAX_KERNEL_WIDTH = 16

# The compiled function's argument types, in the order of its C signature.
_ARGTYPES = [
    ctypes.c_void_p,  # W
    ctypes.c_long, ctypes.c_long,  # R, ldw
    ctypes.c_void_p, ctypes.c_long,  # rows, M
    ctypes.c_void_p, ctypes.c_long,  # cidx, kc
    ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long,  # kh kw dh dw
    ctypes.c_long, ctypes.c_long,  # ph, pw
    ctypes.c_void_p, ctypes.c_long, ctypes.c_long,  # x, H, W
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,  # bias, res, relu
    ctypes.c_void_p, ctypes.c_int  # out, threads
]


def _pair(value, name) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 0 for v in pair):
        raise ValueError(f'gathered_conv2d: {name} must be a non-negative '
                         f'int or a pair of them, got {value!r}')
    return int(pair[0]), int(pair[1])


def keeps_size(kernel_size, padding, dilation) -> bool:
    """Whether a stride-1 convolution with this geometry has an output of
    its input's size, as :func:`gathered_conv2d` needs."""
    return all(d * (k - 1) == 2 * p
               for k, p, d in zip(kernel_size, padding, dilation))


def direct_conv_fast() -> bool:
    """Whether :func:`gathered_conv2d` runs compiled with vectorised tiles
    (AVX-512, or AVX2 with FMA). Only then is it faster than gathering the
    open weights for oneDNN (the plain C tiles are not), so skip
    execution's ``backend='auto'`` picks the compiled backend only then
    (the result is the same either way)."""
    library = native_library()
    if library is None:
        return False
    # Asked once per loaded library.
    fast = library.__dict__.get('_mmgated_vectorized')
    if fast is None:
        function = native_function('gathered_product_vectorized', [],
                                   ctypes.c_int)
        fast = library.__dict__['_mmgated_vectorized'] = bool(function())
    return fast


def _check(name, tensor, dim):
    check_tensor('gathered_conv2d', name, tensor, torch.float32, dim)


def gathered_conv2d(x: torch.Tensor,
                    weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None,
                    padding=0,
                    dilation=1,
                    rows: Optional[torch.Tensor] = None,
                    col_groups: Optional[torch.Tensor] = None,
                    residual: Optional[torch.Tensor] = None,
                    relu: bool = False) -> torch.Tensor:
    """``act(conv2d(x, W[rows][:, col_groups], bias[rows], padding,
    dilation) + residual[rows])``, stride 1, output of the input's size.

    Args:
        x (Tensor): ``(1, k, H, W)`` float32, contiguous; its channel ``j``
            is input channel ``col_groups[j]`` of the weight.
        weight (Tensor): ``(R, C, kh, kw)`` float32, contiguous.
        bias (Tensor, optional): ``(R, )`` float32, indexed like the rows.
        padding (int | tuple[int, int]): Zero padding ``(ph, pw)``; with
            the dilation ``(dh, dw)`` it must keep the size:
            ``dh * (kh - 1) == 2 * ph`` and ``dw * (kw - 1) == 2 * pw``.
        dilation (int | tuple[int, int]): Dilation of the taps.
        rows (Tensor, optional): ``(M, )`` int64 output channels (weight
            rows) to compute; ``None``: all ``R``.
        col_groups (Tensor, optional): ``(k, )`` int64 input channels of
            the weight that ``x`` holds; ``None``: all ``C`` (``k = C``).
        residual (Tensor, optional): ``(1, R, H, W)`` float32, contiguous,
            added before the ReLU, indexed like the rows (a block's
            shortcut).
        relu (bool): Apply a ReLU to the result.

    Returns:
        Tensor: ``(1, M, H, W)`` float32, contiguous.

    Raises:
        ValueError: Shapes, dtypes, indices or a geometry that do not fit.
    """
    _check('x', x, 4)
    _check('weight', weight, 4)
    padding, dilation = _pair(padding, 'padding'), _pair(dilation,
                                                         'dilation')
    out_channels, in_channels, kh, kw = weight.shape
    if min(dilation) < 1 or not keeps_size((kh, kw), padding, dilation):
        raise ValueError(
            f'gathered_conv2d: a {kh}x{kw} kernel with padding {padding} '
            f'and dilation {dilation} does not keep the map size; needs '
            'dilation >= 1 and dilation * (kernel - 1) == 2 * padding')
    k = in_channels if col_groups is None else col_groups.numel()
    if x.shape[0] != 1 or x.shape[1] != k:
        raise ValueError(f'gathered_conv2d: x is {tuple(x.shape)}, expected '
                         f'one sample of {k} channels (those it holds)')
    height, width = x.shape[2:]
    if rows is not None:
        check_index('gathered_conv2d', 'rows', rows)
    if col_groups is not None:
        check_index('gathered_conv2d', 'col_groups', col_groups)
    if bias is not None:
        _check('bias', bias, 1)
        if bias.numel() != out_channels:
            raise ValueError(f'gathered_conv2d: bias has {bias.numel()} '
                             f'values for {out_channels} output channels')
    if residual is not None:
        _check('residual', residual, 4)
        if tuple(residual.shape) != (1, out_channels, height, width):
            raise ValueError(
                f'gathered_conv2d: residual is {tuple(residual.shape)}, '
                f'expected {(1, out_channels, height, width)}')
    return gathered_conv2d_unchecked(x, weight, bias, padding, dilation, rows,
                                     col_groups, residual, relu)


def gathered_conv2d_unchecked(x, weight, bias, padding, dilation, rows,
                              col_groups, residual, relu) -> torch.Tensor:
    """:func:`gathered_conv2d` without its argument checks except the
    indices' range (in the compiled function), for callers that guarantee
    the rest (skip execution's compiled backend calls it about 30 times
    per ResNet-34 forward, where the checks would cost about 1 ms);
    ``padding`` and
    ``dilation`` are pairs."""
    out_channels, in_channels, kh, kw = weight.shape
    function = native_function('gathered_conv', _ARGTYPES, ctypes.c_int)
    if function is None or kw > MAX_KERNEL_WIDTH:
        check_ranges('gathered_conv2d', dict(rows=(rows, out_channels),
                                             col_groups=(col_groups,
                                                         in_channels)))
        return gathered_conv2d_reference(x, weight, bias, padding, dilation,
                                         rows, col_groups, residual, relu)
    height, width = x.shape[2:]
    m = out_channels if rows is None else rows.numel()
    out = x.new_empty((1, m, height, width))
    ptr = pointer
    status = function(ptr(weight), out_channels, in_channels * kh * kw,
                      ptr(rows), m, ptr(col_groups), x.shape[1], kh, kw,
                      *dilation, *padding, ptr(x), height, width, ptr(bias),
                      ptr(residual), int(relu), ptr(out),
                      torch.get_num_threads())
    if status:
        raise_for_status(
            'gathered_conv2d', status,
            dict(rows=(rows, out_channels),
                 col_groups=(col_groups, in_channels)))
    return out


def gathered_conv2d_reference(x, weight, bias=None, padding=0, dilation=1,
                              rows=None, col_groups=None, residual=None,
                              relu=False):
    """:func:`gathered_conv2d` with PyTorch operations (gathers, then
    ``F.conv2d``); the fallback without a compiler and the tests'
    reference."""
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = None if bias is None else bias.index_select(0, rows)
        if residual is not None:
            residual = residual.index_select(1, rows)
    if col_groups is not None:
        weight = weight.index_select(1, col_groups)
    y = F.conv2d(x, weight, bias, 1, padding, dilation)
    if residual is not None:
        y = y.add_(residual)
    return y.relu_() if relu else y
