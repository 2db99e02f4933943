from .batch_shaping_loss import BatchShapingLoss, gather_batch
from .l0_loss import GateL0Loss
from .priors import (PRIORS, BetaPrior, GaussianPrior, Prior, UniformPrior,
                     build_prior)

__all__ = [
    'BatchShapingLoss', 'GateL0Loss', 'PRIORS', 'Prior', 'BetaPrior',
    'GaussianPrior', 'UniformPrior', 'build_prior', 'gather_batch'
]
