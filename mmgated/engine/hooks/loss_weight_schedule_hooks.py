"""Schedules of the gate-loss weights (paper sections 4.2, 4.3, 5)."""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ...utils.checks import check_weight


class LossWeightScheduleHook(Hook):
    """Set a gate loss's ``loss_weight`` before every training iteration.

    The weight is a pure function of the training progress ``t``: the
    iteration (``by_epoch=False``) or the epoch, counted fractionally as
    ``iter / iters_per_epoch`` (``by_epoch=True``), so a resumed run
    continues the schedule exactly. The current weight is logged as the
    scalar ``train/<scalar_name>``, which appears in the log and in
    ``vis_data/scalars.json``.

    Args:
        by_epoch (bool): Whether the points of the schedule are epochs.
    """

    priority = 'NORMAL'
    loss_attr = ''
    scalar_name = ''

    def __init__(self, by_epoch: bool = True):
        self.by_epoch = by_epoch

    def weight_at(self, t: float) -> float:
        raise NotImplementedError

    def progress(self, runner) -> float:
        if not self.by_epoch:
            return float(runner.iter)
        return runner.iter / len(runner.train_dataloader)

    def _loss(self, runner):
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        loss = getattr(model, self.loss_attr, None)
        if loss is None:
            raise RuntimeError(
                f'{type(self).__name__} schedules model.{self.loss_attr}, '
                f'which {type(model).__name__} does not have; use '
                'GatedEncoderDecoder or GatedImageClassifier with a '
                f'{self.loss_attr} config')
        return loss

    def before_train(self, runner) -> None:
        self._loss(runner)

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        weight = self.weight_at(self.progress(runner))
        loss = self._loss(runner)
        loss.loss_weight = weight
        runner.message_hub.update_scalar(f'train/{self.scalar_name}', weight)
        if weight == 0:
            # The model skips a zero-weight loss; without this the logger
            # would keep repeating its last value as if it were computed.
            runner.message_hub.log_scalars.pop(f'train/{loss.loss_name}',
                                               None)


@HOOKS.register_module()
class BatchShapingWeightHook(LossWeightScheduleHook):
    """Anneal the batch-shaping weight lambda linearly to 0, or hold it.

    ``lambda(t) = start_weight * max(0, 1 - t / end)``; with ``end=None`` the
    weight stays ``start_weight`` (the paper's Cityscapes recipe).
    Paper: 0.75 -> 0 by epoch 100 (CIFAR-10), by epoch 20 (ImageNet).

    Args:
        start_weight (float, optional): lambda_0. Default: None, the
            ``loss_weight`` configured in the model's ``batch_shaping_loss``,
            so that the config states lambda_0 once.
        end (float, optional): Epoch/iteration at which lambda reaches 0.
        by_epoch (bool): Whether ``end`` is in epochs. Default: True.
    """

    loss_attr = 'batch_shaping_loss'
    scalar_name = 'bs_weight'

    def __init__(self,
                 start_weight: Optional[float] = None,
                 end: Optional[float] = None,
                 by_epoch: bool = True):
        super().__init__(by_epoch)
        self.start_weight = None if start_weight is None else check_weight(
            'start_weight', start_weight)
        if end is not None:
            end = check_weight('end', end)
            if end == 0:
                raise ValueError('end must be > 0 (or None for a constant '
                                 'weight)')
        self.end = end

    def before_train(self, runner) -> None:
        loss = self._loss(runner)
        if self.start_weight is None:
            self.start_weight = check_weight('batch_shaping_loss.loss_weight',
                                             loss.loss_weight)

    def weight_at(self, t: float) -> float:
        if self.start_weight is None:
            raise RuntimeError('BatchShapingWeightHook.start_weight is not '
                               'set yet')
        if self.end is None:
            return self.start_weight
        return self.start_weight * max(0.0, 1.0 - t / self.end)


@HOOKS.register_module()
class L0WeightHook(LossWeightScheduleHook):
    """Deferred linear warm-up of the L0 weight gamma (Sønderby et al.).

    ``gamma(t)`` is 0 before ``start``, rises linearly to ``gamma`` at
    ``end`` and stays there. Paper: epochs 100 -> 300 (CIFAR-10), 30 -> 60
    (ImageNet).

    Args:
        start (float): Epoch/iteration at which the warm-up begins.
        end (float): Epoch/iteration at which gamma is reached; >= start.
        gamma (float, optional): The final weight. ``None`` (default) reads
            the top-level ``l0_gamma`` of the runner's config, so that a
            sweep needs only ``--cfg-options l0_gamma=0.1``.
        by_epoch (bool): Whether the points are epochs. Default: True.
    """

    loss_attr = 'l0_loss'
    scalar_name = 'l0_weight'

    def __init__(self,
                 start: float,
                 end: float,
                 gamma: Optional[float] = None,
                 by_epoch: bool = True):
        super().__init__(by_epoch)
        self.start = check_weight('start', start)
        self.end = check_weight('end', end)
        if self.end < self.start:
            raise ValueError(f'end={end} must not be before start={start}')
        self.gamma = None if gamma is None else check_weight('gamma', gamma)

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if self.gamma is None:
            gamma = runner.cfg.get('l0_gamma')
            if gamma is None:
                raise KeyError('L0WeightHook has no gamma: pass gamma= or '
                               'set a top-level l0_gamma in the config')
            self.gamma = check_weight('l0_gamma', gamma)

    def weight_at(self, t: float) -> float:
        if self.gamma is None:
            raise RuntimeError('L0WeightHook.gamma is not set yet')
        if t < self.start:
            return 0.0
        if t >= self.end:
            return self.gamma
        return self.gamma * (t - self.start) / (self.end - self.start)
