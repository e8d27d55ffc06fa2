"""A model-building entry that returns a detector with DGMS conv layers.

``MODELS.build(dict(type='DGMSDetector', detector_type='RetinaNet',
dgms=dict(bits=4), backbone=..., ...))`` builds the RetinaNet and converts
its conv layers before anything loads a checkpoint into it. Everything that
builds ``config.model`` therefore gets the quantized model: MMEngine's
Runner, ``mmdet.apis.init_detector``, ``DetInferencer`` and the tools of
this package. The returned object is the detector itself, not a wrapper, so
its state-dict keys are those of a model converted by ``DGMSHook``.
"""
from typing import List, Optional

from mmengine.logging import print_log
from mmengine.registry import MODELS
from torch import nn

from ..convert import (CONVERSION_CONFIG_ATTR, CONVERTED_FLAG, DGMSConfig,
                       convert_model, dgms_layers)

# Attribute of a built detector: names of the DGMS layers whose mixture the
# last loaded state dict did not contain.
UNLOADED_MIXTURES_ATTR = '_dgms_unloaded_mixtures'


@MODELS.register_module('DGMSDetector')
def build_dgms_detector(detector_type: str,
                        dgms: Optional[dict] = None,
                        **detector_cfg) -> nn.Module:
    """Build a detector and replace its selected conv layers by DGMS convs.

    Args:
        detector_type (str): registry name of the detector, e.g.
            ``'RetinaNet'``; the remaining keyword arguments are its config.
        dgms (dict, optional): the conversion settings, the fields of
            :class:`~mmdgms.convert.DGMSConfig` (``bits``, ``include``,
            ``exclude``, ``skip_stem``, ``layer_bits`` and the mixture
            settings). Default: None, which uses the DGMSConfig defaults.
        **detector_cfg: the detector's own config (backbone, neck, heads,
            data_preprocessor, train_cfg, test_cfg, ...).

    Returns:
        nn.Module: the detector, with uninitialised mixtures. Training
        initialises them through ``DGMSHook``; inference loads them from a
        DGMS checkpoint.

    Note:
        A DGMS config that trains gives ``DGMSHook`` the same settings.
        The hook finds the model converted and checks that the settings
        agree, instead of converting again.
    """
    if not isinstance(detector_type, str) or not detector_type:
        raise ValueError(
            'DGMSDetector needs detector_type, the registry name of the '
            f"detector to quantize (e.g. 'RetinaNet'), got {detector_type!r}")
    dgms_cfg = _conversion_config(dgms)

    detector = MODELS.build(dict(type=detector_type, **detector_cfg))
    layers = convert_model(detector, dgms_cfg)
    setattr(detector, CONVERTED_FLAG, True)
    setattr(detector, CONVERSION_CONFIG_ATTR, dgms_cfg)
    setattr(detector, UNLOADED_MIXTURES_ATTR, [])
    detector.register_load_state_dict_pre_hook(_record_unloaded_mixtures)
    detector.register_forward_pre_hook(_check_mixtures_before_eval)

    num_weights = sum(layer.weight.numel() for layer in layers.values())
    widths = sorted({layer.bits for layer in layers.values()})
    if len(widths) > 1:
        average = sum(layer.bits * layer.weight.numel()
                      for layer in layers.values()) / num_weights
        bits = (f'{average:.3f} bits per weight on average (layers at '
                f'{", ".join(map(str, widths))} bits)')
    else:
        bits = f'{dgms_cfg.bits} bits'
    print_log(
        f'DGMS: built {detector_type} with {len(layers)} quantized conv '
        f'layers ({num_weights / 1e6:.2f} M weights) at {bits}',
        logger='current')
    return detector


def _conversion_config(dgms: Optional[dict]) -> DGMSConfig:
    if dgms is None:
        return DGMSConfig()
    if isinstance(dgms, DGMSConfig):
        return dgms
    if not isinstance(dgms, dict):
        raise ValueError('DGMSDetector(dgms=...) must be a dict of DGMS '
                         f'settings, e.g. dict(bits=4), got {dgms!r}')
    try:
        return DGMSConfig(**dgms)
    except TypeError as error:
        valid = ', '.join(DGMSConfig.__dataclass_fields__)
        raise ValueError(f'invalid DGMSDetector(dgms={dict(dgms)!r}): '
                         f'{error}. Valid keys: {valid}') from None


def _record_unloaded_mixtures(module, state_dict, prefix, *args) -> None:
    """Store which DGMS layers the state dict being loaded has no mixture for.

    A full-precision checkpoint has none: that is the normal start of DGMS
    fine-tuning, so the check waits until the model is run in eval mode.
    """
    loaded = {
        key[len(prefix):].partition('.mixture.')[0]
        for key in state_dict if key.startswith(prefix) and '.mixture.' in key
    }
    setattr(module, UNLOADED_MIXTURES_ATTR,
            [name for name in dgms_layers(module) if name not in loaded])


def _check_mixtures_before_eval(module, args) -> None:
    unloaded: List[str] = getattr(module, UNLOADED_MIXTURES_ATTR, [])
    if not unloaded or module.training:
        return
    layers = dgms_layers(module)
    missing = [
        name for name in unloaded
        if name in layers and not layers[name].mixture.initialized
    ]
    if not missing:
        # Initialised since the load (DGMSHook does that before training).
        setattr(module, UNLOADED_MIXTURES_ATTR, [])
        return
    raise RuntimeError(
        f'the checkpoint loaded into this DGMS model has no Gaussian mixture '
        f'for {len(missing)} of its {len(layers)} quantized layers (e.g. '
        f'{missing[0]}), so it is not a checkpoint of a DGMS run with this '
        'config; most likely it is a full-precision checkpoint. Run it with '
        'the config it was trained with (MMEngine stores that config in '
        "checkpoint['meta']['cfg'], its name in "
        "checkpoint['meta']['experiment_name']), or fine-tune it with this "
        'DGMS config first (tools/train.py with load_from set to it)')
