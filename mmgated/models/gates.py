"""The channel gate of a residual block and the functions that read and steer
all gates of a model.

A :class:`ChannelGate` is the gating module of the paper (section 4.1): global
average pooling of the block input, ``FC(c_in -> 16)``, BN, ReLU,
``FC(16 -> c)`` giving one logit per gated channel, followed by a Binary
Concrete gate (hard decision forward, ``sigmoid(x / tau)`` backward).

Every forward pass stores the batch's gate logits, probabilities, relaxed
samples and hard decisions on the gate module itself (overwriting the previous
batch, so nothing accumulates); :func:`collect_gates` returns them for a whole
model, keyed by module name. Losses and analysis read gates only through it.
"""
import math
from collections import OrderedDict
from numbers import Real
from typing import Dict, Iterable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule, is_model_wrapper

from ..ops.gate_logits import gate_logits_unchecked
from .folding import bn_scale_shift, cached_on, norm_sources
from .fused_gate import (fused_training_gate, logistic_noise,
                         relaxed_sample_grad)

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


class GateOutput:
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

    ``probs`` and ``relaxed`` may be given as ``None`` together with ``tau``:
    they are then computed from ``logits`` (without noise) when first read,
    so that inference, which needs only the decisions, does not pay for them.
    """

    __slots__ = ('logits', 'gates', '_probs', '_relaxed', '_tau')

    def __init__(self, logits: torch.Tensor, probs: Optional[torch.Tensor],
                 relaxed: Optional[torch.Tensor], gates: torch.Tensor,
                 tau: Optional[float] = None):
        if (probs is None or relaxed is None) and tau is None:
            raise ValueError('GateOutput needs tau to compute probs or '
                             'relaxed that are not given')
        self.logits = logits
        self.gates = gates
        self._probs = probs
        self._relaxed = relaxed
        self._tau = tau

    @property
    def probs(self) -> torch.Tensor:
        if self._probs is None:
            self._probs = torch.sigmoid(self.logits)
        return self._probs

    @property
    def relaxed(self) -> torch.Tensor:
        if self._relaxed is None:
            self._relaxed = torch.sigmoid(self.logits / self._tau)
        return self._relaxed

    def __repr__(self):
        return (f'GateOutput(logits={tuple(self.logits.shape)}, '
                f'open={float(self.gates.float().mean()):.3f})')


def parse_gate_cfg(gate_cfg: Optional[dict]) -> dict:
    """Complete a ``gate_cfg`` with defaults and validate it.

    Args:
        gate_cfg (dict, optional): Any of ``hidden_channels`` (int >= 1,
            default 16), ``tau`` (> 0, default 2/3), ``init_bias`` (initial
            logit, default 3.0, i.e. about 95 % of the gates open),
            ``position`` (Bottleneck only: one of ``'after_conv1'``,
            ``'after_conv2'`` (default), ``'both'``), ``stages`` (indices of
            the stages whose blocks are gated; ``None`` gates all) and
            ``execution`` (``'mask'`` or ``'skip'``).

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
    tau = cfg['tau']
    if not isinstance(tau, Real) or not tau > 0 or not math.isfinite(tau):
        raise ValueError(f'gate_cfg tau must be a finite number > 0, '
                         f'got {tau!r}')
    if not isinstance(cfg['init_bias'], Real):
        raise ValueError('gate_cfg init_bias must be a number, got '
                         f'{cfg["init_bias"]!r}')
    if cfg['position'] not in GATE_POSITIONS:
        raise ValueError(f'gate_cfg position {cfg["position"]!r} does not '
                         f'exist; allowed positions are {GATE_POSITIONS}')
    if cfg['execution'] not in GATE_EXECUTIONS:
        raise ValueError(f'gate_cfg execution {cfg["execution"]!r} is not '
                         f'one of {GATE_EXECUTIONS}')
    if cfg['stages'] is not None:
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


class _BinaryConcrete(torch.autograd.Function):
    """Hard sample forward, relaxed gradient backward, as one autograd node
    (it runs for every gate of every training step)."""

    @staticmethod
    def forward(ctx, logits, noise, tau):
        ctx.set_materialize_grads(False)
        noisy = logits + noise
        relaxed = torch.sigmoid(noisy / tau)
        hard = (noisy > 0).to(logits.dtype)
        ctx.save_for_backward(relaxed)
        ctx.tau = tau
        return hard, relaxed

    @staticmethod
    def backward(ctx, grad_hard, grad_relaxed):
        (relaxed, ) = ctx.saved_tensors
        return relaxed_sample_grad(grad_hard, grad_relaxed, relaxed,
                                   ctx.tau), None, None


def binary_concrete(logits: torch.Tensor,
                    tau: float,
                    noise: Optional[torch.Tensor] = None):
    """Hard Binary Concrete sample with the relaxed gradient.

    The forward value is the hard decision ``logits + noise > 0`` (the
    binary Gumbel-max trick); the backward pass is the gradient of
    ``sigmoid((logits + noise) / tau)`` (straight-through estimator).

    Args:
        logits (Tensor): Gate logits ``ln(pi)``.
        tau (float): Temperature of the relaxation.
        noise (Tensor, optional): Logistic noise; drawn when not given. No
            gradient flows to it.

    Returns:
        tuple[Tensor, Tensor]: The hard gates (0/1 in value) and the relaxed
        sample.
    """
    if noise is None:
        noise = logistic_noise(logits.shape, logits)
    return _BinaryConcrete.apply(logits, noise.detach(), float(tau))


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


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
        # MACs one gated channel controls at the last input's resolution; set
        # by the block that applies the gate (see GateL0Loss 'macs').
        self.controlled_macs: Optional[float] = None
        # Spatial size of the gated map at the last forward.
        self.map_size: Optional[tuple] = None
        self.forced: Union[None, bool, float] = None
        self.force_generator: Optional[torch.Generator] = None

    def _normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.view(*hidden.shape, 1, 1)
        norm = self.norm
        single_value = hidden.shape[0] == 1
        if (self.training and single_value
                and isinstance(norm, nn.modules.batchnorm._BatchNorm)
                and not (isinstance(norm, nn.SyncBatchNorm)
                         and _world_size() > 1)):
            # One sample has no batch variance: normalise it with the running
            # statistics instead of failing, so batch size 1 trains.
            hidden = F.batch_norm(hidden, norm.running_mean, norm.running_var,
                                  norm.weight, norm.bias, False, 0.0, norm.eps)
        else:
            hidden = norm(hidden)
        return hidden.view(hidden.shape[:2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the gates of a batch.

        Args:
            x (Tensor): Block input of shape ``(N, C_in, H, W)``.

        Returns:
            Tensor: Gates of shape ``(N, out_channels)``, 0 or 1 in value, of
            the dtype of the logits; in training differentiable through the
            straight-through Binary Concrete estimator.
        """
        if self.training:
            # The same computation as the layers below, as one autograd node,
            # where it applies.
            fused = fused_training_gate(self, x)
            if fused is not None:
                return self._record(*fused)
        tracing = torch.jit.is_tracing()
        if not (self.training or torch.is_grad_enabled() or tracing):
            # Inference: BN folded into fc1, the whole module one compiled
            # call where it can be (mmgated.ops.gate_logits). (Traced, for
            # the MAC counters, the gate runs as the layers the paper
            # counts.)
            folded = self._folded_inference()
            if folded is not None:
                logits, gates = gate_logits_unchecked(x, *folded)
                return self._record(logits, None, None, gates)
        if tracing:
            # The MAC counters count the pooling as an aten::mean.
            pooled = x.mean(dim=(2, 3))
        else:
            # sum * 1/(H*W) rather than mean: the backward of sum broadcasts
            # the gradient as a view, where mean's writes a full-size tensor.
            pooled = x.sum(dim=(2, 3)) * (1.0 / (x.shape[2] * x.shape[3]))
        logits = self.fc2(F.relu(self._normalize(self.fc1(pooled))))
        if self.training:
            gates, relaxed = binary_concrete(logits, self.tau)
            return self._record(logits, torch.sigmoid(logits), relaxed,
                                gates)
        # Eval: no noise; probs and relaxed are computed from the logits
        # only if read (see GateOutput), as inference needs the decisions
        # alone.
        return self._record(logits, None, None, (logits > 0).to(logits.dtype))

    def _record(self, logits, probs, relaxed, gates):
        """Apply any forcing, store the batch's :class:`GateOutput` and
        return the gates."""
        if self.forced is not None:
            gates = self._forced_gates(logits)
        # Bypasses nn.Module.__setattr__, which only files tensors and
        # modules; `output` is neither.
        self.__dict__['output'] = GateOutput(logits, probs, relaxed, gates,
                                             self.tau)
        return gates

    def _folded_inference(self):
        """``(fc1 weight, fc1 bias, fc2 weight, fc2 bias)`` for inference:
        fc1 with the eval-mode BN folded in, all contiguous; cached until a
        parameter or statistic changes. ``None`` for a norm that is not a
        BN with running statistics."""
        modules = self._modules
        norm = modules['norm']
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            return None
        stats = norm_sources(norm)
        if stats[0] is None:  # no running statistics
            return None
        fc1, fc2 = modules['fc1']._parameters, modules['fc2']._parameters
        sources = (fc1['weight'], fc2['weight'], fc2['bias']) + stats

        def build():
            scale, shift = bn_scale_shift(norm)
            return (sources[0] * scale[:, None], shift.contiguous(),
                    sources[1].contiguous(), sources[2].contiguous())

        return cached_on(self, '_folded', sources, build)

    def _forced_gates(self, logits: torch.Tensor) -> torch.Tensor:
        # p = 1 and p = 0 need no draw: rand() lies in [0, 1).
        if self.forced is True or self.forced == 1.0:
            return torch.ones_like(logits)
        if self.forced is False or self.forced == 0.0:
            return torch.zeros_like(logits)
        generator = self.force_generator
        draw = torch.rand(
            logits.shape, generator=generator,
            device=logits.device if generator is None else generator.device)
        # Compared in place: 1.0 or 0.0 in the draw's dtype, one operation
        # instead of a bool tensor and its conversion.
        return draw.lt_(self.forced).to(logits)

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

    This is the one API for losses and analysis to read gates. Each gate
    module keeps only its last batch, so memory does not grow across
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
        # Past nn.Module.__setattr__, as ChannelGate._record writes it.
        m.__dict__['output'] = None


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
            value = float(value)
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
