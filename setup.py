from setuptools import find_packages, setup


def read_version():
    namespace = {}
    with open('mmgated/version.py') as f:
        exec(f.read(), namespace)
    return namespace['__version__']


setup(
    name='mmgated',
    version=read_version(),
    description='Batch-shaped channel gated networks for MMSegmentation '
    'and MMPretrain',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    license='Apache License 2.0',
    packages=find_packages(exclude=('tests', 'configs', 'tools')),
    # The skip-execution CPU kernel, compiled on first use
    # (mmgated/ops/native.py).
    package_data={'mmgated.ops': ['csrc/*.c']},
    python_requires='>=3.8',
    # The ranges below are those tested together (docs/install.md). mmcv must
    # be a build with its compiled ops (tools/setup_env.sh makes one).
    install_requires=[
        'torch>=2.0',
        'torchvision',
        'mmengine>=0.10.0,<1.0.0',
        'mmcv>=2.0.0rc4,<2.2.0',
        'mmsegmentation>=1.2.0,<1.3.0',
        'mmpretrain>=1.2.0,<1.3.0',
        'numpy',
        'opencv-python',
        'scipy',
        'matplotlib',
        # mmseg 1.2.2 imports these without declaring them.
        'ftfy',
        'regex',
    ],
    extras_require={
        'tests': [
            'pytest', 'pytest-timeout', 'pytest-xdist', 'scikit-learn',
            'onnx', 'onnxruntime', 'onnxscript'
        ],
        # tools/deploy/export_onnx.py: torch.onnx's exporter and the check.
        'deploy': ['onnx', 'onnxruntime', 'onnxscript'],
        'data': ['cityscapesscripts'],
    },
    zip_safe=False,
)
