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
more than the product itself; skip execution uses this product there (see
:mod:`mmgated.models.skip_execution`).

The product runs as a small C function (``csrc/gathered_gemm.c``) that is
compiled with the system C compiler the first time it is needed and cached in
``$MMGATED_CACHE/ops`` (default ``~/.cache/mmgated/ops``), keyed by the source,
the flags and the CPU. Where no compiler works, :func:`native_available` is
False and :func:`gathered_gemm` computes the same with PyTorch operations.
``MMGATED_NATIVE=0`` turns the compiled version off.
"""
import ctypes
import hashlib
import os
import os.path as osp
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from typing import Optional

import torch

_SOURCE = osp.join(osp.dirname(__file__), 'csrc', 'gathered_gemm.c')
# Tried in order; the first set the compiler accepts is used. Without
# -march=native there is no AVX-512 tile; without -fopenmp one thread.
_FLAG_SETS = (
    ('-O3', '-march=native', '-fopenmp'),
    ('-O3', '-fopenmp'),
    ('-O3', ),
)
_library = None  # the loaded library, False after a failed build


def _cache_dir() -> str:
    root = os.environ.get('MMGATED_CACHE') or osp.join(
        osp.expanduser('~'), '.cache', 'mmgated')
    return osp.join(root, 'ops')


def _cpu_signature() -> str:
    """What -march=native compiles for: the machine and its CPU flags."""
    flags = ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features')):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _compile(compiler: str, flags, target: str) -> bool:
    """Compile the source into ``target`` (atomically); True on success,
    False if the compiler refuses or the cache cannot be written."""
    try:
        os.makedirs(osp.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix='.so', dir=osp.dirname(target))
        os.close(fd)
    except OSError:
        return False
    try:
        result = subprocess.run(
            [*shlex.split(compiler), *flags, '-shared', '-fPIC', _SOURCE,
             '-o', tmp],
            capture_output=True, text=True)
        if result.returncode != 0:
            return False
        os.replace(tmp, target)  # concurrent builders write the same file
        return True
    except OSError:
        return False
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def _load():
    """The compiled library, building it on first use; None if it cannot
    be had (no compiler, ``MMGATED_NATIVE=0``)."""
    global _library
    if _library is not None:
        return _library or None
    _library = False
    if os.environ.get('MMGATED_NATIVE', '1') == '0':
        return None
    compiler = os.environ.get('CC') or shutil.which('cc') or shutil.which(
        'gcc')
    if compiler is None:
        warnings.warn('mmgated: no C compiler found; skip execution uses '
                      'PyTorch operations for weight-bound convolutions')
        return None
    with open(_SOURCE, 'rb') as f:
        source = f.read()
    for flags in _FLAG_SETS:
        key = hashlib.sha1(b'\0'.join([
            source, ' '.join((compiler, ) + flags).encode(),
            _cpu_signature().encode()
        ])).hexdigest()[:16]
        target = osp.join(_cache_dir(), f'gathered_gemm-{key}.so')
        if osp.exists(target) or _compile(compiler, flags, target):
            try:
                library = ctypes.CDLL(target)
            except OSError:
                continue
            library.gathered_gemm.restype = ctypes.c_int
            library.gathered_gemm.argtypes = [
                ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int,
                ctypes.c_void_p, ctypes.c_int
            ]
            _library = library
            return library
    warnings.warn(f'mmgated: {compiler} could not compile {_SOURCE}; skip '
                  'execution uses PyTorch operations for weight-bound '
                  'convolutions')
    return None


def native_available() -> bool:
    """Whether the compiled product can be used (building it if needed)."""
    return _load() is not None


def _check(name, tensor, dtype, dim):
    if tensor.dtype != dtype or tensor.dim() != dim \
            or tensor.device.type != 'cpu' or not tensor.is_contiguous():
        raise ValueError(
            f'gathered_gemm: {name} must be a contiguous {dim}-d {dtype} CPU '
            f'tensor, got {tuple(tensor.shape)} {tensor.dtype} on '
            f'{tensor.device} (contiguous: {tensor.is_contiguous()})')


def _check_index(name, index, size):
    _check(name, index, torch.int64, 1)
    if index.numel() and not 0 <= int(index.min()) <= int(
            index.max()) < size:
        raise ValueError(f'gathered_gemm: {name} must lie in [0, {size}), '
                         f'got values in [{int(index.min())}, '
                         f'{int(index.max())}]')


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
        _check_index('rows', rows, weight.shape[0])
    if col_groups is not None:
        _check_index('col_groups', col_groups, num_groups)
    if bias is not None:
        _check('bias', bias, torch.float32, 1)
        if bias.numel() != weight.shape[0]:
            raise ValueError(f'gathered_gemm: bias has {bias.numel()} '
                             f'values for {weight.shape[0]} weight rows')
    library = _load()
    if library is None:
        return gathered_gemm_reference(weight, cols, group, rows, col_groups,
                                       bias, relu)
    m = weight.shape[0] if rows is None else rows.numel()
    out = cols.new_empty((m, cols.shape[1]))

    def ptr(t):
        return None if t is None else t.data_ptr()

    status = library.gathered_gemm(
        ptr(weight), weight.shape[1], ptr(rows), m, ptr(col_groups), k,
        group, ptr(cols), cols.shape[1], ptr(bias), int(relu), ptr(out),
        torch.get_num_threads())
    if status != 0:
        raise MemoryError('gathered_gemm: out of memory')
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
