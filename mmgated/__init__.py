"""mmgated: batch-shaped channel gated networks for MMSegmentation and
MMPretrain.

Importing the package applies the compatibility shims of
:mod:`mmgated.compat` and registers every component into the registries of
the installed downstream packages, so a config only needs
``custom_imports = dict(imports=['mmgated'], allow_failed_imports=False)``.
"""
from .version import __version__
from . import compat

compat.apply_all()

from . import engine, evaluation, models  # noqa: E402,F401

__all__ = ['__version__', 'compat', 'engine', 'evaluation', 'models']
