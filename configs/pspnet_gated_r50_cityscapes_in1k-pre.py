# Gated PSPNet started from an ImageNet-pretrained ResNet-50-V1c (paper 5.2:
# IoU 0.744 at 76.5 % of the PSPNet MACs). The gating modules are missing
# from the dense checkpoint and start open (mmgated.models.ChannelGate).
_base_ = ['./pspnet_gated_r50_cityscapes.py']
model = dict(pretrained='open-mmlab://resnet50_v1c')
