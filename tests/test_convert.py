"""Layer selection, replacement and configuration errors on real mmdet models."""
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from torch import nn

import mmdgms
from mmdgms import DGMSConfig, DGMSConv2d, DGMSHook, convert_model
from mmdgms.convert import dgms_layers, select_layers

from conftest import REPO_ROOT, TEST_CONFIGS


def build_detector(config, **model_overrides):
    from mmdet.registry import MODELS
    init_default_scope('mmdet')
    cfg = Config.fromfile(str(config))
    cfg.merge_from_dict({f'model.{k}': v for k, v in model_overrides.items()})
    if 'init_cfg' in cfg.model.backbone:
        cfg.model.backbone.init_cfg = None
    return MODELS.build(cfg.model)


@pytest.fixture(scope='module')
def retinanet():
    return build_detector(TEST_CONFIGS / 'tiny_retinanet_fp.py')


def tiny_faster_rcnn():
    """Faster R-CNN with a narrow ResNet-18: same structure as the R50 one."""
    return build_detector(
        REPO_ROOT / 'configs' / 'dgms' / 'faster_rcnn_r50_4bit.py',
        **{
            'backbone.depth': 18,
            'backbone.base_channels': 8,
            'neck.in_channels': [8, 16, 32, 64],
            'neck.out_channels': 16,
            'rpn_head.in_channels': 16,
            'rpn_head.feat_channels': 16,
            'roi_head.bbox_roi_extractor.out_channels': 16,
            'roi_head.bbox_head.in_channels': 16,
            'roi_head.bbox_head.fc_out_channels': 32,
        })


def test_default_selection_skips_stem_and_head(retinanet):
    names = select_layers(retinanet, DGMSConfig())
    assert 'backbone.conv1.conv' not in names
    assert all(n.startswith(('backbone.', 'neck.')) for n in names)
    backbone_convs = [
        n for n, m in retinanet.named_modules()
        if isinstance(m, nn.Conv2d) and n.startswith(('backbone.', 'neck.'))
    ]
    assert len(names) == len(backbone_convs) - 1


def test_skip_stem_false_includes_stem(retinanet):
    names = select_layers(retinanet, DGMSConfig(skip_stem=False))
    assert 'backbone.conv1.conv' in names


def test_exclude_and_layer_bits(retinanet):
    cfg = DGMSConfig(exclude=['neck.*'],
                     layer_bits={'backbone.layer1.*': 8})
    names = select_layers(retinanet, cfg)
    assert not any(n.startswith('neck.') for n in names)
    assert cfg.mixture_cfg('backbone.layer1.0.linear_conv.conv')['bits'] == 8
    assert cfg.mixture_cfg('backbone.layer2.0.expand_conv.conv')['bits'] == 4


def test_convert_keeps_weight_parameters():
    torch.manual_seed(0)
    model = build_detector(TEST_CONFIGS / 'tiny_retinanet_fp.py')
    before = dict(model.named_parameters())
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        reference = model.extract_feat(x)

    layers = convert_model(model, DGMSConfig(bits=8))
    after = dict(model.named_parameters())
    for name in layers:
        assert after[f'{name}.weight'] is before[f'{name}.weight']
    assert all(isinstance(m, DGMSConv2d) for m in layers.values())

    # 8-bit hard weights stay close to the full-precision weights, layer by
    # layer; through the 60 layers of the network the errors add up.
    for name, layer in layers.items():
        layer.mixture.init_from_weights(layer.weight)
        hard = layer.mixture.hard_weights(layer.weight)
        error = float((hard - layer.weight).norm() / layer.weight.norm())
        assert error < 0.03, f'{name}: relative weight error {error:.4f}'
    with torch.no_grad():
        quantized = model.extract_feat(x)
    for level, (ref, out) in enumerate(zip(reference, quantized)):
        error = float((out - ref).norm() / ref.norm())
        assert error < 0.25, f'FPN level {level}: relative error {error:.3f}'


def test_conv_cfg_builds_dgms_layers():
    model = build_detector(
        TEST_CONFIGS / 'tiny_retinanet_fp.py',
        **{'neck.conv_cfg': dict(type='DGMSConv', bits=3)})
    built = dgms_layers(model)
    assert built and all(n.startswith('neck.') for n in built)
    assert {m.bits for m in built.values()} == {3}

    # The hook keeps layers that are DGMS already and converts the rest.
    layers = convert_model(model, DGMSConfig(bits=4))
    assert all(layers[n] is built[n] for n in built)
    assert layers['neck.fpn_convs.0.conv'].bits == 3
    assert layers['backbone.layer2.0.expand_conv.conv'].bits == 4


def test_faster_rcnn_trains_with_dgms():
    model = tiny_faster_rcnn()
    layers = convert_model(model, DGMSConfig(bits=2))
    assert 'backbone.conv1' not in layers
    assert any(n.startswith('backbone.layer4.') for n in layers)
    assert any(n.startswith('neck.') for n in layers)
    assert not any(n.startswith(('rpn_head.', 'roi_head.')) for n in layers)
    for layer in layers.values():
        layer.mixture.init_from_weights(layer.weight)

    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    sample = DetDataSample(metainfo=dict(
        img_shape=(96, 96), pad_shape=(96, 96), batch_input_shape=(96, 96),
        scale_factor=(1.0, 1.0)))
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[10.0, 12.0, 50.0, 60.0]]),
        labels=torch.tensor([0]))
    model.train()
    losses = model.loss(torch.randn(1, 3, 96, 96), [sample])
    total = sum(v.sum() if torch.is_tensor(v) else sum(x.sum() for x in v)
                for k, v in losses.items() if 'loss' in k)
    total.backward()
    for name, layer in layers.items():
        assert layer.mixture.means.grad is not None, name
        assert torch.isfinite(layer.mixture.means.grad).all(), name


@pytest.mark.parametrize('bits', [0, 9, -1, 2.5, '4'])
def test_hook_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match=f'bits={bits!r}|bits={bits}'):
        DGMSHook(bits=bits)


def test_hook_rejects_bad_layer_bits():
    with pytest.raises(ValueError, match=r"layer_bits\['neck.\*'\]=12"):
        DGMSHook(layer_bits={'neck.*': 12})


def test_pattern_matching_nothing_is_reported(retinanet):
    cfg = DGMSConfig(include=['backbone.*', 'bakbone.layer9.*'])
    with pytest.raises(ValueError, match="'bakbone.layer9.\\*' matches no"):
        select_layers(retinanet, cfg)


def test_exclude_matching_nothing_is_reported(retinanet):
    cfg = DGMSConfig(exclude=['neck.lateral_convz.*'])
    with pytest.raises(ValueError, match='neck.lateral_convz'):
        select_layers(retinanet, cfg)


def test_non_conv_module_is_reported(retinanet):
    cfg = DGMSConfig(include=['backbone.conv1.bn'])
    with pytest.raises(ValueError) as info:
        select_layers(retinanet, cfg)
    message = str(info.value)
    assert "'backbone.conv1.bn'" in message
    assert 'BatchNorm2d' in message
    assert 'matches no conv layer' in message


def test_conv_subclass_with_own_forward_is_reported():
    from mmcv.cnn.bricks.conv_ws import ConvWS2d
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), ConvWS2d(8, 8, 3))
    with pytest.raises(TypeError, match='backbone.1.*ConvWS2d.*exclude'):
        select_layers(model, DGMSConfig(include=['backbone.*']))
    # With the subclass excluded and the stem skipped, nothing is left.
    with pytest.raises(ValueError, match='leave no conv layer'):
        select_layers(
            model, DGMSConfig(include=['backbone.*'], exclude=['backbone.1']))


def test_nothing_left_is_reported():
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match='leave no conv layer'):
        select_layers(model, DGMSConfig(include=['backbone.*']))


def test_empty_include_is_reported():
    with pytest.raises(ValueError, match='include is empty'):
        DGMSConfig(include=[])


def test_dgms_configs_build_and_convert():
    # The COCO configs parse with their mmdet:: bases and select the whole
    # ResNet-50 + FPN except the stem.
    for name in ('retinanet_r50_4bit.py', 'faster_rcnn_r50_4bit.py'):
        cfg = Config.fromfile(str(REPO_ROOT / 'configs' / 'dgms' / name))
        assert cfg.custom_imports.imports == ['mmdgms']
        assert cfg.load_from.startswith('checkpoints/')
        hooks = [h for h in cfg.custom_hooks if h.type == 'DGMSHook']
        assert [h.bits for h in hooks] == [4]
    model = build_detector(REPO_ROOT / 'configs' / 'dgms' /
                           'retinanet_r50_4bit.py')
    names = select_layers(model, DGMSConfig())
    # ResNet-50: 52 convs after the stem (3 per bottleneck x 16, plus 4
    # downsample convs); RetinaNet FPN: 3 lateral + 5 output convs.
    assert len(names) == 52 + 8
    assert mmdgms.__version__


def test_layer_bits_matching_nothing_is_reported(retinanet):
    cfg = DGMSConfig(layer_bits={'neck.nothing_here.*': 8})
    with pytest.raises(ValueError, match="'neck.nothing_here.\\*' matches none"):
        select_layers(retinanet, cfg)


def test_stem_only_selection_suggests_skip_stem(retinanet):
    cfg = DGMSConfig(include=['backbone.conv1.conv'])
    with pytest.raises(ValueError, match='set skip_stem=False'):
        select_layers(retinanet, cfg)
