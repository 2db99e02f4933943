"""Registration into the registries of whichever downstream packages exist.

mmgated's components must be found from mmseg configs
(``default_scope='mmseg'``) and from mmpretrain configs
(``default_scope='mmpretrain'``); either package may be missing.
"""
import importlib
import importlib.util

DOWNSTREAM_SCOPES = ('mmseg', 'mmpretrain')


def available_registries(name: str = 'MODELS') -> dict:
    """The registries called ``name`` of the installed downstream packages.

    Args:
        name (str): ``'MODELS'``, ``'METRICS'``, ...

    Returns:
        dict: Scope name (``'mmseg'``, ``'mmpretrain'``) to its registry.
    """
    registries = {}
    for scope in DOWNSTREAM_SCOPES:
        if importlib.util.find_spec(scope) is not None:
            registries[scope] = getattr(
                importlib.import_module(f'{scope}.registry'), name)
    return registries


def available_model_registries() -> dict:
    """The ``MODELS`` registries of the installed downstream packages."""
    return available_registries('MODELS')


def register_downstream(registry_name: str):
    """Class decorator factory: register a class in the registry
    ``registry_name`` of every installed downstream package."""

    def register(cls):
        for registry in available_registries(registry_name).values():
            registry.register_module(module=cls)
        return cls

    return register


register_model = register_downstream('MODELS')
register_metric = register_downstream('METRICS')
