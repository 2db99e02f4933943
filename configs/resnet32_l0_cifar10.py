# ResNet32-L0, the ablation of paper section 5.3.
_base_ = ['./resnet20_l0_cifar10.py']
model = dict(backbone=dict(depth=32))
