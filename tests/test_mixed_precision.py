"""Per-layer bit widths (layer_bits) and the COCO configs at 2, 3, 4 bits
and mixed precision, built as real ResNet-50 detectors and converted."""
import fnmatch
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.registry import HOOKS
from torch import nn

from mmdgms import DGMSConfig, DGMSHook, convert_model
from mmdgms.convert import (CONVERSION_CONFIG_ATTR, CONVERTED_FLAG,
                            dgms_layers, select_layers)
from mmdgms.stats import bit_width_stats, format_table, layer_stats

from conftest import REPO_ROOT, TEST_CONFIGS
from test_convert import build_detector

CONFIG_DIR = REPO_ROOT / 'configs' / 'dgms'
# ResNet-50 + FPN: 52 backbone convs after the stem, plus 8 FPN convs in
# RetinaNet (3 lateral, 5 output) and 8 in Faster R-CNN (4 + 4).
NUM_LAYERS = 60
UNIFORM = {
    f'{arch}_r50_{bits}bit.py': bits
    for arch in ('retinanet', 'faster_rcnn') for bits in (2, 3, 4)
}
# Average bits per weight stated in the mixed configs' comments.
MIXED = {'retinanet_r50_mixed.py': 3.08, 'faster_rcnn_r50_mixed.py': 3.11}


def dgms_hook_cfg(cfg):
    hooks = [h for h in cfg.custom_hooks if h.type == 'DGMSHook']
    assert len(hooks) == 1, cfg.custom_hooks
    return hooks[0]


def convert_config(name):
    """Build the config's detector and convert it as its DGMSHook would."""
    path = CONFIG_DIR / name
    cfg = Config.fromfile(str(path))
    assert cfg.custom_imports.imports == ['mmdgms']
    assert cfg.load_from.startswith('checkpoints/')
    hook = HOOKS.build(dgms_hook_cfg(cfg))
    assert isinstance(hook, DGMSHook)
    model = build_detector(path)
    if getattr(model, CONVERTED_FLAG, False):
        # DGMSDetector built it converted: the hook must hold the same
        # settings, or training would stop with an error.
        assert getattr(model, CONVERSION_CONFIG_ATTR) == hook.dgms_cfg
        return model, dgms_layers(model)
    layers = convert_model(model, hook.dgms_cfg)
    return model, layers


def test_every_config_is_covered():
    names = {p.name for p in CONFIG_DIR.glob('*.py')}
    assert names == set(UNIFORM) | set(MIXED)


@pytest.mark.parametrize('name', sorted(UNIFORM))
def test_uniform_config_converts(name):
    model, layers = convert_config(name)
    assert len(layers) == NUM_LAYERS
    assert {m.bits for m in layers.values()} == {UNIFORM[name]}
    assert 'backbone.conv1' not in layers
    assert bit_width_stats(model)['avg_bits'] == UNIFORM[name]


def expected_mixed_bits(name, layer):
    if layer.startswith(('backbone.layer1.', 'neck.')):
        if name.startswith('retinanet') and layer.startswith(
                'neck.fpn_convs.3.'):  # the P6 conv
            return 3
        return 8
    if layer.startswith('backbone.layer4.'):
        return 2
    return 3


@pytest.mark.parametrize('name', sorted(MIXED))
def test_mixed_config_converts(name):
    model, layers = convert_config(name)
    assert len(layers) == NUM_LAYERS
    wrong = {
        n: m.bits
        for n, m in layers.items() if m.bits != expected_mixed_bits(name, n)
    }
    assert wrong == {}
    stats = bit_width_stats(model)
    assert stats['avg_bits'] == pytest.approx(MIXED[name], abs=0.005)
    assert set(stats['layers_per_bits']) == {2, 3, 8}
    assert sum(stats['layers_per_bits'].values()) == NUM_LAYERS


@pytest.fixture(scope='module')
def retinanet():
    return build_detector(TEST_CONFIGS / 'tiny_retinanet_fp.py')


def resolved_bits(model, cfg):
    return {n: cfg.bits_of(n) for n in select_layers(model, cfg)}


def test_first_matching_pattern_wins(retinanet):
    specific_first = DGMSConfig(bits=4, layer_bits={
        'backbone.layer1.*': 8,
        'backbone.*': 2
    })
    bits = resolved_bits(retinanet, specific_first)
    layer1 = [n for n in bits if n.startswith('backbone.layer1.')]
    assert layer1
    assert {bits[n] for n in layer1} == {8}
    others = [n for n in bits if n.startswith('backbone.') and n not in layer1]
    assert {bits[n] for n in others} == {2}
    necks = [n for n in bits if n.startswith('neck.')]
    assert {bits[n] for n in necks} == {4}  # no pattern: the default bits


def test_shadowed_pattern_is_reported(retinanet):
    # 'backbone.*' comes first and takes every layer that layer1's pattern
    # matches, so the layer1 pattern would have no effect.
    general_first = DGMSConfig(layer_bits={
        'backbone.*': 2,
        'backbone.layer1.*': 8
    })
    with pytest.raises(ValueError) as info:
        select_layers(retinanet, general_first)
    message = str(info.value)
    assert "'backbone.layer1.*' sets no layer's bits" in message
    assert "earlier pattern(s) 'backbone.*'" in message
    assert 'more specific pattern first' in message


def test_partly_overlapping_patterns_are_accepted(retinanet):
    # Both patterns match neck.fpn_convs.0; the first one sets its bits and
    # the second still sets the other output convs.
    cfg = DGMSConfig(layer_bits={
        'neck.fpn_convs.0.*': 8,
        'neck.fpn_convs.*': 3
    })
    bits = resolved_bits(retinanet, cfg)
    fpn = sorted(n for n in bits if n.startswith('neck.fpn_convs.'))
    assert len(fpn) > 1
    assert bits[fpn[0]] == 8
    assert {bits[n] for n in fpn[1:]} == {3}


def test_pattern_on_excluded_layers_is_reported(retinanet):
    cfg = DGMSConfig(exclude=['neck.*'], layer_bits={'neck.*': 8})
    with pytest.raises(ValueError,
                       match=r"'neck.\*' matches none of the \d+ quantized"):
        select_layers(retinanet, cfg)


@pytest.mark.parametrize('layer_bits, message', [
    ([('neck.*', 8)], 'layer_bits must be a dict'),
    ({'': 8}, "keys must be non-empty module name patterns, got ''"),
    ({3: 8}, 'keys must be non-empty module name patterns, got 3'),
    ({'neck.*': True}, r"layer_bits\['neck.\*'\]=True"),
    ({'neck.*': 0}, r"layer_bits\['neck.\*'\]=0 is out of range"),
    ({'neck.*': '8'}, r"layer_bits\['neck.\*'\]='8'"),
])
def test_bad_layer_bits_are_rejected(layer_bits, message):
    with pytest.raises(ValueError, match=message):
        DGMSHook(layer_bits=layer_bits)


def test_conv_cfg_bits_conflicting_with_layer_bits(retinanet):
    model = build_detector(TEST_CONFIGS / 'tiny_retinanet_fp.py',
                           **{'neck.conv_cfg': dict(type='DGMSConv', bits=3)})
    with pytest.raises(ValueError, match=r'3-bit DGMSConv.*requests 8 bits'):
        convert_model(model, DGMSConfig(layer_bits={'neck.fpn_convs.*': 8}))
    # The same bits as conv_cfg are no conflict.
    layers = convert_model(model, DGMSConfig(layer_bits={'neck.*': 3}))
    assert {m.bits for n, m in layers.items() if n.startswith('neck.')} == {3}


def test_stats_report_weighted_average_bits():
    model = build_detector(TEST_CONFIGS / 'tiny_retinanet_fp.py')
    layers = convert_model(model,
                           DGMSConfig(bits=2, layer_bits={'neck.*': 8}))
    for layer in layers.values():
        layer.mixture.init_from_weights(layer.weight)

    weights = {n: m.weight.numel() for n, m in layers.items()}
    total = sum(weights.values())
    expected = sum(weights[n] * (8 if n.startswith('neck.') else 2)
                   for n in weights) / total
    widths = bit_width_stats(model)
    assert widths['params'] == total
    assert widths['avg_bits'] == pytest.approx(expected)
    assert 2 < widths['avg_bits'] < 8
    necks = sum(1 for n in layers if n.startswith('neck.'))
    assert widths['layers_per_bits'] == {2: len(layers) - necks, 8: necks}

    table = format_table(layer_stats(model))
    assert f'average bits per weight: {expected:.3f}' in table


def test_show_bit_widths_cli(capsys):
    import show_bit_widths
    config = CONFIG_DIR / 'retinanet_r50_mixed.py'
    assert show_bit_widths.main([str(config), '--layers']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('retinanet_r50_mixed.py: 60 layers, 31.44 M '
                               'weights, 3.080 bits per weight')
    assert '8 bits: 17 layers, 11.1 % of weights' in lines[0]
    layer_lines = lines[1:]
    assert len(layer_lines) == NUM_LAYERS
    assert layer_lines[0].split()[:2] == ['backbone.layer1.0.conv1', '8']


def test_show_bit_widths_rejects_config_without_hook(tmp_path):
    import show_bit_widths
    with pytest.raises(SystemExit, match='has 0 DGMSHook entries'):
        show_bit_widths.main([str(TEST_CONFIGS / 'tiny_retinanet_fp.py')])
    with pytest.raises(SystemExit, match='config file not found'):
        show_bit_widths.main([str(tmp_path / 'missing.py')])
