# ResNet20-BAS on CIFAR-10: the recipe of the paper, section 5.1. Data,
# optimizer and schedule are the dense baseline's; this file adds the gates
# and their losses.
_base_ = ['./resnet20_cifar10.py']

# gamma of the L0 loss (Eq. 5). The paper's trade-off sweep is
# {1, 2, 5, 10, 15, 20}e-2: --cfg-options l0_gamma=0.1
l0_gamma = 0.05

model = dict(
    type='GatedImageClassifier',
    backbone=dict(type='GatedResNetCifar', gate_cfg=dict(tau=2 / 3)),
    # Paper: lambda_0 = 0.75 with a Beta(0.6, 0.4) prior.
    batch_shaping_loss=dict(
        type='BatchShapingLoss',
        prior=dict(type='beta', a=0.6, b=0.4),
        loss_weight=0.75,
        # Paper: the loss is summed over the gates.
        reduction='sum'),
    l0_loss=dict(type='GateL0Loss', loss_weight=0.0))

# Report the MAC ratio and the gate categories next to the accuracy.
val_evaluator = [dict(type='Accuracy', topk=(1, )), dict(type='GateMetric')]
test_evaluator = val_evaluator
# Default hooks, so that a config that replaces custom_hooks keeps them:
# GateMetricHook gives GateMetric the model it counts MACs with;
# FiniteInputsHook stops training on a batch with NaN or infinity;
# CheckpointIntegrityHook writes checkpoints atomically, with a checksum
# (also for `mim train`, which does not go through tools/train.py).
default_hooks = dict(
    gate_metric=dict(type='GateMetricHook'),
    finite_inputs=dict(type='FiniteInputsHook'),
    checkpoint_integrity=dict(type='CheckpointIntegrityHook'))
# Paper: "No weight decay was applied on the parameters of the gating
# modules."
optim_wrapper = dict(
    # Two parameter groups (the gates' and the rest) instead of one per
    # parameter, so that the optimizer's step does not cost per parameter.
    constructor='MergedGroupsOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={'.gate': dict(decay_mult=0.0)}))
custom_hooks = [
    # Paper: lambda annealed linearly from 0.75 to 0 by epoch 100.
    dict(type='BatchShapingWeightHook', end=100),
    # Paper: L0 from epoch 100, rising linearly to gamma at epoch 300.
    dict(type='L0WeightHook', start=100, end=300),
]
