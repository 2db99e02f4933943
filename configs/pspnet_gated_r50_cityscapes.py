# Gated PSPNet-R50-D8 on Cityscapes: the recipe of the paper, section 5.2
# (IoU 0.719 at 76.3 % of the PSPNet MACs). The data, optimizer and schedule
# are the dense baseline's; this file adds the gates and their losses.
_base_ = ['./pspnet_r50_cityscapes_150k.py']
custom_imports = dict(imports=['mmgated'], allow_failed_imports=False)

model = dict(
    type='GatedEncoderDecoder',
    backbone=dict(type='GatedResNetV1c', gate_cfg=dict(tau=2 / 3)),
    # Paper: "We only used our batch-shaping loss with a fixed coefficient"
    # lambda = 0.2, Beta(0.6, 0.4) prior; no L0 loss in this recipe.
    batch_shaping_loss=dict(
        type='BatchShapingLoss',
        prior=dict(type='beta', a=0.6, b=0.4),
        loss_weight=0.2,
        # Paper: the loss is summed over the gates.
        reduction='sum'),
    l0_loss=None)

# Report the MAC ratio and the gate categories next to mIoU.
val_evaluator = [
    dict(type='IoUMetric', iou_metrics=['mIoU']),
    dict(type='GateMetric')
]
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

# Paper: "Weight decay for the layers in the gating units was set to 1e-6"
# (1e-4 x 0.01).
optim_wrapper = dict(
    # Two parameter groups (the gates' and the rest) instead of one per
    # parameter, so that the optimizer's step does not cost per parameter.
    constructor='MergedGroupsOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={'.gate': dict(decay_mult=0.01)}))
# Holds the weight and logs it as bs_weight, like the annealed recipes.
custom_hooks = [
    dict(type='BatchShapingWeightHook', by_epoch=False)
]
