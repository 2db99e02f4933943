"""Gated ResNet backbones against their dense mmseg/mmpretrain counterparts
(issue: channel-gated ResNet backbones)."""
import pytest
import torch
import torch.nn as nn
from mmpretrain.models.backbones import ResNet as ClsResNet
from mmpretrain.models.backbones import ResNetV1c as ClsResNetV1c
from mmseg.models.backbones import ResNet as SegResNet
from mmseg.models.backbones import ResNetV1c as SegResNetV1c

from mmgated.models import (ChannelGate, GatedResNetCifar, ResNetCifar,
                            clear_gates, collect_gates, force_gates,
                            gate_modules)
from mmgated.models.backbones import mmpretrain_resnet as cls_gated
from mmgated.models.backbones import mmseg_resnet as seg_gated

PSP_D8 = dict(
    num_stages=4,
    out_indices=(0, 1, 2, 3),
    dilations=(1, 1, 2, 4),
    strides=(1, 2, 1, 1),
    norm_eval=False,
    style='pytorch',
    contract_dilation=True)

# (dense class, gated class, constructor kwargs, input size)
PAIRS = [
    (SegResNet, seg_gated.GatedResNet, dict(depth=18), 32),
    (SegResNet, seg_gated.GatedResNet, dict(depth=34, out_indices=(1, 3)),
     32),
    (SegResNet, seg_gated.GatedResNet, dict(depth=50, style='caffe'), 32),
    (SegResNet, seg_gated.GatedResNet, dict(depth=101, out_indices=(3, )),
     32),
    (SegResNetV1c, seg_gated.GatedResNetV1c, dict(depth=50, **PSP_D8), 64),
    (SegResNetV1c, seg_gated.GatedResNetV1c,
     dict(depth=18, **PSP_D8, multi_grid=(1, 2, 4)), 32),
    (ClsResNet, cls_gated.GatedResNet, dict(depth=18, out_indices=(0, 3)),
     32),
    (ClsResNet, cls_gated.GatedResNet, dict(depth=50), 32),
    (ClsResNet, cls_gated.GatedResNet, dict(depth=152), 32),
    (ClsResNetV1c, cls_gated.GatedResNetV1c, dict(depth=34), 32),
    (ResNetCifar, GatedResNetCifar, dict(depth=20), 16),
]


def _pair(dense_cls, gated_cls, kwargs, **gated_kwargs):
    torch.manual_seed(0)
    dense = dense_cls(**kwargs)
    dense.init_weights()
    # Random norm statistics and affine parameters, so that the comparison
    # is not between near-identical zero-initialised branches.
    for m in dense.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    gated = gated_cls(**kwargs, **gated_kwargs)
    missing, unexpected = gated.load_state_dict(
        dense.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all('.gate' in key for key in missing)
    return dense, gated


@pytest.mark.parametrize('dense_cls,gated_cls,kwargs,size', PAIRS)
@pytest.mark.parametrize('training', [True, False])
def test_all_gates_open_equals_dense(dense_cls, gated_cls, kwargs, size,
                                     training):
    dense, gated = _pair(dense_cls, gated_cls, kwargs)
    dense.train(training)
    gated.train(training)
    x = torch.randn(2, 3, size, size)
    with force_gates(gated, True):
        gated_out = gated(x)
    dense_out = dense(x)
    assert len(gated_out) == len(dense_out)
    for g, d in zip(gated_out, dense_out):
        assert g.shape == d.shape
        torch.testing.assert_close(g, d, rtol=0, atol=1e-5)


@pytest.mark.parametrize('dense_cls,gated_cls,kwargs,size', PAIRS)
def test_strides_dilations_and_feature_sizes_match_dense(
        dense_cls, gated_cls, kwargs, size):
    dense, gated = _pair(dense_cls, gated_cls, kwargs)
    dense_convs = [(n, m.stride, m.dilation, m.padding)
                   for n, m in dense.named_modules()
                   if isinstance(m, nn.Conv2d)]
    gated_convs = [(n, m.stride, m.dilation, m.padding)
                   for n, m in gated.named_modules()
                   if isinstance(m, nn.Conv2d)]
    assert gated_convs == dense_convs
    assert gated.out_indices == dense.out_indices


def test_gated_blocks_and_positions():
    basic = seg_gated.GatedResNet(depth=18)
    assert len(gate_modules(basic)) == 8
    gate = basic.layer2[0].gate
    assert (gate.in_channels, gate.out_channels) == (64, 128)
    for position, names in [('after_conv1', {'gate1'}),
                            ('after_conv2', {'gate2'}),
                            ('both', {'gate1', 'gate2'})]:
        model = cls_gated.GatedResNet(
            depth=50, gate_cfg=dict(position=position))
        block = model.layer1[0]
        assert {n for n in names if hasattr(block, n)} == names
        assert len(gate_modules(model)) == 16 * len(names)


def test_gating_module_structure():
    gate = ChannelGate(64, 128, hidden_channels=8)
    assert gate.fc1.in_features == 64 and gate.fc1.out_features == 8
    assert isinstance(gate.norm, nn.BatchNorm2d)
    assert gate.fc2.out_features == 128
    gate.train()
    out = gate(torch.randn(4, 64, 5, 5))
    assert out.shape == (4, 128)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    # The pooled input drives the gates: gates see x_l, not a later map.
    assert gate.output.logits.shape == (4, 128)


def test_initialisation_opens_most_gates():
    model = seg_gated.GatedResNet(depth=18)
    model.init_weights()
    model.train()
    torch.manual_seed(0)
    model(torch.randn(8, 3, 32, 32))
    rates = [o.gates.mean().item() for o in collect_gates(model).values()]
    assert min(rates) > 0.85


def test_stages_without_gates():
    model = seg_gated.GatedResNet(depth=18, gate_cfg=dict(stages=(2, 3)))
    names = list(gate_modules(model))
    assert names and all(n.startswith(('layer3', 'layer4')) for n in names)


def test_closed_gate_blocks_filter_gradient_not_logit_gradient():
    torch.manual_seed(0)
    model = seg_gated.GatedResNet(depth=18, zero_init_residual=False)
    model.train()
    block = model.layer1[0]
    channel = 5
    with torch.no_grad():
        block.gate.fc2.bias[channel] = -10.0  # closed for every sample
    x = torch.randn(4, 3, 32, 32)
    out = model(x)[-1]
    gates = collect_gates(model)['layer1.0.gate'].gates
    assert gates[:, channel].sum() == 0
    assert gates[:, :channel].sum() > 0
    out.square().mean().backward()
    filter_grad = block.conv1.weight.grad[channel]
    assert torch.count_nonzero(filter_grad) == 0
    assert torch.count_nonzero(block.conv1.weight.grad[channel + 1]) > 0
    # The straight-through Binary Concrete estimator still reaches the logit.
    assert block.gate.fc2.bias.grad[channel] != 0


def test_eval_is_deterministic_and_draws_no_noise():
    model = seg_gated.GatedResNet(depth=18)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    state = torch.get_rng_state()
    first = model(x)
    first_gates = {k: v.gates for k, v in collect_gates(model).items()}
    second = model(x)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for name, out in collect_gates(model).items():
        assert torch.equal(out.gates, first_gates[name])
        assert torch.equal(out.gates, (out.logits > 0).float())


@pytest.mark.parametrize('mode', ['train', 'eval', 'inference'])
def test_gating_module_is_pool_fc_bn_relu_fc(mode):
    """Section 4.1 computed by hand in float64: global average pool, FC to
    16, BN, ReLU, FC; hard gates logit > 0 in eval mode. With fold_norm at
    inference (eval without autograd), as skip execution asks, the BN is
    folded into fc1, and the folded copy follows later changes of the
    weights and statistics."""
    gate = ChannelGate(8, 32).double()
    training = mode == 'train'
    gate.train(training)
    x = torch.randn(6, 8, 5, 3, dtype=torch.float64)
    bn = gate.norm
    for _ in range(2 if mode == 'inference' else 1):
        with torch.no_grad():
            for p in gate.parameters():
                p.normal_()
            gate.norm.running_mean.normal_()
            gate.norm.running_var.uniform_(0.5, 2.0)
        hidden = x.mean((2, 3)) @ gate.fc1.weight.t()
        if training:
            mean, var = hidden.mean(0), hidden.var(0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        hidden = (hidden - mean) / torch.sqrt(var + bn.eps) * bn.weight \
            + bn.bias
        logits = hidden.clamp_min(0) @ gate.fc2.weight.t() + gate.fc2.bias
        with torch.set_grad_enabled(mode != 'inference'):
            gates = gate(x, fold_norm=mode == 'inference')
        out = gate.output
        torch.testing.assert_close(out.logits, logits)
        torch.testing.assert_close(out.probs, torch.sigmoid(logits))
        assert out.input_size == (5, 3)
        if not training:
            assert torch.equal(gates, (logits > 0).double())
            torch.testing.assert_close(out.relaxed,
                                       torch.sigmoid(logits / gate.tau))
        assert set(gates.unique().tolist()) <= {0.0, 1.0}


def test_training_draws_binary_concrete_samples():
    gate = ChannelGate(8, 64)
    gate.train()
    with torch.no_grad():
        gate.fc2.bias.zero_()
        gate.fc2.weight.zero_()
    torch.manual_seed(0)
    g = gate(torch.randn(256, 8, 2, 2))
    # logit 0: open with probability 1/2 under the logistic noise.
    assert 0.45 < g.mean().item() < 0.55
    out = gate.output
    assert torch.equal(out.gates, (out.relaxed > 0.5).float())


def test_binary_concrete_forward_is_hard_backward_is_relaxed():
    from mmgated.models.gates import binary_concrete
    logits = torch.tensor([-2.0, -0.3, 0.1, 1.5], requires_grad=True)
    noise = torch.tensor([0.5, 0.5, -0.5, 0.2])
    tau = 2 / 3
    gates, relaxed = binary_concrete(logits, tau, noise)
    assert gates.tolist() == [0.0, 1.0, 0.0, 1.0]
    gates.sum().backward()
    s = torch.sigmoid((logits.detach() + noise) / tau)
    torch.testing.assert_close(logits.grad, s * (1 - s) / tau)


def test_batch_size_one_training_step():
    model = cls_gated.GatedResNet(depth=18)
    model.train()
    out = model(torch.randn(1, 3, 64, 64))
    out[-1].mean().backward()
    assert model.layer1[0].gate.fc1.weight.grad is not None


def test_with_cp_keeps_gate_gradients():
    model = seg_gated.GatedResNet(depth=18, with_cp=True)
    model.train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x)[-1].mean().backward()
    probs = collect_gates(model)['layer1.0.gate'].probs
    assert probs.requires_grad
    assert model.layer1[0].gate.fc1.weight.grad is not None


def test_gate_norm_follows_backbone_norm_cfg():
    from mmengine.model import revert_sync_batchnorm
    model = seg_gated.GatedResNet(
        depth=18, norm_cfg=dict(type='SyncBN', requires_grad=True))
    assert isinstance(model.layer1[0].gate.norm, nn.SyncBatchNorm)
    # What mmengine's runner does without DDP: the gates are reverted too.
    model = revert_sync_batchnorm(model)
    assert not any(
        isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    model.train()
    model(torch.randn(1, 3, 64, 64))


def test_collect_gates_keeps_only_the_last_batch():
    model = seg_gated.GatedResNet(depth=18)
    model.train()
    for n in (2, 3, 4):
        model(torch.randn(n, 3, 32, 32))
    gates = collect_gates(model)
    assert len(gates) == 8
    assert all(o.logits.shape[0] == 4 for o in gates.values())
    assert list(gates)[0] == 'layer1.0.gate'
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert not any(o.logits.requires_grad
                   for o in collect_gates(model).values())
    clear_gates(model)
    assert collect_gates(model) == {}


def test_force_gates_values_and_context_manager():
    model = seg_gated.GatedResNet(depth=18)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    force_gates(model, False)
    model(x)
    assert all(o.gates.sum() == 0 for o in collect_gates(model).values())
    with force_gates(model, True):
        model(x)
        assert all(o.gates.min() == 1
                   for o in collect_gates(model).values())
    model(x)  # restored to False
    assert all(o.gates.sum() == 0 for o in collect_gates(model).values())
    force_gates(model, None)
    model(x)
    learned = collect_gates(model)
    assert all(torch.equal(o.gates, (o.logits > 0).float())
               for o in learned.values())

    def draw(seed):
        with force_gates(model, 0.3, seed=seed):
            model(x)
            return torch.cat(
                [o.gates for o in collect_gates(model).values()], 1)

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.25 < a.mean().item() < 0.35
    # independent per sample
    assert not torch.equal(a[0], a[1])
    for bad in (1.5, -0.1, 'open', [1]):
        with pytest.raises(ValueError, match='force_gates value'):
            force_gates(model, bad)
    with pytest.raises(ValueError, match='no ChannelGate'):
        force_gates(nn.Conv2d(1, 1, 1), True)


def _save(tmp_path, state_dict, name='dense.pth'):
    path = str(tmp_path / name)
    torch.save(dict(state_dict=state_dict), path)
    return path


@pytest.mark.parametrize('dense_cls,gated_cls,kwargs', [
    (SegResNetV1c, seg_gated.GatedResNetV1c, dict(depth=50, **PSP_D8)),
    (ClsResNet, cls_gated.GatedResNet, dict(depth=18)),
])
def test_dense_checkpoint_loads_through_init_cfg(tmp_path, dense_cls,
                                                 gated_cls, kwargs):
    dense = dense_cls(**kwargs)
    dense.init_weights()
    path = _save(tmp_path, dense.state_dict())
    gated = gated_cls(
        **kwargs, init_cfg=dict(type='Pretrained', checkpoint=path))
    gated.init_weights()
    gated_state = gated.state_dict()
    for key, value in dense.state_dict().items():
        assert torch.equal(gated_state[key], value), key
    # The gates keep their open initialisation.
    assert gated.layer1[0].gate2.fc2.bias.min() == 3.0 \
        if hasattr(gated.layer1[0], 'gate2') \
        else gated.layer1[0].gate.fc2.bias.min() == 3.0


def test_torchvision_checkpoint_loads_and_matches_torchvision(tmp_path):
    import torchvision
    tv = torchvision.models.resnet18()
    tv.eval()
    state = {k: v for k, v in tv.state_dict().items()
             if not k.startswith('fc.')}
    path = _save(tmp_path, state, 'tv.pth')
    gated = seg_gated.GatedResNet(
        depth=18, init_cfg=dict(type='Pretrained', checkpoint=path))
    gated.init_weights()
    gated.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), force_gates(gated, True):
        ours = gated(x)[-1]
        t = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        theirs = tv.layer4(tv.layer3(tv.layer2(tv.layer1(t))))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize('cls,kwargs,error,match', [
    (seg_gated.GatedResNet, dict(depth=19), KeyError, r'19.*\[18, 34'),
    (cls_gated.GatedResNet, dict(depth=19), KeyError, r'19.*\[18, 34'),
    (GatedResNetCifar, dict(depth=18), KeyError, r'18.*\[20, 32, 44'),
    (seg_gated.GatedResNet, dict(depth=18, gate_cfg=dict(
        hidden_channels=0)), ValueError, 'hidden_channels.*>= 1.*0'),
    (seg_gated.GatedResNet, dict(depth=18, gate_cfg=dict(tau=0)),
     ValueError, 'tau=0 is invalid.*> 0'),
    (seg_gated.GatedResNet, dict(depth=18, gate_cfg=dict(tau=-1.0)),
     ValueError, 'tau'),
    (seg_gated.GatedResNet, dict(depth=18, gate_cfg=dict(stages=(4, ))),
     ValueError, r'\[4\].*0\.\.3'),
    (GatedResNetCifar, dict(depth=20, gate_cfg=dict(stages=(3, ))),
     ValueError, r'\[3\].*0\.\.2'),
    (cls_gated.GatedResNet, dict(depth=50, gate_cfg=dict(
        position='after_conv3')), ValueError, "after_conv3.*'after_conv1'"),
    (seg_gated.GatedResNet, dict(depth=18, gate_cfg=dict(width=3)),
     KeyError, "width.*hidden_channels"),
    (seg_gated.GatedResNet, dict(depth=18, gate_cfg=dict(
        execution='fast')), ValueError, "fast.*'mask', 'skip'"),
])
def test_bad_arguments_fail_at_construction(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_cifar_resnet_architecture():
    for depth in (20, 32, 44, 56, 110):
        model = GatedResNetCifar(depth=depth)
        blocks = sum(len(getattr(model, f'layer{i}')) for i in (1, 2, 3))
        assert blocks == (depth - 2) // 2
    model = GatedResNetCifar(depth=20)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    out = model(torch.randn(2, 3, 32, 32))
    assert out[-1].shape == (2, 64, 8, 8)
    assert [getattr(model, f'layer{i}')[0].conv1.out_channels
            for i in (1, 2, 3)] == [16, 32, 64]


def test_norm_eval_freezes_backbone_norms_but_not_new_gate_norms():
    model = seg_gated.GatedResNet(depth=18, norm_eval=True, frozen_stages=1)
    model.train()
    assert not model.layer2[0].bn1.training
    assert model.layer2[0].gate.norm.training
    # Gates of frozen stages are frozen with their stage.
    assert not model.layer1[0].gate.norm.training
    assert not model.layer1[0].gate.fc1.weight.requires_grad
    assert model.layer2[0].gate.fc1.weight.requires_grad
