# ResNet18-BAS on ImageNet (paper section 5.2): the ResNet34-BAS recipe with
# a ResNet-18.
_base_ = ['./resnet34_bas_in1k.py']
model = dict(backbone=dict(depth=18))
