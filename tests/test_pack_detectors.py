"""Packing real MMDetection detectors and reading them back.

Checkpoints here come from the tiny test configs with random weights,
random BatchNorm statistics and k-means-initialised mixtures: packing only
needs the hard assignment, not a trained detector.
"""
import pickle

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from mmdgms.convert import convert_model, dgms_layers
from mmdgms.pack import (PackError, build_packed_detector, load_dgms_detector,
                         read_packed)
from mmdgms.pack.detectors import trace_detector
from mmdgms.pack.packer import build_model, describe_model
from mmdgms.pack.writer import encode_packed

from conftest import REPO_ROOT, TEST_CONFIGS, run_tool, write_config
from test_runner import parse_map

BASES = {
    'retinanet': TEST_CONFIGS / 'tiny_retinanet_fp.py',
    'faster_rcnn': TEST_CONFIGS / 'tiny_faster_rcnn_fp.py',
}
BITS = (2, 3, 4, 8)


def make_checkpoint(config, path, seed: int, dgms: bool = True) -> None:
    """Save an MMEngine-style checkpoint of ``config``'s detector."""
    cfg = Config.fromfile(str(config))
    torch.manual_seed(seed)
    build_model(cfg)  # registers mmdet's modules
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model)
    model.init_weights()  # the heads' own initialisation (score priors)
    # Give BatchNorm the statistics of real images, then random affine
    # terms, so that folding is not the identity and activations keep a
    # realistic scale.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for batch in first_batches(config):
            inputs = model.data_preprocessor(batch, False)['inputs']
            model.extract_feat(inputs)
    model.eval()
    for norm in norms:
        norm.momentum = 0.1
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.normal_(std=0.1)
    if dgms:
        hook = HOOKS.build(cfg.custom_hooks[0])
        convert_model(model, hook.dgms_cfg)
        for layer in dgms_layers(model).values():
            layer.mixture.init_from_weights(layer.weight)
    torch.save(dict(meta=dict(dataset_meta=dict(classes=('tree', ))),
                    state_dict=model.state_dict()), path)


@pytest.fixture(scope='module')
def checkpoints(tree_data, tmp_path_factory):
    """(config, checkpoint) for every detector and bit width."""
    folder = tmp_path_factory.mktemp('pack')
    result = {}
    for name, base in BASES.items():
        for bits in BITS:
            config = write_config(
                folder / f'{name}_{bits}.py', base, tree_data,
                f"custom_hooks = [dict(type='DGMSHook', bits={bits})]\n")
            checkpoint = folder / f'{name}_{bits}.pth'
            make_checkpoint(config, checkpoint, seed=bits)
            result[name, bits] = (config, checkpoint)
        fp_config = write_config(folder / f'{name}_fp.py', base, tree_data)
        make_checkpoint(fp_config, folder / f'{name}_fp.pth', 0, dgms=False)
        result[name, 'fp'] = (fp_config, folder / f'{name}_fp.pth')
    return result


@pytest.fixture(scope='module')
def models():
    """Loaded DGMS detectors, cached by (config, checkpoint)."""
    return {}


def traced(models, checkpoints, name, bits):
    """Return (model, graphs, META object) for one checkpoint."""
    key = (name, bits)
    if key not in models:
        model, cfg, meta = load_dgms_detector(*map(str, checkpoints[key]))
        graphs, info = trace_detector(model)
        models[key] = (model, graphs,
                       describe_model(cfg, meta, graphs, info, 'x.pth'))
    return models[key]


def first_batches(config, count=2):
    cfg = Config.fromfile(str(config))
    loader = Runner.build_dataloader(cfg.test_dataloader)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


@pytest.mark.parametrize('entropy', [False, True], ids=['dense', 'rans'])
@pytest.mark.parametrize('weight_dtype', ['f32', 'f16'])
@pytest.mark.parametrize('bits', BITS)
@pytest.mark.parametrize('name', list(BASES))
def test_round_trip_detections(checkpoints, models, name, bits, weight_dtype,
                               entropy):
    model, graphs, meta = traced(models, checkpoints, name, bits)
    data, reports = encode_packed(graphs, meta, weight_dtype, entropy)
    packed = read_packed(data)
    detector = build_packed_detector(packed)
    assert packed.meta['classes'] == ['tree']
    assert {r.bits for r in reports if r.kind == 'quantized'} == {bits}

    for batch in first_batches(checkpoints[name, bits][0]):
        with torch.no_grad():
            expected = model.test_step(batch)
            got = detector.test_step(batch)
        for a, b in zip(expected, got):
            a, b = a.pred_instances, b.pred_instances
            assert len(a.bboxes) > 0
            if weight_dtype == 'f32':
                assert torch.equal(a.bboxes, b.bboxes)
                assert torch.equal(a.scores, b.scores)
                assert torch.equal(a.labels, b.labels)
            else:
                assert_detections_close(a, b)


def assert_detections_close(expected, got, top=10):
    """float16 storage of the full-precision layers moves scores by about
    1e-4, which can reorder near-equal scores: every one of the ``top``
    expected detections must have a packed detection of the same label
    among the 2 * top best with IoU >= 0.95 and a score within 2e-3."""
    from mmdet.structures.bbox import bbox_overlaps
    count = min(top, len(expected.scores))
    candidates = min(2 * top, len(got.scores))
    assert candidates > 0
    overlaps = bbox_overlaps(expected.bboxes[:count],
                             got.bboxes[:candidates])
    for i in range(count):
        match = ((overlaps[i] >= 0.95)
                 & (got.labels[:candidates] == expected.labels[i])
                 & ((got.scores[:candidates] - expected.scores[i]).abs()
                    <= 2e-3))
        assert bool(match.any()), (i, expected.bboxes[i], expected.scores[i])


@pytest.mark.parametrize('name', list(BASES))
def test_packed_map_equals_checkpoint_map(checkpoints, name, tmp_path):
    config, checkpoint = checkpoints[name, 4]
    packed = tmp_path / 'model.dgms'
    log = run_tool([
        REPO_ROOT / 'tools' / 'pack.py', config, checkpoint, '-o', packed,
        '--report', '--entropy'
    ])
    assert 'verified: packed graph outputs differ from PyTorch by at most 0'\
        in log
    assert 'entropy coding:' in log
    assert 'packed file:' in log

    checkpoint_log = run_tool([
        REPO_ROOT / 'tools' / 'test.py', config, checkpoint, '--work-dir',
        tmp_path / 'ckpt', '--out', tmp_path / 'ckpt.pkl'
    ])
    packed_log = run_tool([
        REPO_ROOT / 'tools' / 'test_packed.py', config, packed,
        '--work-dir', tmp_path / 'packed', '--out', tmp_path / 'packed.pkl'
    ])
    assert parse_map(packed_log) == parse_map(checkpoint_log)
    with open(tmp_path / 'ckpt.pkl', 'rb') as f:
        expected = pickle.load(f)
    with open(tmp_path / 'packed.pkl', 'rb') as f:
        got = pickle.load(f)
    assert len(expected) == len(got) == 2
    for a, b in zip(expected, got):
        assert len(a['pred_instances']['bboxes']) > 0
        for key in ('bboxes', 'scores', 'labels'):
            assert torch.equal(a['pred_instances'][key],
                               b['pred_instances'][key])


def test_pack_rejects_full_precision_checkpoint(checkpoints, tmp_path):
    config, _ = checkpoints['retinanet', 4]
    _, fp_checkpoint = checkpoints['retinanet', 'fp']
    out = tmp_path / 'model.dgms'
    log = run_tool(
        [REPO_ROOT / 'tools' / 'pack.py', config, fp_checkpoint, '-o', out],
        expect_success=False)
    assert 'never trained with DGMS' in log
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('content', ['text', 'truncated'])
def test_pack_rejects_unreadable_checkpoint(checkpoints, tmp_path, content):
    config, checkpoint = checkpoints['retinanet', 4]
    bad = tmp_path / 'bad.pth'
    if content == 'text':
        bad.write_text('not a checkpoint\n')
    else:
        bad.write_bytes(checkpoint.read_bytes()[:100000])
    with pytest.raises(PackError, match='cannot be read as a PyTorch '
                       'checkpoint'):
        load_dgms_detector(str(config), str(bad))


def test_pack_rejects_plain_config(checkpoints):
    config, _ = checkpoints['retinanet', 'fp']
    _, checkpoint = checkpoints['retinanet', 4]
    with pytest.raises(PackError, match='neither a DGMSDetector model nor'):
        load_dgms_detector(str(config), str(checkpoint))


@pytest.mark.parametrize('config_key,message', [
    (('faster_rcnn', 4), 'missing keys'),
    (('retinanet', 2), 'shape mismatches'),
])
def test_pack_rejects_mismatched_config(checkpoints, tmp_path, config_key,
                                        message):
    config, _ = checkpoints[config_key]
    _, checkpoint = checkpoints['retinanet', 4]
    out = tmp_path / 'model.dgms'
    out.write_bytes(b'previous model')
    log = run_tool(
        [REPO_ROOT / 'tools' / 'pack.py', config, checkpoint, '-o', out],
        expect_success=False)
    assert message in log
    assert 'Pass the config' in log
    assert out.read_bytes() == b'previous model'
    assert [p.name for p in tmp_path.iterdir()] == ['model.dgms']


def test_test_packed_rejects_corrupt_file(checkpoints, tmp_path):
    config, _ = checkpoints['retinanet', 4]
    bad = tmp_path / 'bad.dgms'
    bad.write_bytes(b'DGMSPACK' + b'\0' * 100)
    log = run_tool(
        [REPO_ROOT / 'tools' / 'test_packed.py', config, bad],
        expect_success=False)
    assert 'error:' in log
    assert 'invalid format version 0.0' in log
    assert 'Traceback' not in log


def test_report_without_output_writes_nothing(checkpoints, tmp_path):
    config, checkpoint = checkpoints['faster_rcnn', 3]
    log = run_tool([REPO_ROOT / 'tools' / 'pack.py', config, checkpoint,
                    '--report'], cwd=tmp_path)
    assert 'roi_head.bbox_head.fc_cls' in log
    assert '3.00 bits per weight on average' in log
    assert 'no file written' in log
    assert list(tmp_path.iterdir()) == []
