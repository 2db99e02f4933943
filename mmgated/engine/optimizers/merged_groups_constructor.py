"""An optimizer wrapper constructor whose parameter groups are few.

With a ``paramwise_cfg`` (the gated recipes set one, for the gating modules'
weight decay), mmengine's ``DefaultOptimWrapperConstructor`` gives every
parameter a group of its own: 190 groups for a gated ResNet-34. The
optimizer then runs its update once per group: on the CPU the Python of its
update once more per parameter (about 4 ms more per SGD step of a gated
ResNet-34, 2 threads; ``docs/benchmarks.md``), on the GPU without its
multi-tensor kernels, since ``foreach`` batches only the tensors of one
group. This constructor builds the same groups and merges those whose
settings are equal, so the gated recipes step in two groups: the gating
modules' and the others'.
"""
from typing import List, Optional, Union

from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn


def merge_param_groups(groups: List[dict]) -> List[dict]:
    """Merge the parameter groups whose settings are equal.

    Args:
        groups (list[dict]): Parameter groups as torch optimizers take them:
            a ``'params'`` list and the group's settings (``lr``,
            ``weight_decay``, ...).

    Returns:
        list[dict]: One group per distinct set of settings (every key but
        ``'params'``, compared with ``==``), in the order of their first
        appearance, each with the parameters of its groups in their order.
    """
    merged: List[dict] = []
    seen: List[dict] = []  # the settings of merged[i]
    for group in groups:
        settings = {k: v for k, v in group.items() if k != 'params'}
        if settings in seen:
            merged[seen.index(settings)]['params'].extend(group['params'])
        else:
            seen.append(settings)
            merged.append(dict(settings, params=list(group['params'])))
    return merged


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MergedGroupsOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor with its parameter groups merged.

    Every parameter gets the settings that
    :class:`~mmengine.optim.DefaultOptimWrapperConstructor` gives it
    (``custom_keys``, ``norm_decay_mult``, ``bias_lr_mult``, ...); the
    groups with equal settings are then merged (:func:`merge_param_groups`),
    so that the optimizer's step costs per group rather than per parameter.
    The updates are the same; an optimizer state saved with the default
    constructor's groups does not load into these (torch matches the saved
    state group by group).

    Select it in the ``optim_wrapper`` of a config::

        optim_wrapper = dict(
            constructor='MergedGroupsOptimWrapperConstructor',
            paramwise_cfg=dict(custom_keys={'.gate': dict(decay_mult=0.0)}))

    Args: as :class:`~mmengine.optim.DefaultOptimWrapperConstructor`.
    """

    def __call__(self, model: nn.Module) -> OptimWrapper:
        """Build the optimizer wrapper, its parameter groups plain dicts.

        From a config, the default constructor hands the groups to the
        optimizer inside a ``ConfigDict``, which turns each into a
        ``ConfigDict``; ``torch.compile`` cannot trace an optimizer step
        over those (mmengine's ``compile=True`` compiles the whole
        ``train_step``, the step included).
        """
        optim_wrapper = super().__call__(model)
        groups = optim_wrapper.optimizer.param_groups
        groups[:] = [dict(group) for group in groups]
        return optim_wrapper

    def add_params(self,
                   params: List[dict],
                   module: nn.Module,
                   prefix: str = '',
                   is_dcn_module: Optional[Union[int, float]] = None) -> None:
        """Add the parameters of ``module`` to ``params`` as merged groups.

        The default constructor recurses through this method; the groups
        are merged once, when the call for the whole model (``prefix ''``)
        has collected them.
        """
        if prefix:
            super().add_params(params, module, prefix, is_dcn_module)
            return
        per_parameter: List[dict] = []
        super().add_params(per_parameter, module, prefix, is_dcn_module)
        params.extend(merge_param_groups(per_parameter))
