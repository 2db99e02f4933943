"""The channel gate of a residual block and the functions that read and steer
all gates of a model.

A :class:`ChannelGate` is the gating module of the paper (section 4.1): global
average pooling of the block input, ``FC(c_in -> 16)``, BN, ReLU,
``FC(16 -> c)`` giving one logit per gated channel, followed by a Binary
Concrete gate (hard decision forward, ``sigmoid((logit + noise) / tau)``
backward).

Every forward pass stores the batch's :class:`GateOutput` on the gate module
(overwriting the previous batch, so nothing accumulates); :func:`collect_gates`
returns them for a whole model, keyed by module name. Losses, metrics and
analysis read gates only through it.
"""
from collections import OrderedDict
from numbers import Real
from typing import Dict, Iterable, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule, is_model_wrapper

from ..utils.checks import check_number
from .folding import cached_fold_bn, is_foldable_bn

GATE_CFG_DEFAULTS = dict(
    hidden_channels=16,
    tau=2 / 3,
    init_bias=3.0,
    position='after_conv2',
    stages=None,
    execution='mask',
)
GATE_POSITIONS = ('after_conv1', 'after_conv2', 'both')
GATE_EXECUTIONS = ('mask', 'skip')


class GateOutput(NamedTuple):
    """What one gate computed for the last batch.

    Attributes:
        logits (Tensor): ``(N, C)`` unnormalised log-probabilities ``ln(pi)``.
        probs (Tensor): ``(N, C)`` ``sigmoid(logits)``, the probability that a
            gate is open; Eq. (5) sums these.
        relaxed (Tensor): ``(N, C)`` the Binary Concrete relaxation
            ``sigmoid((logits + noise) / tau)`` (no noise in eval mode).
        gates (Tensor): ``(N, C)`` the hard 0/1 decisions the block applied;
            in training they carry the straight-through gradient of
            ``relaxed``.
        input_size (tuple[int, int]): Spatial size ``(H, W)`` of the block
            input the gate saw, from which the analysis derives the size of
            every gated map.
    """
    logits: torch.Tensor
    probs: torch.Tensor
    relaxed: torch.Tensor
    gates: torch.Tensor
    input_size: Tuple[int, int]


def parse_gate_cfg(gate_cfg: Optional[dict]) -> dict:
    """Complete a ``gate_cfg`` with defaults and validate it.

    Args:
        gate_cfg (dict, optional): Any of ``hidden_channels`` (int >= 1,
            default 16), ``tau`` (finite, > 0, default 2/3), ``init_bias``
            (finite initial logit, default 3.0, i.e. about 95 % of the gates
            open), ``position`` (Bottleneck only: one of ``'after_conv1'``,
            ``'after_conv2'`` (default), ``'both'``), ``stages`` (a list of
            the indices of the stages whose blocks are gated; ``None`` gates
            all) and ``execution`` (``'mask'`` or ``'skip'``).

    Returns:
        dict: The complete configuration.

    Raises:
        KeyError: An unknown key.
        ValueError: A value out of its allowed range.
    """
    gate_cfg = dict(gate_cfg or {})
    unknown = set(gate_cfg) - set(GATE_CFG_DEFAULTS)
    if unknown:
        raise KeyError(f'unknown gate_cfg keys {sorted(unknown)}; allowed '
                       f'keys are {sorted(GATE_CFG_DEFAULTS)}')
    cfg = {**GATE_CFG_DEFAULTS, **gate_cfg}
    hidden = cfg['hidden_channels']
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError('gate_cfg hidden_channels must be an integer >= 1, '
                         f'got {hidden!r}')
    check_number('gate_cfg tau', cfg['tau'], 'a finite number > 0',
                 lambda v: v > 0)
    check_number('gate_cfg init_bias', cfg['init_bias'])
    if cfg['position'] not in GATE_POSITIONS:
        raise ValueError(f'gate_cfg position {cfg["position"]!r} does not '
                         f'exist; allowed positions are {GATE_POSITIONS}')
    if cfg['execution'] not in GATE_EXECUTIONS:
        raise ValueError(f'gate_cfg execution {cfg["execution"]!r} is not '
                         f'one of {GATE_EXECUTIONS}')
    if cfg['stages'] is not None:
        if not isinstance(cfg['stages'], (list, tuple)):
            raise ValueError('gate_cfg stages must be None or a list of '
                             f'stage indices, got {cfg["stages"]!r}')
        cfg['stages'] = tuple(cfg['stages'])
    return cfg


def check_gated_stages(stages, num_stages: int) -> None:
    """Raise ``ValueError`` if ``stages`` names a stage a backbone lacks."""
    if stages is None:
        return
    bad = [s for s in stages
           if isinstance(s, bool) or not isinstance(s, int)
           or not 0 <= s < num_stages]
    if bad:
        raise ValueError(f'gate_cfg stages {bad} out of range; this backbone '
                         f'has stages 0..{num_stages - 1}')


def logistic_noise(like: torch.Tensor) -> torch.Tensor:
    """Logistic(0, 1) noise ``log(u) - log(1 - u)``, shaped like ``like``."""
    # u kept in [1e-6, 1 - 1e-6] so that the noise stays finite.
    return torch.rand_like(like).logit_(eps=1e-6)


def binary_concrete(logits: torch.Tensor,
                    tau: float,
                    noise: Optional[torch.Tensor] = None):
    """Hard Binary Concrete sample with the relaxed gradient.

    The forward value is the hard decision ``logits + noise > 0`` (the
    binary Gumbel-max trick); the gradient is that of the relaxed sample
    ``sigmoid((logits + noise) / tau)`` (straight-through estimator).

    Args:
        logits (Tensor): Gate logits ``ln(pi)``.
        tau (float): Temperature of the relaxation.
        noise (Tensor, optional): Logistic noise; drawn when not given. No
            gradient flows to it.

    Returns:
        tuple[Tensor, Tensor]: The hard gates (exactly 0 or 1 in value) and
        the relaxed sample.
    """
    if noise is None:
        noise = logistic_noise(logits)
    noisy = logits + noise.detach()
    relaxed = torch.sigmoid(noisy / tau)
    hard = (noisy > 0).to(logits.dtype)
    # relaxed - relaxed.detach() is exactly 0: the value stays hard.
    return hard + (relaxed - relaxed.detach()), relaxed


class ChannelGate(BaseModule):
    """Gating module with Binary Concrete gates (paper section 4.1).

    Args:
        in_channels (int): Channels of the block input that is pooled.
        out_channels (int): Number of gated channels, one gate each.
        hidden_channels (int): Width of the hidden FC layer. Default: 16.
        tau (float): Temperature of the relaxation used in the backward pass.
            Default: 2/3 (Maddison et al.).
        init_bias (float): Initial bias of the output layer. The output
            weights start near zero, so every gate starts with logit
            ``init_bias``: 3.0 opens a gate with probability
            ``sigmoid(3) = 0.95`` under the logistic noise, so training starts
            from (almost) the dense network. Default: 3.0.
        norm_cfg (dict): Norm layer of the hidden layer; the block's, so a
            SyncBN backbone gets a SyncBN gate. Default: ``dict(type='BN')``.
        init_cfg (dict, optional): Initialisation config. Default: None.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 hidden_channels: int = 16,
                 tau: float = 2 / 3,
                 init_bias: float = 3.0,
                 norm_cfg: dict = dict(type='BN'),
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg)
        parse_gate_cfg(
            dict(hidden_channels=hidden_channels, tau=tau,
                 init_bias=init_bias))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.tau = float(tau)
        self.fc1 = nn.Linear(in_channels, hidden_channels, bias=False)
        self.norm = build_norm_layer(norm_cfg, hidden_channels)[1]
        self.fc2 = nn.Linear(hidden_channels, out_channels)
        # Set here rather than in init_weights so that the gates also start
        # open when a dense checkpoint is loaded, which leaves them untouched.
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.constant_(self.fc2.bias, float(init_bias))
        self.output: Optional[GateOutput] = None
        self.forced: Union[None, bool, float] = None
        self.force_generator: Optional[torch.Generator] = None

    def forward(self,
                x: torch.Tensor,
                fold_norm: bool = False) -> torch.Tensor:
        """Compute the gates of a batch.

        Args:
            x (Tensor): Block input of shape ``(N, C_in, H, W)``.
            fold_norm (bool): Fold the BN into fc1 (in eval mode without
                autograd; else ignored). Skip execution, which folds every
                BN of a block, asks for it; mask execution computes the
                module as built, as the MAC analysis counts it.
                Default: False.

        Returns:
            Tensor: Gates of shape ``(N, out_channels)``, 0 or 1 in value; in
            training differentiable through the straight-through Binary
            Concrete estimator.
        """
        pooled = x.mean(dim=(2, 3))
        if fold_norm and self._norm_foldable():
            hidden = self._folded_fc1(pooled)
        else:
            hidden = self._normalize(self.fc1(pooled))
        logits = self.fc2(F.relu(hidden))
        if self.training:
            gates, relaxed = binary_concrete(logits, self.tau)
        else:
            relaxed = torch.sigmoid(logits / self.tau)
            gates = (logits > 0).to(logits.dtype)
        if self.forced is not None:
            gates = self._forced_gates(logits)
        self.output = GateOutput(logits, torch.sigmoid(logits), relaxed,
                                 gates, tuple(x.shape[2:]))
        return gates

    def _norm_foldable(self) -> bool:
        """Whether the BN can be folded into fc1: eval mode, running
        statistics and no autograd (the folded copy is built without)."""
        norm = self.norm
        return (not self.training and not norm.training
                and not torch.is_grad_enabled() and is_foldable_bn(norm))

    def _folded_fc1(self, pooled: torch.Tensor) -> torch.Tensor:
        """``norm(fc1(pooled))`` as one product (the norm call costs about
        as much as the rest of the gate at batch 1), with the folded weight
        cached until a weight or statistic changes."""
        weight, bias = cached_fold_bn(self.fc1, self.norm, '_folded_norm')
        return torch.addmm(bias, pooled, weight.t())

    def _normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden layer's norm, on ``(N, C)`` as an ``(N, C, 1, 1)``
        map (the block's norm_cfg builds 2-d norms)."""
        norm = self.norm
        hidden = hidden[:, :, None, None]
        synchronised = isinstance(norm, nn.SyncBatchNorm) and (
            dist.is_available() and dist.is_initialized())
        if (self.training and hidden.shape[0] == 1 and not synchronised
                and isinstance(norm, nn.modules.batchnorm._BatchNorm)):
            # One sample has no batch variance: normalise it with the running
            # statistics instead of failing, so batch size 1 trains.
            hidden = F.batch_norm(hidden, norm.running_mean, norm.running_var,
                                  norm.weight, norm.bias, False, 0.0, norm.eps)
        else:
            hidden = norm(hidden)
        return hidden.flatten(1)

    def _forced_gates(self, logits: torch.Tensor) -> torch.Tensor:
        if self.forced is True:
            return torch.ones_like(logits)
        if self.forced is False:
            return torch.zeros_like(logits)
        generator = self.force_generator
        draw = torch.rand(
            logits.shape, generator=generator,
            device=logits.device if generator is None else generator.device)
        return (draw < self.forced).to(logits)

    def extra_repr(self) -> str:
        return f'tau={self.tau:.4g}'


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def gate_modules(model: nn.Module) -> Dict[str, ChannelGate]:
    """All :class:`ChannelGate` modules of a model, by module name.

    Model wrappers (DDP, mmengine's wrappers) are looked through, so the
    names are the same on one process and under DDP.
    """
    return OrderedDict((name, m)
                       for name, m in _unwrap(model).named_modules()
                       if isinstance(m, ChannelGate))


def collect_gates(model: nn.Module) -> Dict[str, GateOutput]:
    """The gates of the last forward pass of every gated block.

    This is the one API for losses, metrics and analysis to read gates. Each
    gate module keeps only its last batch, so memory does not grow across
    iterations, and under ``torch.no_grad()`` the stored tensors hold no
    graph. Under DDP each process sees its own (local) batch.

    Args:
        model (nn.Module): A model containing gated blocks, possibly wrapped.

    Returns:
        OrderedDict[str, GateOutput]: Module name of each gate (for example
        ``'backbone.layer1.0.gate'``) to its :class:`GateOutput`; gates that
        did not run since the last :func:`clear_gates` are left out.
    """
    return OrderedDict((name, m.output)
                       for name, m in gate_modules(model).items()
                       if m.output is not None)


def clear_gates(model: Union[nn.Module, Iterable[ChannelGate]]) -> None:
    """Drop the stored gate outputs (and the graph they hold) of a model,
    or of the given :class:`ChannelGate` modules."""
    gates = (gate_modules(model).values()
             if isinstance(model, nn.Module) else model)
    for m in gates:
        m.output = None


class force_gates:
    """Override the learned gates of a model.

    Works as a plain call, which stays in effect until changed, and as a
    context manager, which restores the previous state on exit::

        force_gates(model, True)          # every gate open: the dense network
        with force_gates(model, 0.5, seed=0):
            model(x)                      # each gate open with p = 0.5
        force_gates(model, None)          # back to the learned gates

    Args:
        model (nn.Module): The model whose gates are forced.
        value (bool | float | None): ``True`` opens all gates, ``False``
            closes them, a number ``p`` in [0, 1] opens each gate with
            probability ``p`` independently per sample and channel, and
            ``None`` restores the learned gates. The gating modules still run,
            so :func:`collect_gates` reports the forced decisions next to the
            learned logits.
        seed (int, optional): Seed for the random draws of a float ``value``,
            for reproducible patterns. Default: None (global RNG).
    """

    def __init__(self, model: nn.Module, value, seed: Optional[int] = None):
        if value is not None and not isinstance(value, bool):
            if not isinstance(value, Real) or not 0 <= value <= 1:
                raise ValueError(
                    'force_gates value must be True, False, None or a '
                    f'probability in [0, 1], got {value!r}')
            # p = 1 and p = 0 need no draw.
            value = {1: True, 0: False}.get(value, float(value))
        self.gates = list(gate_modules(model).values())
        if not self.gates:
            raise ValueError('force_gates: the model has no ChannelGate')
        self.previous = [(g.forced, g.force_generator) for g in self.gates]
        generator = None
        if isinstance(value, float) and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        for g in self.gates:
            g.forced = value
            g.force_generator = generator

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for g, (forced, generator) in zip(self.gates, self.previous):
            g.forced = forced
            g.force_generator = generator
        return False
