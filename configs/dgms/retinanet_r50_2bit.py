# RetinaNet R50-FPN fine-tuned with DGMS at 2 bits per weight on COCO: a
# 4-entry codebook per quantized layer, one entry fixed at 0. Layer
# selection, checkpoint and schedule are those of retinanet_r50_4bit.py.
_base_ = ['./retinanet_r50_4bit.py']

bits = 2
# The model is built converted (DGMSDetector) and the hook trains it, so
# both get the same settings.
dgms = dict(bits=bits)
model = dict(dgms=dgms)
custom_hooks = [dict(type='DGMSHook', **dgms)]
