# DGMS 2-bit fine-tuning of the full-precision tree detector (4 codebook
# values per layer, one of them 0).
_base_ = ['./retinanet_mnv2_fpn_trees_dgms4.py']

bits = 2
dgms = dict(bits=bits)
model = dict(dgms=dgms)
custom_hooks = [dict(type='DGMSHook', **dgms)]
