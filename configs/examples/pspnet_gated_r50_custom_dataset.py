# The gated PSPNet recipe on your own segmentation dataset: everything but
# the data (model, gates, batch-shaping loss, optimizer, schedule) is
# inherited from the Cityscapes recipe. See docs/new_dataset.md.
#
# Expected layout (mmseg's BaseSegDataset: an image and its label map share
# the file name up to the suffix):
#
#   data/my_seg_dataset/img_dir/train/xxx.jpg   ann_dir/train/xxx.png
#   data/my_seg_dataset/img_dir/val/yyy.jpg     ann_dir/val/yyy.png
#
# Label maps are single-channel PNGs holding the class index of each pixel
# (0 .. num_classes-1) and 255 where no label applies.
_base_ = ['../pspnet_gated_r50_cityscapes.py']

data_root = 'data/my_seg_dataset'
# The class names in label-index order; also sets num_classes below.
classes = ('background', 'road', 'vehicle')
num_classes = len(classes)

model = dict(
    decode_head=dict(num_classes=num_classes),
    auxiliary_head=dict(num_classes=num_classes))

dataset_type = 'BaseSegDataset'
dataset = dict(
    type=dataset_type,
    data_root=data_root,
    metainfo=dict(classes=classes),
    img_suffix='.jpg',
    seg_map_suffix='.png',
    # True when index 0 means "unlabelled" and the classes start at 1.
    reduce_zero_label=False)
# The pipelines (the paper's random resize around (2048, 1024) and
# 448x672 crop) come from the base; override train_pipeline and
# test_pipeline here if your images are much smaller.
train_dataloader = dict(
    dataset=dict(
        data_prefix=dict(
            img_path='img_dir/train', seg_map_path='ann_dir/train'),
        **dataset))
val_dataloader = dict(
    dataset=dict(
        data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
        **dataset))
test_dataloader = val_dataloader
