"""The L0 complexity loss on gates (paper section 4.3, Eq. 5)."""
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ...registry import register_model
from ...utils.checks import check_weight


@register_model
class GateL0Loss(nn.Module):
    """``gamma * sum_i sigmoid(ln pi_i)`` over the gates (Eq. 5).

    Normalisation: Eq. (5) sums over the ``k`` gates of the network. With
    ``reduction='sum'`` (default) the loss is that sum for each sample,
    averaged over the ``N`` samples of the batch (as the task loss is):
    Eq. (5) to the letter, and the scale the paper's gamma values (1e-2 to
    4e-1) are meant for, since each gate's logit then feels ``gamma`` itself.
    ``reduction='mean'`` also divides by ``k``: ``gamma`` times the expected
    fraction of open gates, independent of the model's size.

    With ``weighting='macs'`` each gate is weighted by the MACs it controls
    (the filter it switches and the input channel of the next convolution it
    removes, at the block's resolution), normalised to weights that average
    to 1; the 'mean' loss is then ``gamma`` times the expected fraction of
    the gated MACs that run, so gamma acts on compute directly (with 'sum',
    ``k`` times that).

    Args:
        loss_weight (float): gamma, finite and >= 0. Default: 1.0.
        reduction (str): 'sum' or 'mean' over the gates. Default: 'sum'.
        weighting (str): 'uniform' or 'macs'. Default: 'uniform'.
        loss_name (str): Key of the loss in a loss dict. Default: 'loss_l0'.
    """

    def __init__(self,
                 loss_weight: float = 1.0,
                 reduction: str = 'sum',
                 weighting: str = 'uniform',
                 loss_name: str = 'loss_l0'):
        super().__init__()
        if reduction not in ('mean', 'sum'):
            raise ValueError(f'reduction {reduction!r} is not one of '
                             "('mean', 'sum')")
        if weighting not in ('uniform', 'macs'):
            raise ValueError(f'weighting {weighting!r} is not one of '
                             "('uniform', 'macs')")
        self.loss_weight = check_weight('GateL0Loss loss_weight', loss_weight)
        self.reduction = reduction
        self.weighting = weighting
        self._loss_name = loss_name

    @property
    def loss_name(self) -> str:
        return self._loss_name

    def forward(self,
                probs: Sequence[torch.Tensor],
                macs: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Compute the loss.

        Args:
            probs (Sequence[Tensor]): Per gated layer, the ``(N, C_j)`` gate
                probabilities ``sigmoid(logits)``.
            macs (Sequence[float], optional): Per gated layer, the MACs one
                of its channels controls. Required for ``weighting='macs'``.

        Returns:
            Tensor: The scalar loss.
        """
        if len(probs) == 0:
            raise ValueError('GateL0Loss got no gates')
        if self.weighting == 'macs':
            if macs is None or len(macs) != len(probs):
                raise ValueError("weighting='macs' needs one MAC figure per "
                                 f'gated layer; got {macs!r} for '
                                 f'{len(probs)} layers')
            weights = [float(m) for m in macs]
        else:
            weights = [1.0] * len(probs)
        counts = [p.shape[1] for p in probs]
        num_gates = sum(counts)
        mean_weight = sum(w * c for w, c in zip(weights, counts)) / num_gates
        # One (N, K) product over all gates instead of a few operations per
        # layer: the loss runs every training step.
        stacked = torch.cat(probs, dim=1)
        stacked = stacked.to(torch.promote_types(stacked.dtype,
                                                 torch.float32))
        if all(w == weights[0] for w in weights):
            total = stacked.sum(dim=1)
        else:
            total = stacked @ self._per_gate_weights(
                weights, counts, mean_weight, stacked)
        per_sample = total if self.reduction == 'sum' else total / num_gates
        return self.loss_weight * per_sample.mean()

    def _per_gate_weights(self, weights, counts, mean_weight, like):
        """The ``(K,)`` weight of each gate relative to the mean, cached
        while the layers' MACs and widths stay (as they do from one
        training step to the next)."""
        key = (tuple(weights), tuple(counts), like.dtype, like.device)
        cached = self.__dict__.get('_weights_cache')
        if cached is None or cached[0] != key:
            per_gate = torch.repeat_interleave(
                torch.tensor([w / mean_weight for w in weights],
                             dtype=like.dtype),
                torch.tensor(counts)).to(like.device)
            cached = self.__dict__['_weights_cache'] = (key, per_gate)
        return cached[1]
