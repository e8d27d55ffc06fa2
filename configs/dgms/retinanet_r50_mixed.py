# RetinaNet R50-FPN fine-tuned with DGMS at mixed precision on COCO: 8 bits
# at both ends of the quantized network, 2-3 bits in between, 3.08 bits per
# weight on average. Layer selection, checkpoint and schedule are those of
# retinanet_r50_4bit.py.
#
# Why this split (shares of the 31.4 M quantized weights):
# - backbone.layer1 (0.7 %) reads the stem's low-level features, and every
#   later layer inherits its error. The FPN lateral convs and the P3-P5 and
#   P7 output convs (10.4 %) write the features that the head reads
#   directly. Both are a small share, so 8 bits costs little size.
# - backbone.layer4 (47.5 %) contains about half of the weights, so its bit
#   width sets the model size: it gets 2 bits.
# - The P6 conv neck.fpn_convs.3 (15.0 %, 3x3 from the 2048-channel C5)
#   feeds only the coarsest level; it stays at 3 bits like layer2 and
#   layer3 (26.4 %).
# The first matching layer_bits pattern sets a layer's bits, so the P6
# pattern comes before 'neck.*'.
# NOTE: this split is a design choice; its COCO mAP against the uniform
# 3-bit config has not been measured.
_base_ = ['./retinanet_r50_4bit.py']

bits = 3
# The model is built converted (DGMSDetector) and the hook trains it, so
# both get the same settings.
dgms = dict(
    bits=bits,
    layer_bits={
        'backbone.layer1.*': 8,
        'neck.fpn_convs.3.*': 3,
        'neck.*': 8,
        'backbone.layer4.*': 2,
    })
model = dict(dgms=dgms)
custom_hooks = [dict(type='DGMSHook', **dgms)]
