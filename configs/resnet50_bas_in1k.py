# ResNet50-BAS on ImageNet: the ResNet34-BAS recipe with a ResNet-50 (not in
# the paper). Bottleneck gates sit after conv2 (see mmgated.models.blocks).
_base_ = ['./resnet34_bas_in1k.py']
model = dict(
    backbone=dict(depth=50, gate_cfg=dict(position='after_conv2')),
    head=dict(in_channels=2048))
