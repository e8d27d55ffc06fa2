# A small RetinaNet (MobileNetV2 + a 16-channel FPN and head, 128 px images,
# 8 training tiles) on the tree data, for tests of the full runner flow on
# CPU. The backbone keeps its full width: with K = 16 components, a layer of
# a few dozen weights has clusters of a handful of weights whose posterior
# is one-hot everywhere, so its mixture gets no gradient; real layers have
# hundreds of weights and more.
# Tests write a config that inherits this one and sets data_root.
_base_ = ['../../configs/trees/retinanet_mnv2_fpn_trees_fp.py']

image_size = 128
model = dict(
    backbone=dict(init_cfg=None),
    neck=dict(out_channels=16),
    bbox_head=dict(in_channels=16, feat_channels=16, stacked_convs=1),
    # Keep every candidate so that evaluations always have detections to
    # compare, however little the model has trained.
    test_cfg=dict(score_thr=0.0, max_per_img=100))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size=4,
    dataset=dict(indices=8, pipeline=train_pipeline,
                 filter_cfg=dict(filter_empty_gt=True, min_size=1)))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

max_epochs = 1
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3))
