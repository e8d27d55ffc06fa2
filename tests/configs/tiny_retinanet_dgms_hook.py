# DGMS fine-tuning of tiny_retinanet_fp.py at 4 bits in the hook-only form:
# the model is built in full precision and DGMSHook converts it when the
# runner starts. Tests set load_from.
_base_ = ['./tiny_retinanet_fp.py']

dgms = dict(bits=4)
custom_hooks = [dict(type='DGMSHook', **dgms)]
max_epochs = 2
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
# A layer's temperature gradient comes only from the few weights near a
# decision boundary, and it is as small as 1e-11 on the P6 conv of 128 px
# inputs. With Adam's default eps of 1e-8, such a step would vanish below
# float32 resolution.
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4, eps=1e-12),
    paramwise_cfg=dict(
        custom_keys={'.mixture.': dict(lr_mult=10.0, decay_mult=0.0)}))
# Both backends that the logging tests read back. Without a fixed name, each
# runner gets its own visualizer (named after the run) writing to its own
# work dir, instead of reusing the first one built in the process.
visualizer = dict(
    _delete_=True,
    type='DetLocalVisualizer',
    vis_backends=[
        dict(type='LocalVisBackend'),
        dict(type='TensorboardVisBackend')
    ])
