"""Build and load mmgated's compiled operations.

The C source ``csrc/gathered_product.c`` (skip execution's products over
open channels) is compiled into a shared library with the system C compiler
the first time an operation needs it, and cached in
``$MMGATED_CACHE/ops`` (default ``~/.cache/mmgated/ops``), keyed by the
sources, the flags and the CPU (``-march=native``). The library links
against the OpenMP runtime that torch has already loaded. Where no compiler
works, :func:`native_library` is None and the operations compute the same
with PyTorch operations; ``MMGATED_NATIVE=0`` turns the compiled versions
off. ``MMGATED_NATIVE_FLAGS`` replaces the flag sets by its own, e.g.
``-O3 -mavx2 -mfma -fopenmp`` for the AVX2 tiles on an AVX-512 CPU.
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

_SOURCES = (osp.join(osp.dirname(__file__), 'csrc', 'gathered_product.c'), )
# Tried in order; the first set the compiler accepts and whose library
# loads is used. Without -march=native there are no vectorised tiles
# (AVX-512 or AVX2); without -fopenmp one thread.
_FLAG_SETS = (
    ('-O3', '-march=native', '-fopenmp'),
    ('-O3', '-fopenmp'),
    ('-O3', ),
)
_library = None  # the loaded library, False after a failed build


def cache_root() -> str:
    """Where compiled code is cached: ``$MMGATED_CACHE``, by default
    ``~/.cache/mmgated``."""
    return os.environ.get('MMGATED_CACHE') or osp.join(
        osp.expanduser('~'), '.cache', 'mmgated')


def _cache_dir() -> str:
    return osp.join(cache_root(), 'ops')


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
    """Compile the sources into ``target`` (atomically); True on success,
    False if the compiler refuses or the cache cannot be written."""
    try:
        os.makedirs(osp.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix='.so', dir=osp.dirname(target))
        os.close(fd)
    except OSError:
        return False
    try:
        result = subprocess.run(
            [*shlex.split(compiler), *flags, '-shared', '-fPIC', *_SOURCES,
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


def _flag_sets():
    """The compiler flag sets to try in order: ``$MMGATED_NATIVE_FLAGS``
    alone where set, else :data:`_FLAG_SETS`."""
    flags = os.environ.get('MMGATED_NATIVE_FLAGS', '').strip()
    return (tuple(shlex.split(flags)), ) if flags else _FLAG_SETS


def c_compiler():
    """The C compiler that builds the operations: ``$CC``, else ``cc`` or
    ``gcc`` on the path; None if there is none."""
    return os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc')


def native_library():
    """The compiled library (``ctypes.CDLL``), building it on first use;
    None if it cannot be had (no compiler, ``MMGATED_NATIVE=0``)."""
    global _library
    if _library is not None:
        return _library or None
    _library = False
    if os.environ.get('MMGATED_NATIVE', '1') == '0':
        return None
    compiler = c_compiler()
    if compiler is None:
        warnings.warn('mmgated: no C compiler found; its compiled operations '
                      'run as PyTorch operations (slower)')
        return None
    sources = b''
    for path in _SOURCES:
        with open(path, 'rb') as f:
            sources += f.read()
    for flags in _flag_sets():
        key = hashlib.sha1(b'\0'.join([
            sources, ' '.join((compiler, ) + flags).encode(),
            _cpu_signature().encode()
        ])).hexdigest()[:16]
        target = osp.join(_cache_dir(), f'mmgated_ops-{key}.so')
        if osp.exists(target) or _compile(compiler, flags, target):
            try:
                _library = ctypes.CDLL(target)
            except OSError:
                continue
            _library.build_flags = flags
            return _library
    warnings.warn(f'mmgated: {compiler} could not compile {_SOURCES}; its '
                  'compiled operations run as PyTorch operations (slower)')
    return None


def native_build_flags():
    """The compiler flags of the loaded compiled library (building it if
    needed), or None without one: what a report on speed should name."""
    library = native_library()
    return None if library is None else library.build_flags


def native_function(name: str, argtypes, restype=None):
    """The compiled function ``name`` with its ctypes signature set, or
    None without the library."""
    library = native_library()
    if library is None:
        return None
    function = getattr(library, name)
    if function.argtypes is None:
        function.restype = restype
        function.argtypes = argtypes
    return function


def native_available() -> bool:
    """Whether the compiled operations can be used (building them if
    needed)."""
    return native_library() is not None


def check_tensor(op: str, name: str, tensor, dtype, dim: int) -> None:
    """Raise ``ValueError`` unless ``tensor`` is a contiguous ``dim``-d
    ``dtype`` CPU tensor, as the compiled operations read it."""
    if tensor.dtype != dtype or tensor.dim() != dim \
            or tensor.device.type != 'cpu' or not tensor.is_contiguous():
        raise ValueError(
            f'{op}: {name} must be a contiguous {dim}-d {dtype} CPU tensor, '
            f'got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device} '
            f'(contiguous: {tensor.is_contiguous()})')


def pointer(tensor):
    """The data pointer of ``tensor`` for a ctypes call (None for None)."""
    return None if tensor is None else tensor.data_ptr()
