"""The training autograd nodes in C++ (``csrc/training_nodes.cpp``).

:mod:`mmgated.models.fused_gate` and :mod:`mmgated.models.gated_relu` hold
the gating module's, the gated ReLU's and the batch-norm gated ReLU's
training forward and backward as
Python autograd Functions. Their compiled kernels are quick, but in a
training step the Python around them is not: it runs between convolutions
that have evicted the interpreter from the caches, at some 15-30 µs an
operation, as long as the kernels themselves at the sizes of a ResNet.
The same nodes in C++ call the same kernels
(:mod:`mmgated.ops.gate_training`, bound by address) with no Python in the
backward pass and one call in the forward.

The extension is built with :func:`torch.utils.cpp_extension.load` on first
use, in about 40 seconds on 2 cores, and cached in
``$MMGATED_CACHE/nodes`` (default ``~/.cache/mmgated/nodes``), keyed by the
source, the versions of torch and Python and the machine type. It needs
what building any PyTorch extension needs (a C++20 compiler, ninja,
torch's headers) besides the compiled library; without them, or with
``MMGATED_NATIVE=0`` or ``MMGATED_CPP_NODES=0``, :func:`training_nodes` is
None and the Python Functions run, with the same results.
"""
import ctypes
import hashlib
import logging
import os
import os.path as osp
import platform
import shutil
import sys

import torch
from mmengine.logging import print_log

from . import native

_SOURCE = osp.join(osp.dirname(__file__), 'csrc', 'training_nodes.cpp')
# The kernels bound into the extension, in bind_kernels' order.
_KERNELS = ('gate_train_workspace_size', 'gate_train_forward',
            'gate_train_backward', 'gated_relu_forward',
            'gated_relu_backward', 'bn_gated_relu_forward',
            'bn_gated_relu_backward')
_extension = None  # the loaded module, False after a failed build


def _build_dir() -> str:
    # An extension module is built for one Python, one torch and one
    # machine type.
    with open(_SOURCE, 'rb') as f:
        key = hashlib.sha1(b'\0'.join([
            f.read(), torch.__version__.encode(),
            sys.version.split()[0].encode(),
            platform.machine().encode()
        ]))
    return osp.join(native.cache_root(), 'nodes', key.hexdigest()[:16])


def _first_error(message: str) -> str:
    """The compiler's first error in a build's ``message``, else the
    message's end."""
    for line in message.splitlines():
        if 'error:' in line:
            return line.strip()
    return message[-300:].strip()


def _load():
    """Build (or find in the cache) and load the extension; None where it
    cannot be built."""
    build_dir = _build_dir()
    if not osp.exists(osp.join(build_dir, 'mmgated_training_nodes.so')):
        print_log('mmgated: building the C++ training nodes (once, under a '
                  f'minute) in {build_dir}', logger='current')
    # cpp_extension warns on import where there is no CUDA, which a CPU
    # extension does not need.
    cuda_logger = logging.getLogger('torch.utils.cpp_extension')
    level = cuda_logger.level
    cuda_logger.setLevel(logging.ERROR)
    path = os.environ.get('PATH')
    # cpp_extension runs the ninja that PATH names. pip installs ninja
    # beside the interpreter, which is not on PATH where a virtual
    # environment's python runs without being activated (as the README's
    # commands run it).
    bin_dir = osp.dirname(sys.executable)
    if shutil.which('ninja') is None and shutil.which('ninja', path=bin_dir):
        os.environ['PATH'] = os.pathsep.join(p for p in (bin_dir, path) if p)
    try:
        from torch.utils import cpp_extension
        os.makedirs(build_dir, exist_ok=True)
        return cpp_extension.load(
            'mmgated_training_nodes', [_SOURCE],
            extra_cflags=['-O2'],
            build_directory=build_dir,
            with_cuda=False,
            verbose=False)
    except Exception as error:  # a failed build raises many kinds
        print_log(f'mmgated: the C++ training nodes could not be built in '
                  f'{build_dir} ({type(error).__name__}: '
                  f'{_first_error(str(error))}); the Python autograd '
                  'Functions run instead (slower)',
                  logger='current', level=logging.WARNING)
        return None
    finally:
        cuda_logger.setLevel(level)
        if path is None:
            os.environ.pop('PATH', None)
        else:
            os.environ['PATH'] = path


def training_nodes():
    """The C++ training nodes, bound to the compiled library's kernels and
    built on first use; None where they cannot be had.

    Returns:
        module | None: With ``training_gate(x, noise, fc1_weight,
        norm_weight, norm_bias, fc2_weight, fc2_bias, running_mean,
        running_var, num_batches_tracked, momentum, eps, tau)`` (the
        norm's own buffers and momentum; the noise drawn where it is None,
        the counter advanced), ``gated_relu(x, gates)`` and
        ``batch_norm_gated_relu(x, gates, weight, bias, running_mean,
        running_var, num_batches_tracked, momentum, eps)`` (a batch norm's
        own parameters, buffers and momentum; the counter advanced), each
        returning
        None, having done nothing, where the kernels do not read the given
        tensors or the module-by-module path must run.
    """
    global _extension
    library = native.native_library()
    if library is None:  # no kernels (or off): no nodes
        return None
    if _extension is not None:
        return _extension or None
    _extension = False
    if os.environ.get('MMGATED_CPP_NODES', '1') == '0':
        return None
    module = _load()
    if module is None:
        return None
    module.bind_kernels(*(ctypes.cast(getattr(library, name),
                                      ctypes.c_void_p).value
                          for name in _KERNELS))
    _extension = module
    return module
