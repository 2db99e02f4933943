"""Stop training on a batch with non-finite values."""
from typing import Optional, Sequence

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


def _tensors(inputs) -> Sequence[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, dict):
        inputs = list(inputs.values())
    if isinstance(inputs, (list, tuple)):
        return [t for item in inputs for t in _tensors(item)]
    return []


@HOOKS.register_module()
class FiniteInputsHook(Hook):
    """Raise before a training iteration whose input batch holds NaN or
    infinity, naming the iteration.

    A NaN image closes every gate it reaches, and its gradients turn the
    weights into NaN: the run would go on to the end, saving NaN
    checkpoints. The check reads the batch the dataloader made, before the
    data preprocessor moves it to the device, so it never waits for a GPU;
    integer images (the usual ``uint8``) cannot be non-finite and are not
    read at all.
    """

    priority = 'VERY_HIGH'

    def before_train_iter(self,
                          runner,
                          batch_idx: int,
                          data_batch: Optional[dict] = None) -> None:
        if not isinstance(data_batch, dict):
            return
        for tensor in _tensors(data_batch.get('inputs')):
            if tensor.is_floating_point() and not bool(
                    torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise FloatingPointError(
                    f'the input batch of training iteration {runner.iter + 1}'
                    f' (batch {batch_idx} of epoch {runner.epoch + 1}) holds '
                    f'{bad} non-finite values (NaN or infinity); check the '
                    'dataset and its pipeline')
