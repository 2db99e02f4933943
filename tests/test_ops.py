"""The compiled operations against convolutions and PyTorch."""
import importlib
import platform
import shlex
import subprocess

import pytest
import torch
import torch.nn.functional as F

from mmgated.ops import (direct_conv_fast, gathered_conv2d,
                         gathered_conv2d_reference,
                         gathered_gemm, gathered_gemm_reference,
                         native_available)

native_module = importlib.import_module('mmgated.ops.native')


def _subset(size, fraction, generator):
    return torch.randperm(size, generator=generator)[:max(
        1, round(size * fraction))].sort()[0]


@pytest.mark.parametrize('compiled', [True, False])
@pytest.mark.parametrize(
    'in_channels, out_channels, size, kernel, stride, dilation',
    [
        (64, 96, 7, 3, 1, 1),  # layer 4 of a ResNet, scaled down
        (32, 40, 14, 3, 2, 1),  # strided: 7x7 out of 14x14
        (24, 30, 9, 3, 1, 2),  # dilated: 81 output pixels, two column tiles
        (300, 13, 5, 1, 1, 1),  # 1x1, more rows of cols than one pass
    ])
def test_convolution_of_open_channels(in_channels, out_channels, size, kernel,
                                      stride, dilation, compiled, monkeypatch):
    """im2col + gathered_gemm over the open input and output channels is
    the convolution of those channels (F.conv2d on gathered tensors)."""
    if not compiled:
        monkeypatch.setattr(native_module, '_library', False)
    elif not native_available():
        pytest.skip('no C compiler')
    gen = torch.Generator().manual_seed(in_channels)
    weight = torch.randn(out_channels, in_channels, kernel, kernel,
                         generator=gen)
    bias = torch.randn(out_channels, generator=gen)
    open_in = _subset(in_channels, 0.45, gen)
    open_out = _subset(out_channels, 0.6, gen)
    padding = dilation * (kernel // 2)
    for rows, col_groups in ((open_out, open_in), (None, open_in),
                             (open_out, None)):
        # The input holds the open channels only, or all of them.
        channels = in_channels if col_groups is None else col_groups.numel()
        inputs = torch.randn(1, channels, size, size, generator=gen)
        cols = F.unfold(inputs, kernel, dilation, padding, stride)[0]
        w = weight if rows is None else weight[rows]
        w = w if col_groups is None else w[:, col_groups]
        b = bias if rows is None else bias[rows]
        expected = F.conv2d(inputs, w, b, stride, padding, dilation).relu()
        actual = gathered_gemm(
            weight.view(out_channels, -1),
            cols,
            kernel * kernel,
            rows=rows,
            col_groups=col_groups,
            bias=bias,
            relu=True)
        torch.testing.assert_close(
            actual.view(expected.shape), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('rows_count, groups_count, n', [
    (None, None, 3),
    (1, 5, 64),
    (7, None, 65),  # a partial register tile and a second column tile
    (12, 230, 130),  # 230 * 9 rows of cols: two passes
])
@pytest.mark.parametrize('relu, with_bias', [(False, False), (True, True)])
def test_matches_reference(rows_count, groups_count, n, relu, with_bias):
    if not native_available():
        pytest.skip('no C compiler')
    gen = torch.Generator().manual_seed(n)
    group, num_rows, num_groups = 9, 20, 240
    weight = torch.randn(num_rows, num_groups * group, generator=gen)
    rows = None if rows_count is None else _subset(num_rows,
                                                   rows_count / num_rows, gen)
    groups = None if groups_count is None else _subset(
        num_groups, groups_count / num_groups, gen)
    k = num_groups if groups is None else groups.numel()
    cols = torch.randn(k * group, n, generator=gen)
    bias = torch.randn(num_rows, generator=gen) if with_bias else None
    args = (weight, cols, group, rows, groups, bias, relu)
    torch.testing.assert_close(
        gathered_gemm(*args), gathered_gemm_reference(*args), rtol=1e-5,
        atol=1e-4)


def test_bad_arguments():
    weight = torch.randn(4, 18)
    cols = torch.randn(18, 5)
    with pytest.raises(ValueError, match='weight must be a contiguous'):
        gathered_gemm(weight.double(), cols, 9)
    with pytest.raises(ValueError, match='cols must be a contiguous'):
        gathered_gemm(weight, cols.t(), 9)
    with pytest.raises(ValueError, match='group 4 does not divide'):
        gathered_gemm(weight, cols, 4)
    with pytest.raises(ValueError, match='cols has 18 rows, expected 1'):
        gathered_gemm(weight, cols, 9, col_groups=torch.tensor([1]))
    with pytest.raises(ValueError, match=r'rows must lie in \[0, 4\)'):
        gathered_gemm(weight, cols, 9, rows=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match='col_groups must be a contiguous'):
        gathered_gemm(weight, cols[:9], 9, col_groups=torch.tensor([1.0]))
    with pytest.raises(ValueError, match='bias has 3 values for 4'):
        gathered_gemm(weight, cols, 9, bias=torch.randn(3))


# (in channels, out channels, map height, width, kernel, padding, dilation)
CONV_GEOMETRIES = [
    (64, 96, 7, 7, (3, 3), (1, 1), (1, 1)),  # layer 4 of a ResNet, scaled
    (24, 30, 9, 11, (3, 3), (2, 2), (2, 2)),  # dilated (PSPNet), not square
    (240, 7, 6, 6, (3, 3), (1, 1), (1, 1)),  # 240 * 9 taps: two passes
    (5, 7, 13, 13, (5, 5), (2, 2), (1, 1)),  # 5x5: the taps' general loop
    (6, 11, 9, 10, (1, 3), (0, 1), (1, 1)),  # padding along one axis only
    (20, 16, 12, 17, (1, 1), (0, 0), (1, 1)),  # 1x1
    (8, 9, 1, 1, (3, 3), (1, 1), (1, 1)),  # a 1x1 map: all taps but one pad
    (3, 4, 2, 7, (3, 3), (1, 1), (1, 1)),  # maps narrower than a vector
    (3, 5, 4, 20, (1, 17), (0, 8), (1, 1)),  # wider than the kernel takes
]


@pytest.mark.parametrize('compiled', [True, False])
@pytest.mark.parametrize('geometry', CONV_GEOMETRIES)
def test_gathered_conv2d_is_the_convolution(geometry, compiled, monkeypatch):
    """gathered_conv2d over the open input and output channels, with a
    residual and a ReLU or neither, is F.conv2d on the gathered tensors."""
    if not compiled:
        monkeypatch.setattr(native_module, '_library', False)
    elif not native_available():
        pytest.skip('no C compiler')
    c_in, c_out, height, width, kernel, padding, dilation = geometry
    gen = torch.Generator().manual_seed(c_in * c_out)
    weight = torch.randn(c_out, c_in, *kernel, generator=gen)
    bias = torch.randn(c_out, generator=gen)
    residual = torch.randn(1, c_out, height, width, generator=gen)
    open_in = _subset(c_in, 0.45, gen)
    open_out = _subset(c_out, 0.6, gen)
    for rows, col_groups, res, relu in ((open_out, open_in, None, True),
                                        (None, open_in, residual, True),
                                        (open_out, None, residual, False),
                                        (None, None, None, False)):
        channels = c_in if col_groups is None else col_groups.numel()
        x = torch.randn(1, channels, height, width, generator=gen)
        w = weight if rows is None else weight[rows]
        w = w if col_groups is None else w[:, col_groups]
        expected = F.conv2d(x, w, bias if rows is None else bias[rows], 1,
                            padding, dilation)
        if res is not None:
            expected += res if rows is None else res[:, rows]
        if relu:
            expected = expected.relu()
        actual = gathered_conv2d(x, weight, bias, padding, dilation, rows,
                                 col_groups, res, relu)
        assert actual.is_contiguous()
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_gathered_conv2d_without_input_channels():
    """No open input channel: the bias (plus the residual)."""
    weight, bias = torch.randn(4, 6, 3, 3), torch.randn(4)
    residual = torch.randn(1, 4, 5, 5)
    x = torch.zeros(1, 0, 5, 5)
    none_open = torch.zeros(0, dtype=torch.long)
    actual = gathered_conv2d(x, weight, bias, 1, 1, col_groups=none_open,
                             residual=residual)
    torch.testing.assert_close(actual, bias[None, :, None, None] + residual)


@pytest.mark.parametrize('flags', [('-O2', ), ('-O2', '-mavx2', '-mfma')],
                         ids=['plain', 'avx2'])
def test_portable_build(flags, monkeypatch, tmp_path):
    """Built without -march=native, with the plain C tiles or (where the
    CPU has them, AVX-512 or not) the AVX2 ones, both products still equal
    their references."""
    # The CPU flags -march=native compiles for, as the build cache keys them.
    cpu_flags = set(native_module._cpu_signature().split())
    if '-mavx2' in flags and not {'avx2', 'fma'} <= cpu_flags:
        pytest.skip('this CPU has no AVX2 and FMA')
    monkeypatch.setattr(native_module, '_library', None)
    monkeypatch.setenv('MMGATED_CACHE', str(tmp_path))
    monkeypatch.setattr(native_module, '_FLAG_SETS', (flags, ))
    if not native_available():
        pytest.skip('no C compiler')
    assert native_module.native_build_flags() == flags
    # The vectorised tiles are the ones skip execution's 'auto' picks.
    assert direct_conv_fast() == ('-mavx2' in flags)
    gen = torch.Generator().manual_seed(0)
    for c_in, c_out, height, width, kernel, padding, dilation in \
            CONV_GEOMETRIES:
        weight = torch.randn(c_out, c_in, *kernel, generator=gen)
        bias = torch.randn(c_out, generator=gen)
        rows, cols = _subset(c_out, 0.5, gen), _subset(c_in, 0.6, gen)
        x = torch.randn(1, cols.numel(), height, width, generator=gen)
        residual = torch.randn(1, c_out, height, width, generator=gen)
        for args in ((x, weight, bias, padding, dilation, rows, cols, None,
                      True), (x, weight, bias, padding, dilation, None, cols,
                              residual, False)):
            torch.testing.assert_close(
                gathered_conv2d(*args), gathered_conv2d_reference(*args),
                rtol=1e-4, atol=1e-4)
    # 10 groups of 9 columns, 6 of them open; 3 of 7 rows.
    groups = _subset(10, 0.6, gen)
    matrix, im2col = torch.randn(7, 90), torch.randn(54, 70)
    args = (matrix, im2col, 9, _subset(7, 0.4, gen), groups, torch.randn(7),
            True)
    torch.testing.assert_close(gathered_gemm(*args),
                               gathered_gemm_reference(*args), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize(
    'isa', [(), ('-mavx2', '-mfma'), ('-mavx512f', '-mavx512vl', '-mfma')],
    ids=['plain', 'avx2', 'avx512'])
def test_every_tile_compiles_cleanly(isa, tmp_path):
    """The plain, AVX2 and AVX-512 tiles compile without warnings, whatever
    this CPU runs (the AVX-512 ones run only on AVX-512 machines, so a
    mistake in them would otherwise go unnoticed elsewhere)."""
    if isa and platform.machine().lower() not in ('x86_64', 'amd64'):
        pytest.skip('x86 instruction sets')
    compiler = native_module.c_compiler()
    if compiler is None:
        pytest.skip('no C compiler')
    result = subprocess.run(
        [*shlex.split(compiler), '-O2', '-Wall', '-Werror',
         '-Wno-unknown-pragmas', *isa, '-c', *native_module._SOURCES, '-o',
         str(tmp_path / 'tiles.o')],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('compiled', [True, False])
def test_indices_out_of_range(compiled, monkeypatch):
    """Out-of-range indices are refused with their range, whether the
    compiled function (which checks them itself) or the fallback runs."""
    if not compiled:
        monkeypatch.setattr(native_module, '_library', False)
    elif not native_available():
        pytest.skip('no C compiler')
    weight, x = torch.randn(4, 6, 3, 3), torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match=r'rows must lie in \[0, 4\), got '
                       r'values in \[1, 4\]'):
        gathered_conv2d(x[:, :1], weight, padding=1, rows=torch.tensor([1, 4]),
                        col_groups=torch.tensor([0]))
    with pytest.raises(ValueError, match=r'col_groups must lie in \[0, 6\)'):
        gathered_conv2d(x, weight, padding=1,
                        col_groups=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r'col_groups must lie in \[0, 2\)'):
        gathered_gemm(torch.randn(4, 18), torch.randn(9, 5), 9,
                      col_groups=torch.tensor([2]))


def test_gathered_conv2d_bad_arguments():
    weight, x = torch.randn(4, 6, 3, 3), torch.randn(1, 6, 5, 5)
    with pytest.raises(ValueError, match='does not keep the map size'):
        gathered_conv2d(x, weight, padding=0)
    with pytest.raises(ValueError, match='does not keep the map size'):
        gathered_conv2d(x, weight, padding=2, dilation=1)
    with pytest.raises(ValueError, match='padding must be a non-negative'):
        gathered_conv2d(x, weight, padding=-1)
    with pytest.raises(ValueError, match=r'expected one sample of 2 channels'):
        gathered_conv2d(x, weight, padding=1, col_groups=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='x must be a contiguous'):
        gathered_conv2d(x.transpose(2, 3), weight, padding=1)
    with pytest.raises(ValueError, match=r'rows must lie in \[0, 4\)'):
        gathered_conv2d(x, weight, padding=1, rows=torch.tensor([4]))
    with pytest.raises(ValueError, match='residual is'):
        gathered_conv2d(x, weight, padding=1,
                        residual=torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match='bias has 3 values for 4'):
        gathered_conv2d(x, weight, torch.randn(3), padding=1)


def test_without_a_compiler(monkeypatch, tmp_path):
    """No compiler that works: a warning, and the PyTorch version."""
    monkeypatch.setattr(native_module, '_library', None)
    monkeypatch.setenv('MMGATED_CACHE', str(tmp_path))
    monkeypatch.setenv('CC', 'false')  # a "compiler" that always fails
    with pytest.warns(UserWarning, match='could not compile'):
        assert not native_available()
    assert not list(tmp_path.rglob('*.so'))
    weight, cols = torch.randn(4, 18), torch.randn(18, 5)
    torch.testing.assert_close(
        gathered_gemm(weight, cols, 9), weight @ cols)
    # Switched off by the environment: no build is tried.
    monkeypatch.setattr(native_module, '_library', None)
    monkeypatch.setenv('MMGATED_NATIVE', '0')
    assert not native_available()


def test_a_flag_set_the_compiler_refuses_is_passed_over(monkeypatch,
                                                        tmp_path):
    """As a compiler without OpenMP or -march=native: the next flag set."""
    monkeypatch.setattr(native_module, '_library', None)
    monkeypatch.setenv('MMGATED_CACHE', str(tmp_path))
    monkeypatch.setattr(native_module, '_FLAG_SETS',
                        (('-O2', '-fmmgated-no-such-flag'), ('-O2', )))
    if not native_available():
        pytest.skip('no C compiler')
    assert native_module.native_build_flags() == ('-O2', )
    weight, cols = torch.randn(4, 18), torch.randn(18, 5)
    torch.testing.assert_close(gathered_gemm(weight, cols, 9), weight @ cols)


def test_flags_from_the_environment(monkeypatch, tmp_path):
    """MMGATED_NATIVE_FLAGS is the one flag set tried: here without
    -march=native, so the tiles are plain C (and 'auto' would leave them),
    with the same results."""
    monkeypatch.setattr(native_module, '_library', None)
    monkeypatch.setenv('MMGATED_CACHE', str(tmp_path))
    monkeypatch.setenv('MMGATED_NATIVE_FLAGS', ' -O2  -fopenmp ')
    if not native_available():
        pytest.skip('no C compiler')
    assert native_module.native_build_flags() == ('-O2', '-fopenmp')
    assert not direct_conv_fast()
    x, weight = torch.randn(1, 3, 6, 5), torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(gathered_conv2d(x, weight, padding=1),
                               F.conv2d(x, weight, padding=1),
                               rtol=1e-4, atol=1e-4)


def test_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(native_module, '_library', None)
    monkeypatch.setenv('MMGATED_CACHE', str(tmp_path))
    if not native_available():
        pytest.skip('no C compiler')
    built = list(tmp_path.rglob('mmgated_ops-*.so'))
    assert len(built) == 1
    # A new process (here: a reset) loads the cached library.
    monkeypatch.setattr(native_module, '_library', None)
    mtime = built[0].stat().st_mtime_ns
    assert native_available()
    assert built[0].stat().st_mtime_ns == mtime
