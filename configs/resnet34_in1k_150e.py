# Dense ResNet-34 on ImageNet under the paper's schedule (section 5.2), the
# baseline of ResNet34-BAS.
_base_ = ['mmpretrain::resnet/resnet34_8xb32_in1k.py']

# Paper: mini-batch 256 on a single GPU. On N GPUs the learning rate scales
# with the total batch 256 * N (auto_scale_lr), or set batch_size=256 // N.
train_dataloader = dict(batch_size=256)
auto_scale_lr = dict(enable=True, base_batch_size=256)
# Paper: Nesterov momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at
# epochs 60, 90 and 120, 150 epochs.
optim_wrapper = dict(
    optimizer=dict(
        type='SGD', lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4))
param_scheduler = dict(
    type='MultiStepLR', by_epoch=True, milestones=[60, 90, 120], gamma=0.1)
train_cfg = dict(max_epochs=150)
