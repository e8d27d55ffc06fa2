"""Check that a checkpoint fits the model that a config builds.

A DGMS checkpoint loaded into a full-precision model loads without an error
(MMEngine only warns about the unexpected mixture keys) and then runs the
latent full-precision weights instead of the codebook. A full-precision
checkpoint loaded into a DGMS model leaves every mixture uninitialised. The
checks here turn both into an error that names the config to use.
"""
import os.path as osp
import re
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from mmengine.config import Config
from torch import nn

from ..convert import dgms_layers

# MMEngine names an experiment '<config file name>_<YYYYMMDD_HHMMSS>'.
_TIMESTAMP = re.compile(r'_\d{8}_\d{6}$')
EXAMPLE_DGMS_CONFIG = 'configs/trees/retinanet_mnv2_fpn_trees_dgms4.py'


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model that the given config builds."""


@dataclass
class CheckpointSummary:
    """The DGMS-related contents of a checkpoint file.

    Args:
        path (str): the checkpoint file.
        dgms_layers (dict): name -> bits of every layer with a stored
            mixture; bits is None when the checkpoint's meta does not list
            the layer. Empty for a full-precision checkpoint.
        config_name (str, optional): the name of the config it was trained
            with, from ``meta['experiment_name']``.
        has_config_text (bool): whether ``meta['cfg']`` stores that config.
    """
    path: str
    dgms_layers: Dict[str, Optional[int]] = field(default_factory=dict)
    config_name: Optional[str] = None
    has_config_text: bool = False

    @property
    def is_dgms(self) -> bool:
        return bool(self.dgms_layers)

    def trained_with(self) -> str:
        """Return a phrase that names the training config, or ''."""
        if self.config_name is None:
            return ''
        where = "named in checkpoint['meta']['experiment_name']"
        if self.has_config_text:
            where += ", with its full text in checkpoint['meta']['cfg']"
        return f', {self.config_name!r} ({where})'


def read_checkpoint_summary(path: str) -> CheckpointSummary:
    """Read the DGMS layers and the training config name of a checkpoint.

    The file is memory-mapped, so the tensors are not read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file contains no state dict.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    checkpoint = torch.load(path, map_location='cpu', weights_only=True,
                            mmap=True)
    state_dict = checkpoint.get('state_dict', checkpoint) if isinstance(
        checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f'{path} contains no state dict, so it is not a '
                         'model checkpoint')

    meta = checkpoint.get('meta') or {}
    meta_bits = (meta.get('dgms') or {}).get('layers') or {}
    names = {
        key.partition('.mixture.')[0]
        for key in state_dict if '.mixture.' in key
    }
    experiment = meta.get('experiment_name')
    config_name = (_TIMESTAMP.sub('', experiment)
                   if isinstance(experiment, str) else None)
    return CheckpointSummary(
        path=str(path),
        dgms_layers={name: meta_bits.get(name) for name in sorted(names)},
        config_name=config_name,
        has_config_text=isinstance(meta.get('cfg'), str))


def config_has_dgms_hook(cfg: Config) -> bool:
    """Return whether ``cfg.custom_hooks`` contains a DGMSHook.

    Compares type names, so that inference code does not import the
    training hook.
    """
    for hook in cfg.get('custom_hooks') or []:
        hook_type = hook.get('type') if isinstance(hook, dict) else None
        name = hook_type if isinstance(hook_type, str) else getattr(
            hook_type, '__name__', '')
        if name.split('.')[-1] == 'DGMSHook':
            return True
    return False


def _bits_phrase(bits: Dict[str, Optional[int]]) -> str:
    known = sorted({b for b in bits.values() if b is not None})
    if not known:
        return ''
    return ' at ' + '/'.join(str(b) for b in known) + ' bits'


def check_checkpoint_matches(model: nn.Module,
                             summary: CheckpointSummary,
                             cfg: Config,
                             config_label: str,
                             hook_will_convert: bool = False) -> None:
    """Raise when the checkpoint does not fit the model built from ``cfg``.

    Args:
        model (nn.Module): the model built from ``cfg`` (unwrapped).
        summary (CheckpointSummary): from :func:`read_checkpoint_summary`.
        cfg (Config): the config the model was built from.
        config_label (str): how to name the config in messages (its path).
        hook_will_convert (bool): True where a Runner runs the config's
            hooks, so that a DGMSHook converts the model before the
            checkpoint loads (tools/test.py); False for ``init_detector``
            and ``DetInferencer``, which build ``config.model`` only.
            Default: False.

    Raises:
        CheckpointMismatchError: a DGMS checkpoint with a config that
            builds a full-precision model, a full-precision checkpoint with
            a DGMS config, or quantized layers or bit widths that differ.
    """
    model_layers = {name: m.bits for name, m in dgms_layers(model).items()}
    has_hook = config_has_dgms_hook(cfg)
    config_quantizes = bool(model_layers) or (hook_will_convert and has_hook)
    path = summary.path

    if summary.is_dgms and not config_quantizes:
        if has_hook:
            raise CheckpointMismatchError(
                f'config {config_label} converts the model in DGMSHook when '
                'a Runner starts, but init_detector and DetInferencer build '
                'config.model alone, so the model has no DGMS layers for the '
                f'DGMS checkpoint {path}. Build the model with DGMSDetector: '
                "model = dict(type='DGMSDetector', detector_type=..., "
                f'dgms=dict(bits=...)), as {EXAMPLE_DGMS_CONFIG} does')
        raise CheckpointMismatchError(
            f'checkpoint {path} is a DGMS checkpoint '
            f'({len(summary.dgms_layers)} quantized conv layers'
            f'{_bits_phrase(summary.dgms_layers)}), but config {config_label} '
            'builds a full-precision model, which would run the latent '
            'full-precision weights instead of the codebooks. Use the config '
            f'it was trained with{summary.trained_with()}, or any config '
            "that builds the model with type='DGMSDetector' (see "
            f'{EXAMPLE_DGMS_CONFIG})')

    if config_quantizes and not summary.is_dgms:
        raise CheckpointMismatchError(
            f'checkpoint {path} is a full-precision checkpoint (its '
            'state_dict has no DGMS mixture), but config '
            f'{config_label} quantizes the model with DGMS. Evaluate it with '
            f'the config it was trained with{summary.trained_with()}, or '
            f'fine-tune it with this config first: tools/train.py '
            f'{config_label} --cfg-options load_from={path}')

    if model_layers and summary.is_dgms:
        _check_same_layers(model_layers, summary, config_label)


def _check_same_layers(model_layers: Dict[str, int],
                       summary: CheckpointSummary, config_label: str) -> None:
    problems = []
    for name in sorted(set(model_layers) | set(summary.dgms_layers)):
        if name not in summary.dgms_layers:
            problems.append(f'{name} is quantized by the config only')
        elif name not in model_layers:
            problems.append(f'{name} is quantized in the checkpoint only')
        elif summary.dgms_layers[name] not in (None, model_layers[name]):
            problems.append(f'{name} has {summary.dgms_layers[name]} bits in '
                            f'the checkpoint, {model_layers[name]} in the '
                            'config')
    if problems:
        more = (f' and {len(problems) - 3} more'
                if len(problems) > 3 else '')
        raise CheckpointMismatchError(
            f'checkpoint {summary.path} and config {config_label} quantize '
            f'different layers or bit widths: {"; ".join(problems[:3])}'
            f'{more}. Use the config it was trained with'
            f'{summary.trained_with()}')
