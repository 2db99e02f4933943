# Dense CIFAR ResNet-20 under the paper's CIFAR-10 schedule (section 5.1),
# the baseline of ResNet20-BAS.
_base_ = ['mmpretrain::resnet/resnet18_8xb16_cifar10.py']
custom_imports = dict(imports=['mmgated'], allow_failed_imports=False)

model = dict(
    backbone=dict(_delete_=True, type='ResNetCifar', depth=20),
    head=dict(in_channels=64))
# Paper: mini-batch 256 (here on 1 GPU); random crop and horizontal flip
# (the base's). On N GPUs the learning rate scales with the total batch
# 256 * N (auto_scale_lr), or set batch_size=256 // N.
train_dataloader = dict(batch_size=256)
val_dataloader = dict(batch_size=256)
test_dataloader = dict(batch_size=256)
# Paper: Nesterov momentum 0.9, weight decay 5e-4, lr 0.1 divided by 10 at
# epochs 300, 375 and 450, 500 epochs.
optim_wrapper = dict(
    optimizer=dict(
        type='SGD', lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
param_scheduler = dict(
    type='MultiStepLR', by_epoch=True, milestones=[300, 375, 450], gamma=0.1)
train_cfg = dict(max_epochs=500)
auto_scale_lr = dict(enable=True, base_batch_size=256)
