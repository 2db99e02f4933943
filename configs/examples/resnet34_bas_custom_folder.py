# The ResNet34-BAS recipe on your own image-classification folder dataset:
# everything but the data (model, gates, batch-shaping and L0 losses and
# their schedules, optimizer) is inherited from the ImageNet recipe. See
# docs/new_dataset.md.
#
# Expected layout (mmpretrain's CustomDataset; one folder per class, the
# labels are the folder names in sorted order):
#
#   data/my_cls_dataset/train/<class>/*.jpg
#   data/my_cls_dataset/val/<class>/*.jpg
_base_ = ['../resnet34_bas_in1k.py']

data_root = 'data/my_cls_dataset'
# The number of class folders under train/.
num_classes = 3

model = dict(head=dict(num_classes=num_classes))
data_preprocessor = dict(num_classes=num_classes)

# _delete_: the base's ImageNet dataset has a `split` argument, which
# CustomDataset does not take. The pipelines are the ImageNet recipe's.
train_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        data_prefix='train',
        pipeline={{_base_.train_pipeline}}))
val_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        data_prefix='val',
        pipeline={{_base_.test_pipeline}}))
test_dataloader = val_dataloader
# Top-5 accuracy needs at least 5 classes. The list replaces the base's
# whole list, so it repeats the GateMetric (MAC ratio, gate categories).
val_evaluator = [
    dict(type='Accuracy', topk=(1, 5) if num_classes >= 5 else (1, )),
    dict(type='GateMetric')
]
test_evaluator = val_evaluator
