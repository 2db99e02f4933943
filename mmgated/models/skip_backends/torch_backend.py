"""Skip execution's reference backend: PyTorch operations, any device."""
import torch
import torch.nn.functional as F


class TorchSkipBackend:
    """Convolutions over open channels as a gather and ``F.conv2d``.

    The open filters and input channels of the folded weight are gathered
    with ``index_select``, then one ``F.conv2d`` runs: any device and
    dtype, autograd included. The other backends equal it up to floating
    point order.

    Skip execution hands every method a layer of its plan (see
    :class:`~mmgated.models.skip_execution.FoldedConv`): ``layer.conv``
    (the geometry), ``layer.weight_bias()`` (weight and bias with the BN
    folded in), ``layer.out_size`` and ``layer.route``, what :meth:`route`
    chose for it when the plan was made. A backend keeps no state.
    """

    name = 'torch'

    def route(self, layer, x: torch.Tensor):
        """How ``layer`` runs on inputs shaped like ``x`` (``(N, C, H, W)``;
        device, dtype and autograd mode as in the calls to come), fixed once
        per plan; here always the same way (None)."""
        return None

    def reads_in_place(self, layer, n: int) -> bool:
        """Whether ``layer`` on ``n`` samples reads the open part of its
        weight in place instead of gathering it (the plan's cost estimate
        counts a gather as one more pass of the weight)."""
        return False

    def conv(self,
             layer,
             x: torch.Tensor,
             in_idx=None,
             out_idx=None,
             relu: bool = False,
             residual=None) -> torch.Tensor:
        """``act(conv(x, W[out_idx][:, in_idx]) + b[out_idx] + residual)``.

        Args:
            layer (FoldedConv): The convolution, BN folded in.
            x (Tensor): ``(N, k, H, W)``, the input channels ``in_idx``.
            in_idx (Tensor, optional): ``(k, )`` int64 open input channels;
                ``None``: all.
            out_idx (Tensor, optional): ``(m, )`` int64 output channels to
                compute, at least one; ``None``: all.
            relu (bool): Apply a ReLU (after the residual).
            residual (Tensor, optional): Added before the ReLU (the block's
                shortcut); all output channels, so ``out_idx`` is None.

        Returns:
            Tensor: ``(N, m, H_out, W_out)``.
        """
        weight, bias = layer.weight_bias()
        if out_idx is not None:
            weight = weight.index_select(0, out_idx)
            bias = bias.index_select(0, out_idx)
        if in_idx is not None:
            weight = weight.index_select(1, in_idx)
        if x.shape[1] == 0:
            # All inputs closed: F.conv2d would return no channels; the
            # convolution of zeros is its bias (a copy: y changes in place).
            y = bias.view(1, -1, 1, 1).repeat((x.shape[0], 1) +
                                              layer.out_size)
        else:
            conv = layer.conv
            y = F.conv2d(x, weight, bias, conv.stride, conv.padding,
                         conv.dilation)
        if residual is not None:
            y += residual
        return y.relu_() if relu else y
