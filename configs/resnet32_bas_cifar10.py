# ResNet32-BAS on CIFAR-10 (paper section 5.1).
_base_ = ['./resnet20_bas_cifar10.py']
model = dict(backbone=dict(depth=32))
