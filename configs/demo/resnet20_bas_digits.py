# The README demo: ResNet20-BAS (paper section 5.1) on scikit-learn's
# handwritten digits (1,797 8x8 scans, 10 classes, shipped inside the
# scikit-learn package), written by tools/demo.py as a folder dataset of
# 16x16 images. The recipe is the CIFAR-10 one compressed into 24 epochs;
# only the dataset, the weights and the schedule lengths differ.
_base_ = ['../resnet20_bas_cifar10.py']

data_root = 'work_dirs/demo/data'
# 552 iterations leave the gates little time to settle after the losses
# move them, so both weights are gentler than the paper's (0.75 and
# 0.01-0.2 over 500 epochs). Chosen with tools/analysis_tools/paper_study.py
# (docs/results.md): 97.8 % [97.1, 98.5] top-1 at 0.577 [0.534, 0.621] of
# the dense MACs over seeds 0-2 (the dense ResNet-20 trained as long: 99.3 %).
l0_gamma = 0.003

model = dict(
    data_preprocessor=dict(
        num_classes=10, mean=[127.5] * 3, std=[127.5] * 3, to_rgb=False),
    batch_shaping_loss=dict(loss_weight=0.2),
    head=dict(num_classes=10))

# Digits are not mirror-symmetric: random crop only, no flip.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomCrop', crop_size=16, padding=2),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        data_prefix='train',
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=120,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        data_prefix='val',
        pipeline=test_pipeline))
test_dataloader = val_dataloader

# The learning rate is the recipe's at this batch of 64, not scaled.
auto_scale_lr = dict(enable=False)

# 24 epochs: batch-shaping 0.2 -> 0 by epoch 8, L0 from epoch 8 to 16, the
# learning rate divided by 10 at epochs 16 and 20.
param_scheduler = dict(milestones=[16, 20])
train_cfg = dict(max_epochs=24, val_interval=24)
custom_hooks = [
    dict(type='BatchShapingWeightHook', end=8),
    dict(type='L0WeightHook', start=8, end=16),
]
default_hooks = dict(
    logger=dict(interval=10), checkpoint=dict(interval=24, max_keep_ckpts=1))
# A fixed seed makes the demo's numbers reproducible on a given machine.
randomness = dict(seed=0, deterministic=False)
