"""The batch-shaping loss (paper section 3, Eq. 2)."""
from typing import Optional, Sequence

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.logging import print_log

from ...registry import register_model
from ...utils.checks import check_weight
from .priors import build_prior


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over the ranks of the default process group.

    The other ranks' parts carry no gradient; the local part keeps its own,
    in its rank's position. Ranks may hold different batch sizes. Returns
    ``x`` itself when not distributed.
    """
    if not (dist.is_available() and dist.is_initialized()) \
            or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(sizes), ) + x.shape[1:])
    padded[:x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:n] for p, n in zip(parts, sizes)]
    parts[rank] = x
    return torch.cat(parts, dim=0)


def cramer_von_mises(x: torch.Tensor, prior) -> torch.Tensor:
    """Eq. (2) with lambda = 1 for each column of ``x``.

    Args:
        x (Tensor): ``(N, C)``: N samples of C features.
        prior (Prior): The prior whose CDF ``F`` the features are matched to.

    Returns:
        Tensor: ``(C, )``: ``1/N sum_i (i / (N + 1) - F(x*_i))^2`` per column,
        with ``x*`` the column sorted. The gradient reaches each value where
        it came from through the sort.
    """
    n = x.shape[0]
    x_sorted = torch.sort(x, dim=0).values
    target = torch.arange(1, n + 1, device=x.device, dtype=x.dtype) / (n + 1)
    return (target[:, None] - prior(x_sorted)).square().mean(dim=0)


@register_model
class BatchShapingLoss(nn.Module):
    """Match the batch distribution of each feature to a prior CDF.

    For an input of shape ``(N, C)`` (``N`` samples of ``C`` features) the
    loss is ``loss_weight`` times the sum over the ``C`` features of Eq. (2)
    of the paper with lambda = 1::

        (1 / N) * sum_i (i / (N + 1) - F(x*_i)) ** 2

    where ``x*`` are the feature's values sorted over the batch and ``F`` is
    the prior's CDF. Summing is what the paper does ("We can sum this loss
    for each considered feature"): each gate is shaped with the full weight
    lambda, whatever the number of gates, the scale the paper's lambda
    values (0.75, 0.2, 0.05) are meant for. ``reduction='mean'`` averages
    over the features instead. Gradients flow back through the sort to the
    positions the values came from. Values outside the prior's support are
    clamped to it (and then get no gradient from the loss).

    Batch-shaping applies to any feature: flatten it to ``(N, C)``, e.g.
    ``loss(features.mean(dim=(2, 3)))`` for channel activations with a
    ``gaussian`` prior, or ``loss(x.flatten(1))`` per unit.

    Under DDP (``gather=True``) the loss sees the whole global batch: the
    inputs of all ranks are gathered, and each rank's gradient reaches its
    own part. Since DDP averages gradients over ranks, the gradient is
    multiplied by the world size (the loss value is not), so that the
    averaged gradient is that of the global-batch loss.

    A batch needs at least 2 samples to have a distribution: one of 1 sample
    gives a loss of 0 (with a warning, logged once), an empty one an error.

    Args:
        prior (dict | Prior): The prior: ``dict(type='beta', a, b)``,
            ``dict(type='gaussian', mean, std)``, ``dict(type='uniform', low,
            high)`` or a type registered in
            :data:`mmgated.models.losses.PRIORS`. Default: Beta(0.6, 0.4).
        loss_weight (float): lambda of Eq. (2), finite and >= 0. Default:
            1.0.
        reduction (str): 'sum' (default, as Eq. 2's text) or 'mean' over
            the features.
        gather (bool): Gather the batch over ranks under DDP. Default: True.
        check_finite (bool): Raise on non-finite inputs, naming the feature.
            Off by default because the check synchronises with the host.
        loss_name (str): Key of the loss in a loss dict. Default: 'loss_bs'.
    """

    def __init__(self,
                 prior=dict(type='beta', a=0.6, b=0.4),
                 loss_weight: float = 1.0,
                 reduction: str = 'sum',
                 gather: bool = True,
                 check_finite: bool = False,
                 loss_name: str = 'loss_bs'):
        super().__init__()
        if reduction not in ('mean', 'sum'):
            raise ValueError(f'reduction {reduction!r} is not one of '
                             "('mean', 'sum')")
        self.prior = build_prior(prior)
        self.reduction = reduction
        self.loss_weight = check_weight('BatchShapingLoss loss_weight',
                                        loss_weight)
        self.gather = gather
        self.check_finite = check_finite
        self._loss_name = loss_name
        self._warned_single_sample = False

    @property
    def loss_name(self) -> str:
        return self._loss_name

    def forward(self,
                x: torch.Tensor,
                feature_names: Optional[Sequence[str]] = None
                ) -> torch.Tensor:
        """Compute the loss.

        Args:
            x (Tensor): ``(N, C)`` features of N samples.
            feature_names (Sequence[str], optional): A name per column, used
                in the error of ``check_finite``.

        Returns:
            Tensor: The scalar loss (float32, or float64 for float64 input).
        """
        if x.dim() != 2 or x.shape[1] == 0:
            raise ValueError('BatchShapingLoss expects a (N, C) tensor with '
                             f'C >= 1 features, got shape {tuple(x.shape)}')
        if self.check_finite:
            finite = torch.isfinite(x).all(dim=0)
            if not bool(finite.all()):
                bad = torch.nonzero(~finite).flatten().tolist()
                names = [feature_names[i] for i in bad] if feature_names \
                    else [f'feature {i}' for i in bad]
                raise ValueError(f'BatchShapingLoss got non-finite values in '
                                 f'{names}')
        with torch.autocast(device_type=x.device.type, enabled=False):
            # float16/bfloat16 are computed in float32; float64 stays.
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            world = 1
            if self.gather:
                gathered = gather_batch(x)
                if gathered is not x:
                    world = dist.get_world_size()
                x = gathered
            if x.shape[0] < 2:
                return self._too_few_samples(x)
            per_feature = cramer_von_mises(x, self.prior)
            loss = per_feature.sum() if self.reduction == 'sum' \
                else per_feature.mean()
            if world > 1:
                loss = loss + (world - 1) * (loss - loss.detach())
        return self.loss_weight * loss

    def _too_few_samples(self, x: torch.Tensor) -> torch.Tensor:
        """N = 0 is an error; N = 1 has no distribution to shape: warn once
        and return 0, still connected to ``x`` so that every parameter
        takes part in the backward pass (as DDP requires)."""
        if x.shape[0] == 0:
            raise ValueError('BatchShapingLoss got an empty batch (0 samples '
                             f'of {x.shape[1]} features); it needs N >= 2')
        if not self._warned_single_sample:
            self._warned_single_sample = True
            print_log(
                'BatchShapingLoss got a batch of 1 sample, which has no '
                'distribution to match to the prior: the loss is 0 for such '
                'batches (this is logged once)',
                logger='current', level=logging.WARNING)
        return x.sum() * 0.0
