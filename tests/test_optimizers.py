"""MergedGroupsOptimWrapperConstructor against mmengine's default
constructor: the same settings per parameter, the same updates, fewer
groups."""
import copy

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from torch import nn

from mmgated.engine import merge_param_groups

PARAMWISE = dict(
    custom_keys={'.gate': dict(decay_mult=0.0)},
    norm_decay_mult=0.5,
    bias_lr_mult=2.0)


def gated_classifier():
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    return MODELS.build(
        dict(
            type='GatedImageClassifier',
            backbone=dict(type='GatedResNetCifar', depth=20),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=3, in_channels=64),
            batch_shaping_loss=dict(type='BatchShapingLoss',
                                    loss_weight=0.5),
            l0_loss=dict(type='GateL0Loss', loss_weight=0.1)))


def build(model, constructor=None, paramwise_cfg=PARAMWISE, **optimizer):
    cfg = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9,
                              weight_decay=1e-4, **optimizer))
    if paramwise_cfg is not None:
        cfg['paramwise_cfg'] = copy.deepcopy(paramwise_cfg)
    if constructor is not None:
        cfg['constructor'] = constructor
    return build_optim_wrapper(model, cfg).optimizer


def settings_per_parameter(optimizer):
    """id(parameter) -> the settings of its group."""
    settings = {}
    for group in optimizer.param_groups:
        for param in group['params']:
            assert id(param) not in settings, 'a parameter in two groups'
            settings[id(param)] = {
                k: v
                for k, v in group.items() if k != 'params'
            }
    return settings


def test_merge_param_groups():
    a, b, c, d = (nn.Parameter(torch.zeros(1)) for _ in range(4))
    groups = [
        dict(params=[a]),
        dict(params=[b], lr=0.1),
        dict(params=[c]),
        dict(params=[d], lr=0.1, weight_decay=0.0),
        dict(params=[], lr=0.1),
    ]
    before = copy.deepcopy([{k: v for k, v in g.items() if k != 'params'}
                            for g in groups])
    merged = merge_param_groups(groups)
    assert [[id(p) for p in g['params']] for g in merged] == [
        [id(a), id(c)], [id(b)], [id(d)]
    ]
    assert [{k: v for k, v in g.items() if k != 'params'}
            for g in merged] == [{}, dict(lr=0.1),
                                 dict(lr=0.1, weight_decay=0.0)]
    # The given groups are left as they were.
    assert [{k: v for k, v in g.items() if k != 'params'}
            for g in groups] == before
    assert [len(g['params']) for g in groups] == [1, 1, 1, 1, 0]
    assert merge_param_groups([]) == []


def test_constructor_keeps_the_default_settings():
    model = gated_classifier()
    default = build(model)
    merged = build(model, 'MergedGroupsOptimWrapperConstructor')
    expected = settings_per_parameter(default)
    got = settings_per_parameter(merged)
    assert got == expected
    assert set(got) == {id(p) for p in model.parameters()}
    # The default constructor gives each parameter a group; merged, there
    # is one group per distinct setting: gates, norms, biases, the rest.
    assert len(default.param_groups) == len(list(model.parameters()))
    distinct = []
    for settings in expected.values():
        if settings not in distinct:
            distinct.append(settings)
    assert len(merged.param_groups) == len(distinct) == 4


def test_constructor_steps_as_the_default():
    model = gated_classifier()
    copies = [copy.deepcopy(model) for _ in range(2)]
    optimizers = [
        build(copies[0]),
        build(copies[1], 'MergedGroupsOptimWrapperConstructor')
    ]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen)
                 for p in model.parameters()]
        for net, optimizer in zip(copies, optimizers):
            for param, grad in zip(net.parameters(), grads):
                param.grad = grad.clone()
            optimizer.step()
    for ref, got in zip(copies[0].parameters(), copies[1].parameters()):
        assert torch.equal(ref, got)
    assert not torch.equal(next(model.parameters()),
                           next(copies[1].parameters()))


def test_constructor_without_paramwise_cfg_is_one_group():
    model = gated_classifier()
    optimizer = build(model, 'MergedGroupsOptimWrapperConstructor',
                      paramwise_cfg=None)
    assert len(optimizer.param_groups) == 1
    assert len(optimizer.param_groups[0]['params']) == len(
        list(model.parameters()))


def test_constructor_skips_frozen_and_duplicate_parameters():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.BatchNorm1d(2), shared)
    model[1].weight.requires_grad_(False)
    paramwise = dict(PARAMWISE, bypass_duplicate=True)
    default = build(model, paramwise_cfg=paramwise)
    merged = build(model, 'MergedGroupsOptimWrapperConstructor',
                   paramwise_cfg=paramwise)
    assert settings_per_parameter(merged) == settings_per_parameter(default)
    assert len(settings_per_parameter(merged)) == 3


@pytest.mark.parametrize('scope', ['mmpretrain', 'mmseg'])
def test_constructor_is_found_from_downstream_scopes(scope):
    init_default_scope(scope)
    optimizer = build(nn.Linear(2, 2), 'MergedGroupsOptimWrapperConstructor')
    # weight and bias (bias_lr_mult) differ.
    assert len(optimizer.param_groups) == 2


def test_groups_from_a_config_are_plain_dicts():
    """The Runner passes ConfigDicts; torch.compile (``compile=True``)
    cannot trace an optimizer step whose groups are ConfigDicts."""
    from mmengine.config import ConfigDict
    cfg = ConfigDict(
        constructor='MergedGroupsOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
        paramwise_cfg=PARAMWISE)
    optimizer = build_optim_wrapper(gated_classifier(), cfg).optimizer
    assert [type(group) for group in optimizer.param_groups
            ] == [dict] * len(optimizer.param_groups)
