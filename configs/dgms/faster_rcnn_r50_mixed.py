# Faster R-CNN R50-FPN fine-tuned with DGMS at mixed precision on COCO:
# 8 bits at both ends of the quantized network, 2-3 bits in between, 3.11
# bits per weight on average. Layer selection, checkpoint and schedule are
# those of faster_rcnn_r50_4bit.py.
#
# Why this split (shares of the 26.8 M quantized weights):
# - backbone.layer1 (0.8 %) reads the stem's low-level features, and every
#   later layer inherits its error. The FPN (12.5 %) writes the features
#   that the RPN and RoI heads read directly. Both are a small share, so 8
#   bits costs little size.
# - backbone.layer4 (55.8 %) contains more than half of the weights, so its bit
#   width sets the model size: it gets 2 bits.
# - layer2 and layer3 (30.9 %) get 3 bits.
# NOTE: this split is a design choice; its COCO mAP against the uniform
# 3-bit config has not been measured.
_base_ = ['./faster_rcnn_r50_4bit.py']

bits = 3
# The model is built converted (DGMSDetector) and the hook trains it, so
# both get the same settings.
dgms = dict(
    bits=bits,
    layer_bits={
        'backbone.layer1.*': 8,
        'neck.*': 8,
        'backbone.layer4.*': 2,
    })
model = dict(dgms=dgms)
custom_hooks = [dict(type='DGMSHook', **dgms)]
