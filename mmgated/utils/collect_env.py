"""Print what a bug report needs: versions, mmcv ops, mmgated's compiled
operations, CUDA, registries.

Usage: ``python -m mmgated.utils.collect_env``
"""
import importlib
import platform
import sys
from collections import OrderedDict

MODEL_NAMES = ('GatedResNet', 'GatedResNetV1c', 'GatedResNetCifar',
               'GatedEncoderDecoder', 'GatedImageClassifier',
               'BatchShapingLoss', 'GateL0Loss')
HOOK_NAMES = ('BatchShapingWeightHook', 'L0WeightHook')


def _version(module_name):
    try:
        return importlib.import_module(module_name).__version__
    except Exception as e:  # report, do not fail: this is a diagnostic tool
        return f'not available ({type(e).__name__}: {e})'


def collect_env() -> OrderedDict:
    """Collect the environment information.

    Returns:
        OrderedDict: Item name to a printable value.
    """
    env = OrderedDict()
    env['sys.platform'] = sys.platform
    env['Python'] = sys.version.replace('\n', '')
    env['machine'] = platform.machine()
    for name in ('torch', 'torchvision', 'numpy', 'cv2', 'mmengine', 'mmcv',
                 'mmseg', 'mmpretrain', 'mmgated'):
        env[name] = _version(name)
    try:
        import torch
        env['CUDA available'] = torch.cuda.is_available()
        env['torch CUDA build'] = torch.version.cuda
        if torch.cuda.is_available():
            env['GPU'] = ', '.join(
                torch.cuda.get_device_name(i)
                for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    try:
        from mmcv.ops import get_compiling_cuda_version
        env['mmcv ops'] = 'available'
        env['mmcv ops CUDA'] = get_compiling_cuda_version()
    except Exception as e:
        env['mmcv ops'] = f'not available ({type(e).__name__}: {e})'
    try:
        from mmgated.ops.native import native_build_flags
        flags = native_build_flags()
        env['mmgated skip-execution kernel'] = 'not available (PyTorch ' \
            'operations instead)' if flags is None else \
            f'available ({" ".join(flags)})'
    except Exception as e:
        env['mmgated skip-execution kernel'] = f'failed ({type(e).__name__}: {e})'
    try:
        import mmgated  # noqa: F401  registers the components
        from mmgated.registry import available_model_registries
        for scope, registry in available_model_registries().items():
            found = [n for n in MODEL_NAMES if n in registry.module_dict]
            env[f'{scope} MODELS (mmgated)'] = ', '.join(found) or 'none'
        from mmengine.registry import HOOKS
        env['mmengine HOOKS (mmgated)'] = ', '.join(
            n for n in HOOK_NAMES if n in HOOKS.module_dict) or 'none'
    except Exception as e:
        env['mmgated registries'] = f'failed ({type(e).__name__}: {e})'
    return env


def main():
    for name, value in collect_env().items():
        print(f'{name}: {value}')


if __name__ == '__main__':
    main()
