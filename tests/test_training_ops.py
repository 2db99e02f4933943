"""The fused training paths: the gating module as one autograd node
(mmgated.models.fused_gate), the gated ReLU (mmgated.models.gated_relu) and
the column sort, the Beta prior's CDF and density and Eq. (2) with its
gradient in the batch-shaping loss, each against the unfused PyTorch
computation or scipy, compiled and with PyTorch operations."""
import copy
import importlib
import logging
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import special, stats

from mmgated.models import blocks as blocks_module
from mmgated.models.fused_gate import fused_training_gate
from mmgated.models.gated_relu import batch_norm_gated_relu, gated_relu
from mmgated.models.gates import ChannelGate
from mmgated.models.losses import BatchShapingLoss
from mmgated.models.losses.priors import Prior, build_prior
from mmgated.ops.batch_shaping import ARGSORT_MAX_ROWS, sort_columns
from mmgated.ops.native import native_available
from mmgated.ops.training_nodes import training_nodes

native_module = importlib.import_module('mmgated.ops.native')
nodes_module = importlib.import_module('mmgated.ops.training_nodes')
gates_module = importlib.import_module('mmgated.models.gates')


@pytest.fixture(params=['compiled', 'pytorch'])
def ops_mode(request, monkeypatch):
    if request.param == 'pytorch':
        monkeypatch.setattr(native_module, '_library', False)
    elif not native_available():
        pytest.skip('no C compiler')
    return request.param


# The autograd nodes of the gating module and the gated ReLU: in C++
# ('cpp'), as Python Functions around the compiled kernels ('compiled') or
# around PyTorch operations ('pytorch').
CPP_NODES = dict(gate='torch::autograd::CppNode<mmgated::TrainingGate>',
                 relu='torch::autograd::CppNode<mmgated::GatedReLU>',
                 norm_relu='torch::autograd::CppNode<mmgated::'
                 'BatchNormGatedReLU>')
PYTHON_NODES = dict(gate='_TrainingGateBackward', relu='_GatedReLUBackward',
                    norm_relu='_BatchNormGatedReLUBackward')


@pytest.fixture(params=['cpp', 'compiled', 'pytorch'])
def node_mode(request, monkeypatch):
    if request.param == 'pytorch':
        monkeypatch.setattr(native_module, '_library', False)
    elif not native_available():
        pytest.skip('no C compiler')
    elif request.param == 'compiled':
        monkeypatch.setattr(nodes_module, '_extension', False)
    else:
        _require_cpp_nodes()
    return request.param


def _require_cpp_nodes():
    """The C++ nodes; skip where they cannot be built here."""
    if not native_available():
        pytest.skip('no C compiler')
    nodes = training_nodes()
    if nodes is None:
        # Where a C compiler works the C++ nodes must build, unless
        # PyTorch's extension tools (ninja) are missing.
        from torch.utils.cpp_extension import is_ninja_available
        assert not is_ninja_available(), 'the C++ training nodes failed'
        pytest.skip('no ninja: the C++ nodes cannot be built')
    return nodes


def expected_node(mode, kind, dtype=torch.float32):
    """The name of the autograd node that ``mode`` records for ``kind``
    ('gate', 'relu' or 'norm_relu') on tensors of ``dtype``."""
    cpp = mode == 'cpp' and dtype == torch.float32
    return (CPP_NODES if cpp else PYTHON_NODES)[kind]


def _unfused_gate(monkeypatch):
    monkeypatch.setattr(gates_module, 'fused_training_gate',
                        lambda gate, x: None)


# --------------------------------------------------------------- gated ReLU


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('gates_need_grad', [True, False])
def test_gated_relu_equals_relu_times_gates(node_mode, dtype,
                                            gates_need_grad):
    torch.manual_seed(0)
    pre = torch.randn(3, 5, 4, 6, dtype=dtype)
    pre[0, 0, 0, :2] = 0.0  # the ReLU's kink: no gradient, as torch.relu
    gates = (torch.rand(3, 5) > 0.4).float()
    gates[1] = 0.0  # a sample with every channel closed
    weight = torch.randn(3, 5, 4, 6, dtype=dtype)

    def run(function):
        x = pre.clone().requires_grad_()
        g = gates.clone().requires_grad_(gates_need_grad)
        out = function(x * 1, g)
        (out * weight).sum().backward()
        return out.detach(), x.grad, g.grad, out.grad_fn.name()

    expected = run(lambda x, g: torch.relu(x) * g.to(dtype)[:, :, None,
                                                              None])
    got = run(gated_relu)
    assert got[3] == expected_node(node_mode, 'relu', dtype)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    if gates_need_grad:
        assert got[2].dtype == torch.float32
        torch.testing.assert_close(got[2], expected[2])
    else:
        assert got[2] is None


def test_gated_relu_consumes_its_input_as_an_inplace_relu(node_mode):
    """With autograd the pre-activation is kept unchanged (the backward
    reads it); without, it is overwritten with the result."""
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    pre = x * 1
    gates = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = gated_relu(pre, gates)
    assert torch.equal(pre.detach(), x.detach())
    with torch.no_grad():
        consumed = x.detach().clone()
        inference = gated_relu(consumed, gates)
    assert torch.equal(inference, out.detach())
    assert inference.data_ptr() == consumed.data_ptr()


@pytest.mark.parametrize('threads', [1, 2])
def test_gated_relu_on_a_map_split_between_threads(node_mode, threads):
    """A map large enough for the compiled passes to split its planes
    between threads, with closed planes in each thread's part."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(1)
        pre = torch.randn(4, 64, 16, 16)
        gates = (torch.rand(4, 64) > 0.5).float()
        gates[:, :3] = 0.0
        grad = torch.randn(4, 64, 16, 16)
        g = gates.clone().requires_grad_()
        x = pre.clone().requires_grad_()
        gated_relu(x * 1, g).backward(grad)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(g.grad, (grad * torch.relu(pre)).sum((2, 3)))
    torch.testing.assert_close(
        x.grad, grad * (pre > 0) * gates[:, :, None, None])


def test_gated_relu_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r'\(2, 3\)'):
        gated_relu(torch.randn(2, 4, 3, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match='N, C, H, W'):
        gated_relu(torch.randn(2, 4), torch.ones(2, 4))


def test_gated_relu_non_contiguous_map(node_mode):
    """A channels-last map takes the PyTorch path, with the same result."""
    pre = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    x = pre.clone().requires_grad_()
    gates = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]],
                         requires_grad=True)
    out = gated_relu(x * 1, gates)
    out.sum().backward()
    torch.testing.assert_close(out, torch.relu(pre) * gates[:, :, None,
                                                             None])
    torch.testing.assert_close(gates.grad, torch.relu(pre).sum((2, 3)))


def test_blocks_use_the_gated_relu_only_for_relu(monkeypatch):
    """Other activations, and traces, keep norm, activation then product."""
    from mmgated.models.backbones.mmpretrain_resnet import GatedBasicBlock
    block = GatedBasicBlock(8, 8, gate_cfg={})
    calls = []
    monkeypatch.setattr(
        blocks_module, 'batch_norm_gated_relu', lambda x, norm, g: calls.
        append(1) or batch_norm_gated_relu(x, norm, g))
    block.train()
    block(torch.randn(2, 8, 6, 6))
    assert calls == [1]
    block.relu = nn.ReLU6()
    block(torch.randn(2, 8, 6, 6))
    assert calls == [1]


# --------------------------------------------------- batch-norm gated ReLU


NORM_VARIANTS = {
    'default': {},
    'cumulative average': dict(momentum=None),
    'no running stats': dict(track_running_stats=False),
}


def _norm(channels, variant):
    torch.manual_seed(3)
    norm = nn.BatchNorm2d(channels, **NORM_VARIANTS[variant])
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(std=0.5)  # outputs on both sides of the ReLU
        if norm.running_mean is not None:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    return norm.train()


def _norm_relu_step(function, norm, pre, gates, grad, steps=2):
    """Output after ``steps`` forwards, and the gradients of the map, the
    norm's weight and bias and the gates after one backward."""
    for _ in range(steps):
        x = pre.clone().requires_grad_()
        g = gates.clone().requires_grad_()
        out = function(x, norm, g)
    (out * grad).sum().backward()
    return (out.detach(), x.grad, norm.weight.grad, norm.bias.grad, g.grad,
            out.grad_fn.name())


def _norm_then_gated_relu(x, norm, g):
    return torch.relu(norm(x)) * g.to(x.dtype)[:, :, None, None]


# (3, 37, 9, 9): rows of 81 values, five whole lanes of 16 and one more;
# (5, 3, 30, 30): 4500 values a channel, more than one drain of the lanes;
# (2, 5, 1, 1): two values a channel.
@pytest.mark.parametrize('shape', [(4, 6, 5, 7), (3, 37, 9, 9),
                                   (5, 3, 30, 30), (2, 5, 1, 1)])
@pytest.mark.parametrize('variant', list(NORM_VARIANTS))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_batch_norm_gated_relu_equals_the_modules(node_mode, variant, shape,
                                                  dtype):
    """Output, the gradients of the map, the norm's weight and bias and the
    gates, the running statistics and the batch counter equal those of
    PyTorch's batch norm, ReLU and product."""
    torch.manual_seed(0)
    pre = (torch.randn(shape) * 2 + 0.5).to(dtype)
    gates = (torch.rand(shape[:2]) > 0.4).float()
    gates[0] = 0.0  # a sample with every channel closed
    grad = torch.randn(shape, dtype=dtype)
    norm = _norm(shape[1], variant).to(dtype)
    reference = copy.deepcopy(norm)
    got = _norm_relu_step(batch_norm_gated_relu, norm, pre, gates, grad)
    expected = _norm_relu_step(_norm_then_gated_relu, reference, pre, gates,
                               grad)
    # float64, and no compiled kernels: the norm, then the gated ReLU.
    fused = node_mode != 'pytorch' and dtype == torch.float32
    assert got[5] == (expected_node(node_mode, 'norm_relu') if fused else
                      expected_node(node_mode, 'relu', dtype))
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    # The map's gradient is a difference of terms of the size of the
    # incoming gradient times weight * invstd: its tolerance is theirs.
    scale = (grad.abs().max() * norm.weight.abs().max() /
             pre.std((0, 2, 3)).min()).item()
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4,
                               atol=1e-6 * scale)
    for name, g, e in zip(('weight', 'bias', 'gates'), got[2:5],
                          expected[2:5]):
        assert g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=name)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(getattr(norm, name), buffer, rtol=1e-6,
                                   atol=1e-7, msg=name)


@pytest.mark.parametrize('offset', [2.0, 100.0])
def test_batch_norm_gated_relu_is_as_accurate_as_pytorch(node_mode, offset):
    """Against the same computation in float64, the float32 node errs no
    more than PyTorch's float32 modules (within 3x and 1e-6), also for a
    map whose mean is far from 0 (the variance's cancellation)."""
    torch.manual_seed(2)
    pre = torch.randn(8, 32, 14, 14) * 3 + offset
    gates = (torch.rand(8, 32) > 0.3).float()
    grad = torch.randn(8, 32, 14, 14)
    results = [
        _norm_relu_step(function, _norm(32, 'default').to(dtype),
                        pre.to(dtype), gates.to(dtype), grad.to(dtype), 1)
        for function, dtype in ((batch_norm_gated_relu, torch.float32),
                                (_norm_then_gated_relu, torch.float32),
                                (_norm_then_gated_relu, torch.float64))
    ]
    for i, name in enumerate(('output', 'map grad', 'weight grad',
                              'bias grad', 'gates grad')):
        exact = results[2][i]
        errors = [(r[i].double() - exact).abs().max() / exact.abs().max()
                  for r in results[:2]]
        assert errors[0] <= 3 * errors[1] + 1e-6, (name, errors)


def test_batch_norm_gated_relu_gates_of_another_dtype(node_mode):
    """float64 gates on a float32 map: the gates' gradient comes back in
    float64, as the product's would."""
    norm = _norm(4, 'default')
    pre = torch.randn(3, 4, 5, 5)
    gates = torch.tensor([[1., 0., 1., 1.], [0., 1., 1., 0.],
                          [1., 1., 0., 1.]], dtype=torch.float64)
    grad = torch.randn(3, 4, 5, 5)
    got = _norm_relu_step(batch_norm_gated_relu, norm, pre, gates, grad, 1)
    expected = _norm_relu_step(_norm_then_gated_relu, _norm(4, 'default'),
                               pre, gates, grad, 1)
    assert got[4].dtype == torch.float64
    torch.testing.assert_close(got[4], expected[4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], expected[0].float())


@pytest.mark.parametrize('threads', [1, 2])
def test_batch_norm_gated_relu_threads_give_the_same_bits(node_mode,
                                                          threads):
    """Channels are split between threads, each channel's sums in one:
    the results do not depend on the thread count."""
    torch.manual_seed(1)
    pre = torch.randn(4, 64, 16, 16)
    gates = (torch.rand(4, 64) > 0.5).float()
    grad = torch.randn(4, 64, 16, 16)
    results = []
    previous = torch.get_num_threads()
    try:
        for count in (1, threads):
            torch.set_num_threads(count)
            results.append(_norm_relu_step(batch_norm_gated_relu,
                                           _norm(64, 'default'), pre, gates,
                                           grad, 1))
    finally:
        torch.set_num_threads(previous)
    for got, expected in zip(*results):
        assert got == expected if isinstance(got, str) \
            else torch.equal(got, expected)


def _instance_norm(channels):
    return nn.GroupNorm(channels, channels)


@pytest.mark.parametrize('case', ['eval', 'group norm', 'no grad',
                                  'channels last', 'frozen affine'])
def test_batch_norm_gated_relu_elsewhere_is_the_modules(node_mode, case):
    """Where the node does not apply, the norm module runs, then the gated
    ReLU: the same values, and the batch counter advanced once (by the
    norm's own forward)."""
    norm = _norm(4, 'default') if case != 'group norm' else _instance_norm(4)
    if case == 'eval':
        norm.eval()
    if case == 'frozen affine':
        norm = nn.BatchNorm2d(4, affine=False).train()
    pre = torch.randn(2, 4, 5, 5)
    if case == 'channels last':
        pre = pre.to(memory_format=torch.channels_last)
    gates = torch.tensor([[1., 0., 1., 1.], [0., 1., 1., 0.]])
    reference = copy.deepcopy(norm)
    with torch.set_grad_enabled(case != 'no grad'):
        x = pre.clone().requires_grad_(case != 'no grad')
        out = batch_norm_gated_relu(x, norm, gates)
        expected = _norm_then_gated_relu(pre, reference, gates)
    if case != 'no grad':
        assert out.grad_fn.name() not in (CPP_NODES['norm_relu'],
                                          PYTHON_NODES['norm_relu'])
    torch.testing.assert_close(out, expected)
    for name, buffer in reference.named_buffers():
        assert torch.equal(getattr(norm, name), buffer), name


def test_batch_norm_gated_relu_rejects_bad_shapes(node_mode):
    norm = _norm(4, 'default')
    with pytest.raises(ValueError, match=r'gates of shape.*2, 3'):
        batch_norm_gated_relu(
            torch.randn(2, 4, 3, 3, requires_grad=True), norm,
            torch.ones(2, 3))
    count = norm.num_batches_tracked.item()
    # One value per channel: the norm's own error, nothing counted.
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        batch_norm_gated_relu(
            torch.randn(1, 4, 1, 1, requires_grad=True), norm,
            torch.ones(1, 4))
    assert norm.num_batches_tracked.item() == count + 1  # the norm's


# ---------------------------------------------------------- fused gate


GATE_VARIANTS = {
    'default': {},
    'cumulative average': dict(momentum=None),
    'no affine': dict(affine=False),
    'no running stats': dict(track_running_stats=False),
    'frozen norm': dict(requires_grad=False),
}


def _gate(variant, dtype, in_channels=6, out_channels=10):
    torch.manual_seed(0)
    gate = ChannelGate(in_channels, out_channels, init_bias=0.3)
    options = GATE_VARIANTS[variant]
    if 'requires_grad' in options:
        gate.norm.requires_grad_(False)
    elif options:
        gate.norm = nn.BatchNorm2d(16, **options)
    with torch.no_grad():
        gate.fc2.weight.normal_(std=0.5)  # logits on both sides of 0
        if gate.norm.weight is not None:
            gate.norm.weight.uniform_(0.5, 1.5)
            gate.norm.bias.normal_(std=0.3)
    return gate.to(dtype).train()


def _train_gate(gate, x, steps=2):
    """Gate outputs, input and parameter gradients, buffers after
    ``steps`` forward passes and one backward pass."""
    x = x.clone().requires_grad_()
    torch.manual_seed(1)
    for _ in range(steps):
        hard = gate(x)
    out = gate.output
    weight = torch.randn(hard.shape, dtype=x.dtype,
                         generator=torch.Generator().manual_seed(2))
    # Every output carries a gradient: the hard gates (straight-through),
    # the probabilities and relaxed samples (the gate losses) and logits.
    loss = (hard * weight).sum() + (out.probs**2).sum() \
        + (out.relaxed * weight.flip(0)).sum() + out.logits.mean()
    loss.backward()
    params = {n: p.grad for n, p in gate.named_parameters()}
    return out, x.grad, params, dict(gate.named_buffers())


# The compiled loops sum in tiles of 16 values: (37, 21) has whole tiles
# and a remainder in every product.
@pytest.mark.parametrize('channels', [(6, 10), (37, 21)])
@pytest.mark.parametrize('variant', list(GATE_VARIANTS))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_fused_gate_equals_the_modules(variant, dtype, channels, node_mode,
                                       monkeypatch):
    x = torch.randn(5, channels[0], 3, 4, dtype=dtype)
    gate = _gate(variant, dtype, *channels)
    reference = copy.deepcopy(gate)
    fused = _train_gate(gate, x)
    assert fused[0].logits.grad_fn.name() == expected_node(
        node_mode, 'gate', dtype)
    _unfused_gate(monkeypatch)
    expected = _train_gate(reference, x)
    assert expected[0].logits.grad_fn.name() == 'AddmmBackward0'
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    for name in ('logits', 'probs', 'relaxed'):
        torch.testing.assert_close(getattr(fused[0], name),
                                   getattr(expected[0], name), **tol)
    assert torch.equal(fused[0].gates, expected[0].gates)
    assert fused[0].gates.requires_grad
    torch.testing.assert_close(fused[1], expected[1], **tol)
    assert fused[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        if grad is None:
            assert fused[2][name] is None, name
        elif dtype == torch.float32:
            # Rounding in float32 sums grows with the largest term, not
            # with each element (fc1's gradient reaches ~20 through the
            # norm without affine).
            scale = max(1.0, grad.abs().max().item())
            torch.testing.assert_close(fused[2][name], grad, rtol=1e-5,
                                       atol=1e-6 * scale, msg=name)
        else:
            torch.testing.assert_close(fused[2][name], grad, msg=name)
    for name, buffer in expected[3].items():
        torch.testing.assert_close(fused[3][name], buffer, **tol, msg=name)


def test_fused_gate_backward_is_the_derivative():
    """Against finite differences (float64, PyTorch operations)."""
    from mmgated.models.fused_gate import _TrainingGate
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(4, 5, dtype=torch.float64)
    params = [
        torch.randn(7, 3, dtype=torch.float64, requires_grad=True),
        torch.rand(7, dtype=torch.float64, requires_grad=True),
        torch.randn(7, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 7, dtype=torch.float64, requires_grad=True),
        torch.randn(5, dtype=torch.float64, requires_grad=True),
    ]

    def soft_outputs(*inputs):
        # The hard gates are piecewise constant; their gradient is the
        # straight-through one, checked against the modules above.
        logits, probs, relaxed, _ = _TrainingGate.apply(
            inputs[0], noise, *inputs[1:], None, None, 0.1, 1e-5, 2 / 3)
        return logits, probs, relaxed

    assert torch.autograd.gradcheck(soft_outputs, (x, *params))


# Which outputs carry a gradient, and whether the block input needs one.
@pytest.mark.parametrize('used, x_needs_grad', [
    (('gates', ), True),
    (('probs', ), True),
    (('relaxed', 'logits'), False),
    ((), True),
])
def test_fused_gate_with_some_gradients(used, x_needs_grad, node_mode,
                                        monkeypatch):
    """Gradients from some outputs only (the gate losses read probs and
    relaxed samples, the block the hard gates), and a block input without
    one: as the modules."""
    x = torch.randn(4, 37, 3, 3, generator=torch.Generator().manual_seed(0))

    def run(gate):
        inputs = x.clone().requires_grad_(x_needs_grad)
        torch.manual_seed(1)
        hard = gate(inputs)
        outputs = dict(gates=hard, probs=gate.output.probs,
                       relaxed=gate.output.relaxed,
                       logits=gate.output.logits)
        weight = torch.randn(hard.shape,
                             generator=torch.Generator().manual_seed(2))
        # A zero-weight term keeps the graph when no output is used.
        loss = 0 * hard.sum() + sum(
            (outputs[name] * weight).sum() for name in used)
        loss.backward()
        return inputs.grad, {n: p.grad for n, p in gate.named_parameters()}

    gate = _gate('default', torch.float32, 37, 21)
    reference = copy.deepcopy(gate)
    got = run(gate)
    _unfused_gate(monkeypatch)
    expected = run(reference)
    if x_needs_grad:
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5,
                                   atol=1e-6)
    else:
        assert got[0] is None and expected[0] is None
    for name, grad in expected[1].items():
        # As above, rounding grows with the largest term: fc1's gradient
        # cancels through the norm of four samples.
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(got[1][name], grad, rtol=1e-5,
                                   atol=1e-5 * scale, msg=name)


def test_gated_relu_gates_of_another_dtype(node_mode):
    """float64 gates on a float32 map: the gates' gradient comes back as
    float64, the map's as float32."""
    pre = torch.randn(2, 3, 4, 4)
    x = pre.clone().requires_grad_()
    gates = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]],
                         dtype=torch.float64, requires_grad=True)
    out = gated_relu(x * 1, gates)
    assert out.dtype == torch.float32
    assert out.grad_fn.name() == expected_node(node_mode, 'relu')
    out.sum().backward()
    assert gates.grad.dtype == torch.float64 and x.grad.dtype == torch.float32
    torch.testing.assert_close(gates.grad,
                               torch.relu(pre).sum((2, 3)).double())
    torch.testing.assert_close(
        x.grad, ((pre > 0) * gates[:, :, None, None].float().detach()))


def test_gated_relu_gradient_of_the_gates_only(node_mode):
    """A map that needs no gradient (the gates do): only the gates'
    gradient is computed."""
    pre = torch.randn(2, 3, 4, 4)
    gates = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]],
                         requires_grad=True)
    out = gated_relu(pre.clone(), gates)
    assert out.grad_fn.name() == expected_node(node_mode, 'relu')
    weight = torch.randn(2, 3, 4, 4)
    (out * weight).sum().backward()
    torch.testing.assert_close(gates.grad,
                               (torch.relu(pre) * weight).sum((2, 3)))


def _entry_args(gate, x, noise):
    """The C++ training_gate entry's arguments for ``gate`` on ``x``."""
    norm = gate.norm
    return [x, noise, gate.fc1.weight, norm.weight, norm.bias,
            gate.fc2.weight, gate.fc2.bias, norm.running_mean,
            norm.running_var, norm.num_batches_tracked, norm.momentum,
            norm.eps, gate.tau]


@pytest.mark.parametrize('case', [
    'float64', 'channels last', 'one sample', 'gates on another device',
    'autocast', 'tracing', 'float counter'
])
def test_cpp_nodes_decline_what_the_kernels_cannot_read(case):
    """The C++ entries return None for tensors that the kernels do not
    read, and where the module-by-module path must run (autocast, the MAC
    counters' traces); the callers then take the Python Functions or the
    modules. A declined gate has drawn no noise and counted no batch."""
    nodes = _require_cpp_nodes()
    x = torch.randn(2, 4, 3, 3)
    gates = torch.ones(2, 4)
    if case == 'float64':
        x = x.double()
    elif case == 'channels last':
        x = x.to(memory_format=torch.channels_last)
    elif case == 'one sample':
        x = x[:1]
        gates = gates[:1]
    elif case == 'gates on another device':
        gates = gates.to('meta')
    if case != 'gates on another device':
        gate = _gate('default', x.dtype, 4, 5)
        if case == 'float counter':
            gate.norm.num_batches_tracked = torch.zeros(())
        rng = torch.get_rng_state()
        for noise in (torch.zeros(x.shape[0], 5, dtype=x.dtype), None):
            args = _entry_args(gate, x, noise)
            if case == 'autocast':
                with torch.autocast('cpu'):
                    declined = nodes.training_gate(*args)
            elif case == 'tracing':
                results = []
                # A trace, as mmengine's FlopAnalyzer records for the MAC
                # counters.
                torch.jit.trace(
                    lambda t: results.append(nodes.training_gate(*args))
                    or t * 1, x, check_trace=False)
                (declined, ) = results
            else:
                declined = nodes.training_gate(*args)
            assert declined is None
        assert torch.equal(torch.get_rng_state(), rng)
        assert gate.norm.num_batches_tracked.item() == 0
        if case in ('one sample', 'autocast', 'tracing', 'float counter'):
            return  # the gated ReLU takes these
    assert nodes.gated_relu(x.requires_grad_(), gates) is None


@pytest.mark.parametrize('momentum', [0.1, None])
def test_cpp_gate_draws_the_noise_and_counts_batches(momentum):
    """Without noise the C++ entry draws it from the global generator, as
    logistic_noise does, advances the norm's batch counter and updates
    the running statistics with the momentum (1/count for a cumulative
    average): the same as with the noise given and the counter advanced
    beforehand."""
    from mmgated.models.fused_gate import logistic_noise
    nodes = _require_cpp_nodes()
    x = torch.randn(6, 4, 3, 3)
    drawn = _gate('default', torch.float32, 4, 5)
    drawn.norm.momentum = momentum
    given = copy.deepcopy(drawn)
    version = drawn.norm.num_batches_tracked._version
    torch.manual_seed(3)
    outputs = nodes.training_gate(*_entry_args(drawn, x, None))
    # Moved as by an in-place add (caches keyed by versions see it).
    assert drawn.norm.num_batches_tracked._version > version
    after = torch.rand(1)
    torch.manual_seed(3)
    noise = logistic_noise((6, 5), x)
    assert torch.equal(torch.rand(1), after)  # as many draws
    given.norm.num_batches_tracked.add_(1)
    args = _entry_args(given, x, noise)
    args[9] = None  # counted above
    args[10] = 1.0 if momentum is None else momentum
    expected = nodes.training_gate(*args)
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)
    assert drawn.norm.num_batches_tracked.item() == 1
    for name, buffer in given.norm.named_buffers():
        assert torch.equal(getattr(drawn.norm, name), buffer), name


def test_cpp_nodes_check_shapes():
    """The kernels trust the shapes; the C++ entries check them."""
    nodes = _require_cpp_nodes()
    gate = _gate('default', torch.float32, 4, 5)
    x = torch.randn(3, 4, 2, 2)
    args = _entry_args(gate, x, torch.zeros(3, 5))
    assert nodes.training_gate(*args) is not None
    for index, bad in ((0, torch.randn(3, 6, 2, 2)), (1, torch.zeros(3, 4)),
                       (4, torch.zeros(15)), (8, torch.ones(2))):
        for noise in (args[1], None):
            wrong = list(args)
            wrong[1] = noise
            wrong[index] = bad
            with pytest.raises(ValueError, match='inconsistent shapes'):
                nodes.training_gate(*wrong)
    with pytest.raises(ValueError, match=r'gates of shape \[3, 2\]'):
        nodes.gated_relu(x.requires_grad_(), torch.ones(3, 2))


def test_cpp_build_finds_the_ninja_beside_the_interpreter(
        monkeypatch, tmp_path):
    """A virtual environment's python, run without activating it, has
    pip's ninja beside it but not on PATH: the build sees it there, and
    PATH is restored afterwards."""
    from torch.utils import cpp_extension
    bin_dir = tmp_path / 'venv' / 'bin'
    bin_dir.mkdir(parents=True)
    (bin_dir / 'ninja').write_text('#!/bin/sh\n')
    (bin_dir / 'ninja').chmod(0o755)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    seen = []

    def recording_load(*args, **kwargs):
        seen.append(shutil.which('ninja'))
        raise RuntimeError('stop here')

    monkeypatch.setenv('PATH', str(elsewhere))
    monkeypatch.setenv('MMGATED_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(sys, 'executable', str(bin_dir / 'python'))
    monkeypatch.setattr(cpp_extension, 'load', recording_load)
    monkeypatch.setattr(nodes_module, 'print_log', lambda *a, **k: None)
    assert nodes_module._load() is None
    assert seen == [str(bin_dir / 'ninja')]
    assert os.environ['PATH'] == str(elsewhere)


def test_cpp_nodes_need_the_kernels(monkeypatch):
    monkeypatch.setattr(native_module, '_library', False)
    assert training_nodes() is None


def test_cpp_nodes_off_by_environment(monkeypatch):
    if not native_available():
        pytest.skip('no C compiler')
    monkeypatch.setattr(nodes_module, '_extension', None)
    monkeypatch.setenv('MMGATED_CPP_NODES', '0')
    assert training_nodes() is None
    assert nodes_module._extension is False  # not tried again


def test_failed_cpp_build_warns_and_falls_back(monkeypatch, tmp_path):
    """A build that fails names the compiler's first error; the gated ReLU
    and the gate then run as Python Functions."""
    if not native_available():
        pytest.skip('no C compiler')
    from torch.utils import cpp_extension

    def failing_load(*args, **kwargs):
        raise RuntimeError('Error building extension:\n[1/2] c++ ...\n'
                           'training_nodes.cpp:3:1: error: no compiler '
                           'here\nninja: build stopped')

    logged = []
    monkeypatch.setattr(nodes_module, '_extension', None)
    monkeypatch.setenv('MMGATED_CACHE', str(tmp_path))
    monkeypatch.setattr(cpp_extension, 'load', failing_load)
    monkeypatch.setattr(nodes_module, 'print_log',
                        lambda msg, **kwargs: logged.append((msg, kwargs)))
    assert training_nodes() is None
    assert 'building the C++ training nodes' in logged[0][0]
    assert 'training_nodes.cpp:3:1: error: no compiler here' in logged[-1][0]
    assert logged[-1][1]['level'] == logging.WARNING
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    out = gated_relu(x * 1, torch.ones(2, 3))
    assert out.grad_fn.name() == PYTHON_NODES['relu']
    assert nodes_module._first_error('no error line') == 'no error line'


@pytest.mark.parametrize('norm_cfg', [dict(type='BN'), dict(type='SyncBN')])
def test_which_gates_fuse(norm_cfg, node_mode):
    """The fused node takes a plain BN and more than one sample; where it
    does not apply it draws no noise and counts no batch."""
    gate = ChannelGate(4, 8, norm_cfg=norm_cfg).train()
    x = torch.randn(2, 4, 3, 3)
    fused = fused_training_gate(gate, x)
    assert (fused is not None) == (norm_cfg['type'] == 'BN')
    rng = torch.get_rng_state()
    count = gate.norm.num_batches_tracked.item()
    # One sample is normalised with the running statistics instead.
    assert fused_training_gate(gate, x[:1]) is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert gate.norm.num_batches_tracked.item() == count
    assert fused_training_gate(
        ChannelGate(4, 8, norm_cfg=dict(type='GN', num_groups=4)).train(),
        x) is None


def test_backbone_training_step_is_the_same_fused_or_not(monkeypatch):
    """A GatedResNet's outputs and gradients with the fused gate and gated
    ReLU equal those of the module-by-module computation."""
    from mmgated.models.backbones.mmpretrain_resnet import GatedResNet

    def step(model):
        x = torch.randn(3, 3, 48, 48,
                        generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        out = model(x)[-1]
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone()
                              for n, p in model.named_parameters()}

    torch.manual_seed(0)
    model = GatedResNet(depth=18).train()
    reference = copy.deepcopy(model)
    fused = step(model)
    _unfused_gate(monkeypatch)
    monkeypatch.setattr(
        blocks_module, 'batch_norm_gated_relu',
        lambda x, norm, g: torch.relu(norm(x)) * g[:, :, None, None])
    expected = step(reference)
    # Eight blocks of float32 rounding, in a different order on each path
    # (each path's own error: test_batch_norm_gated_relu_is_as_accurate_...)
    torch.testing.assert_close(fused[0], expected[0], rtol=1e-4, atol=3e-5)
    for name, grad in expected[1].items():
        torch.testing.assert_close(fused[1][name], grad, rtol=1e-3,
                                   atol=1e-5, msg=name)
    buffers = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, buffers[name], rtol=1e-5,
                                   atol=1e-6, msg=name)


# --------------------------------------------------------- column sort


@pytest.mark.parametrize('rows', [1, 2, 7, 8, ARGSORT_MAX_ROWS,
                                  ARGSORT_MAX_ROWS + 1])
def test_sort_columns_is_torch_sort(rows, ops_mode):
    torch.manual_seed(0)
    x = torch.rand(rows, 37)
    x[:, 3] = 0.5  # ties
    x[0, 4] = 1.0  # saturated gates
    values, order = sort_columns(x)
    expected, expected_order = torch.sort(x, dim=0)
    assert torch.equal(values, expected)
    assert order.dtype == torch.long
    assert torch.equal(x.gather(0, order), expected)
    # Tied values may come in another order.
    untied = [c for c in range(37) if c != 3]
    assert torch.equal(order[:, untied], expected_order[:, untied])
    assert sorted(order[:, 3].tolist()) == list(range(rows))


def test_sort_columns_other_inputs():
    x = torch.rand(6, 5, dtype=torch.float64)
    assert torch.equal(sort_columns(x)[0], torch.sort(x, dim=0)[0])
    y = torch.rand(5, 6).t()  # not contiguous
    assert torch.equal(sort_columns(y)[0], torch.sort(y, dim=0)[0])


# ---------------------------------------------- Beta CDF and density


@pytest.mark.parametrize('a,b', [(0.6, 0.4), (2.0, 3.0), (0.2, 7.0),
                                 (30.0, 1.5)])
@pytest.mark.parametrize('threads', [1, 2])
def test_beta_cdf_and_pdf_match_scipy(a, b, threads, ops_mode):
    """cdf_and_pdf of float32 values against scipy: inside (0, 1), at and
    beyond its ends, near them (the density is evaluated at eps and
    1 - eps), NaN; more values than one block of the compiled loop."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(9000, generator=gen)
    x[:10] = torch.tensor([
        0.0, 1.0, -0.5, 1.5, float('nan'), 1e-8, 1 - 2**-24,
        float('inf'), -float('inf'), 0.5
    ])
    prior = build_prior(dict(type='beta', a=a, b=b))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cdf, pdf = prior.cdf_and_pdf(x)
    finally:
        torch.set_num_threads(previous)
    assert cdf.dtype == pdf.dtype == torch.float32
    values = x.double().numpy()
    inside = np.clip(values, 0.0, 1.0)
    low, high = torch.tensor([1e-6, 1 - 1e-6]).double().tolist()
    expected_pdf = stats.beta.pdf(np.clip(inside, low, high), a, b)
    expected_pdf[(values < 0) | (values > 1)] = 0.0
    np.testing.assert_allclose(cdf.double().numpy(),
                               special.betainc(a, b, inside), rtol=0,
                               atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(pdf.double().numpy(), expected_pdf,
                               rtol=1e-4, atol=1e-30, equal_nan=True)
    assert torch.isnan(cdf[4]) and torch.isnan(pdf[4])


# ------------------------------------------- batch-shaping loss gradient


class _CubePrior(Prior):
    """A prior with no pdf of its own: the density comes from autograd."""
    support = (0.0, 1.0)

    def cdf(self, x):
        return x**3


def _graph_loss(x, prior, reduction):
    """Eq. (2) as an autograd graph: an independent reference."""
    n = x.shape[0]
    sorted_x = torch.sort(x, dim=0)[0]
    target = torch.arange(1, n + 1, dtype=x.dtype) / (n + 1)
    per_feature = ((target[:, None] - prior(sorted_x))**2).mean(dim=0)
    return per_feature.sum() if reduction == 'sum' else per_feature.mean()


@pytest.mark.parametrize('prior', [
    dict(type='beta', a=0.6, b=0.4),
    dict(type='beta', a=2.0, b=5.0),
    dict(type='uniform', low=-1.0, high=2.0),
    dict(type='gaussian', mean=0.5, std=0.3), 'cube'
])
@pytest.mark.parametrize('reduction', ['sum', 'mean'])
@pytest.mark.parametrize('rows', [2, 9, ARGSORT_MAX_ROWS + 3])
def test_batch_shaping_gradient_equals_the_graph(prior, reduction, rows,
                                                 ops_mode):
    """The loss computed with its gradient equals the autograd graph of
    Eq. (2), also at and beyond the support's ends."""
    torch.manual_seed(0)
    prior = _CubePrior() if prior == 'cube' else build_prior(prior)
    x = torch.rand(rows, 11, dtype=torch.float64) * 1.2 - 0.1
    x[0, :2] = torch.tensor([0.0, 1.0])  # exactly at the ends of [0, 1]
    loss = BatchShapingLoss(prior=prior, reduction=reduction,
                            loss_weight=0.7)
    for dtype in (torch.float64, torch.float32):
        got_x = x.to(dtype).clone().requires_grad_()
        got = loss(got_x)
        got.backward()
        ref_x = x.to(dtype).clone().requires_grad_()
        expected = 0.7 * _graph_loss(ref_x, prior, reduction)
        expected.backward()
        tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got, expected, **tol)
        torch.testing.assert_close(got_x.grad, ref_x.grad, **tol)
        with torch.no_grad():
            torch.testing.assert_close(loss(got_x), expected, **tol)
