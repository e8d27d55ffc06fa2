# DGMS 4-bit fine-tuning of the full-precision tree detector. Every conv of
# the MobileNetV2 backbone and the FPN except the stem is quantized, and the
# RetinaNet head stays in full precision.
_base_ = ['./retinanet_mnv2_fpn_trees_fp.py']

# The full-precision checkpoint to fine-tune (written by the demo's first
# stage); override with --cfg-options load_from=PATH.
load_from = 'work_dirs/demo/fp/epoch_20.pth'
bits = 4
# One set of DGMS settings for the model and the hook. DGMSDetector builds
# the RetinaNet with its conv layers already quantized, so init_detector,
# DetInferencer and tools/test.py load a checkpoint of this config into the
# model that training saved it from. DGMSHook then finds the model converted,
# checks that its own settings agree, and handles the training.
dgms = dict(bits=bits)
model = dict(
    type='DGMSDetector',
    detector_type='RetinaNet',
    dgms=dgms,
    backbone=dict(init_cfg=None))

custom_hooks = [dict(type='DGMSHook', **dgms)]

max_epochs = 6
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
# Fine-tuning uses a 10x smaller learning rate than full-precision training.
# The mixture parameters get a 10x higher rate, so the codebook moves within
# a short schedule, and no weight decay, because decaying logarithms, logits
# and means towards 0 has no meaning.
# NOTE: gradient clipping at max_norm=10 comes from the full-precision
# config. DGMS gradient norms run at 25-40 on this model, because the
# weights' gradients through the indicator peak near decision boundaries,
# so the clipping is active in every step.
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4),
    paramwise_cfg=dict(
        custom_keys={'.mixture.': dict(lr_mult=10.0, decay_mult=0.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
         end=20),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs,
         T_max=max_epochs, eta_min=1e-6)
]
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=max_epochs,
                    max_keep_ckpts=1))
