from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.registry import MODELS

from ..gate_loss_mixin import GateLossMixin


@MODELS.register_module()
class GatedImageClassifier(GateLossMixin, ImageClassifier):
    """mmpretrain ``ImageClassifier`` with a gated backbone and the gate
    losses.

    ``loss()`` returns the parent's losses plus ``loss_bs``, ``loss_l0``
    (each only while its weight is not 0) and ``gate_open_rate``.

    Args:
        batch_shaping_loss (dict, optional): See :class:`GateLossMixin`.
        l0_loss (dict, optional): See :class:`GateLossMixin`.
        shaped_quantity (str): See :class:`GateLossMixin`.
        **kwargs: The arguments of mmpretrain's ``ImageClassifier``.
    """

    models_registry = MODELS
