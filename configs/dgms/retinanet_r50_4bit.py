# RetinaNet R50-FPN fine-tuned with DGMS at 4 bits per weight on COCO.
#
# Every conv of the ResNet-50 backbone and the FPN except the stem conv is
# quantized (a learned 16-entry codebook per layer, one entry fixed at 0);
# the RetinaNet head stays in full precision.
#
# load_from is the full-precision model-zoo checkpoint that DGMS starts
# from. Download it from the MMDetection model zoo (RetinaNet R-50-FPN 1x,
# "retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth") into checkpoints/, or
# pass another path with --cfg-options load_from=PATH.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']

custom_imports = dict(imports=['mmdgms'], allow_failed_imports=False)

load_from = 'checkpoints/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth'
bits = 4

# The stem stays frozen and in full precision, while layer1 is trained and
# quantized. A frozen stage runs in eval mode, where DGMS layers use hard
# weights and their mixtures would not learn. load_from provides every
# weight, so the ImageNet initialisation is not needed.
# DGMSDetector builds the detector with its conv layers quantized (see
# configs/trees/retinanet_mnv2_fpn_trees_dgms4.py), and the hook uses the
# same settings.
dgms = dict(bits=bits)
model = dict(
    type='DGMSDetector',
    detector_type='RetinaNet',
    dgms=dgms,
    backbone=dict(frozen_stages=0, init_cfg=None))

custom_hooks = [dict(type='DGMSHook', **dgms)]

# Fine-tuning schedule: 6 epochs at a tenth of the 1x learning rate with a
# cosine decay. The mixture parameters get a 10x larger rate (the codebook
# must move within a short schedule) and no weight decay (decaying logarithms
# of standard deviations, mixing logits or codebook means towards 0 has no
# meaning).
max_epochs = 6
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.001, momentum=0.9, weight_decay=0.0001),
    paramwise_cfg=dict(
        custom_keys={'.mixture.': dict(lr_mult=10.0, decay_mult=0.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
         end=500),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs,
         T_max=max_epochs, eta_min=1e-5)
]
