"""A matrix product over selected rows and column groups of a weight.

:func:`gathered_gemm` computes, for a weight ``W`` of shape ``(R, C * G)``,

.. code-block:: none

    out[m, n] = act(bias[rows[m]] + sum_{j, t} W[rows[m], cidx[j] * G + t]
                                             * cols[j * G + t, n])

which is ``W[rows][:, group columns of cidx] @ cols + bias[rows]`` without
copying the selected part of ``W`` out first. With ``cols`` the im2col matrix
of a convolution's open input channels and ``G = kh * kw`` it is the
convolution of the open channels. At batch 1 on small maps a convolution is
bound by reading its weight, and the gather (one more read and write of the
selected weights) plus oneDNN's reorder of the gathered copy (another) cost
more than the product itself; skip execution's compiled backend uses this
product there (see :mod:`mmgated.models.skip_backends.compiled_cpu`).

The product runs as a small C function (``csrc/gathered_product.c``, built on
first use, see :mod:`mmgated.ops.native`); without it,
:func:`gathered_gemm_reference` computes the same with PyTorch operations.
"""
import ctypes
from typing import Optional

import torch

from .native import check_tensor, native_function, pointer


# The compiled function's argument types, in the order of its C signature.
_ARGTYPES = [
    ctypes.c_void_p,  # W
    ctypes.c_long, ctypes.c_long,  # R, ldw
    ctypes.c_void_p, ctypes.c_long,  # rows, M
    ctypes.c_void_p, ctypes.c_long, ctypes.c_long,  # cidx, kc, G
    ctypes.c_void_p, ctypes.c_long,  # cols, N
    ctypes.c_void_p, ctypes.c_int,  # bias, relu
    ctypes.c_void_p, ctypes.c_int  # out, threads
]


def _check(name, tensor, dtype, dim):
    check_tensor('gathered_gemm', name, tensor, dtype, dim)


def check_index(op: str, name: str, index: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``index`` is a contiguous int64 vector
    (the compiled operations check the range of its values)."""
    check_tensor(op, name, index, torch.int64, 1)


def check_ranges(op: str, indices) -> None:
    """Raise ``ValueError`` for an index with values outside ``[0, size)``
    (``indices``: name -> (index or None, size))."""
    for name, (index, size) in indices.items():
        if index is not None and index.numel():
            low, high = (int(v) for v in torch.aminmax(index))
            if not 0 <= low <= high < size:
                raise ValueError(f'{op}: {name} must lie in [0, {size}), got '
                                 f'values in [{low}, {high}]')


def raise_for_status(op: str, status: int, indices) -> None:
    """Turn a compiled operation's status into an exception: -1 no memory,
    -2 an index out of range (see :func:`check_ranges`)."""
    if status == -1:
        raise MemoryError(f'{op}: out of memory')
    if status == -2:
        check_ranges(op, indices)
    if status != 0:
        raise RuntimeError(f'{op}: failed with status {status}')


def gathered_gemm(weight: torch.Tensor,
                  cols: torch.Tensor,
                  group: int,
                  rows: Optional[torch.Tensor] = None,
                  col_groups: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None,
                  relu: bool = False) -> torch.Tensor:
    """``act(W[rows][:, groups col_groups] @ cols + bias[rows])``.

    Args:
        weight (Tensor): ``(R, C * group)`` float32; column group ``c`` is
            columns ``c * group`` to ``c * group + group - 1``.
        cols (Tensor): ``(k * group, N)`` float32, row group ``j`` matching
            weight column group ``col_groups[j]``.
        group (int): Columns per group (``kh * kw`` for a convolution).
        rows (Tensor, optional): ``(M, )`` int64 weight rows to compute;
            ``None``: all ``R``.
        col_groups (Tensor, optional): ``(k, )`` int64 column groups of the
            weight that ``cols`` holds; ``None``: all ``C`` (``k = C``).
        bias (Tensor, optional): ``(R, )`` float32, indexed like the rows.
        relu (bool): Apply a ReLU to the result.

    Returns:
        Tensor: ``(M, N)`` float32.

    Raises:
        ValueError: Shapes, dtypes or indices that do not fit.
    """
    _check('weight', weight, torch.float32, 2)
    _check('cols', cols, torch.float32, 2)
    if group < 1 or weight.shape[1] % group:
        raise ValueError(f'gathered_gemm: group {group} does not divide the '
                         f'weight width {weight.shape[1]}')
    num_groups = weight.shape[1] // group
    k = num_groups if col_groups is None else col_groups.numel()
    if cols.shape[0] != k * group:
        raise ValueError(f'gathered_gemm: cols has {cols.shape[0]} rows, '
                         f'expected {k} groups of {group}')
    if rows is not None:
        check_index('gathered_gemm', 'rows', rows)
    if col_groups is not None:
        check_index('gathered_gemm', 'col_groups', col_groups)
    if bias is not None:
        _check('bias', bias, torch.float32, 1)
        if bias.numel() != weight.shape[0]:
            raise ValueError(f'gathered_gemm: bias has {bias.numel()} '
                             f'values for {weight.shape[0]} weight rows')
    indices = dict(rows=(rows, weight.shape[0]),
                   col_groups=(col_groups, num_groups))
    function = native_function('gathered_gemm', _ARGTYPES, ctypes.c_int)
    if function is None:
        check_ranges('gathered_gemm', indices)
        return gathered_gemm_reference(weight, cols, group, rows, col_groups,
                                       bias, relu)
    m = weight.shape[0] if rows is None else rows.numel()
    out = cols.new_empty((m, cols.shape[1]))
    ptr = pointer
    # The compiled function checks the indices' range itself (cheaper).
    status = function(ptr(weight), weight.shape[0], weight.shape[1],
                      ptr(rows), m, ptr(col_groups), k, group, ptr(cols),
                      cols.shape[1], ptr(bias), int(relu), ptr(out),
                      torch.get_num_threads())
    raise_for_status('gathered_gemm', status, indices)
    return out


def gathered_gemm_reference(weight, cols, group, rows=None, col_groups=None,
                            bias=None, relu=False):
    """:func:`gathered_gemm` with PyTorch operations (gathers, then one
    matrix product); the fallback without a compiler and the tests'
    reference."""
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = None if bias is None else bias.index_select(0, rows)
    if col_groups is not None:
        weight = weight.view(weight.shape[0], -1, group).index_select(
            1, col_groups).view(weight.shape[0], -1)
    out = weight @ cols if bias is None else torch.addmm(
        bias[:, None], weight, cols)
    return out.relu_() if relu else out
