# ResNet20-L0, the ablation of paper section 5.3: the ResNet20-BAS recipe
# without the batch-shaping loss (L0 loss only).
_base_ = ['./resnet20_bas_cifar10.py']
model = dict(batch_shaping_loss=None)
custom_hooks = [dict(type='L0WeightHook', start=100, end=300)]
