# tiny_retinanet_dgms_hook.py with the model built converted by DGMSDetector,
# as the shipped DGMS configs do. Tests set load_from.
_base_ = ['./tiny_retinanet_dgms_hook.py']

dgms = dict(bits=4)
model = dict(type='DGMSDetector', detector_type='RetinaNet', dgms=dgms)
