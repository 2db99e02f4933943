# Dense PSPNet-R50-D8 on Cityscapes under the paper's recipe (section 5.2),
# the baseline of the gated model (paper: IoU 0.706 from scratch).
_base_ = ['mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py']

# Paper: "crop-size of 448x672".
crop_size = (448, 672)
data_preprocessor = dict(size=crop_size)
# Paper: "trained from scratch".
model = dict(data_preprocessor=data_preprocessor, pretrained=None)

# Paper: "random mirror and resize with a factor between 0.5 and 2" (no
# photometric distortion).
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomResize',
        scale=(2048, 1024),
        ratio_range=(0.5, 2.0),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
# Paper: mini-batch 6, here 2 GPUs x 3 images (tools/dist_train.sh CFG 2).
# On another number of GPUs the learning rate scales with the total batch
# (auto_scale_lr); or set train_dataloader.batch_size=6 on 1 GPU, 2 on 3.
train_dataloader = dict(batch_size=3, dataset=dict(pipeline=train_pipeline))
auto_scale_lr = dict(enable=True, base_batch_size=6)

# Paper: SGD, momentum 0.9, weight decay 1e-4, lr 2e-2 with poly(0.9) over
# 150k iterations.
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4))
param_scheduler = [
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=0.9,
        begin=0,
        end=150000,
        by_epoch=False)
]
train_cfg = dict(max_iters=150000, val_interval=15000)
default_hooks = dict(checkpoint=dict(interval=15000))
