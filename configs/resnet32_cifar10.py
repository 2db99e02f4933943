# Dense CIFAR ResNet-32 under the paper's CIFAR-10 schedule.
_base_ = ['./resnet20_cifar10.py']
model = dict(backbone=dict(depth=32))
