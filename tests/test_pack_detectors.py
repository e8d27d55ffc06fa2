"""Packing real MMDetection detectors and reading them back.

Checkpoints here come from the tiny test configs with random weights,
random BatchNorm statistics and k-means-initialised mixtures: packing only
needs the hard assignment, not a trained detector.
"""
import os
import pickle

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from mmdgms.convert import convert_model, dgms_layers
from mmdgms.pack import (PackError, build_packed_detector, load_dgms_detector,
                         pack_checkpoint, read_packed)
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


def make_checkpoint(config, path, seed: int, dgms: bool = True,
                    calibrate_norms: bool = True) -> None:
    """Save an MMEngine-style checkpoint of ``config``'s detector.

    ``calibrate_norms`` runs two test batches through the backbone to set
    the BatchNorm statistics, so it needs the config's data.
    """
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
    if calibrate_norms:
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


@pytest.fixture(scope='module')
def bit_width_mismatch(tmp_path_factory):
    """Configs at 4 and 2 bits in one folder, and a checkpoint of the 4-bit
    one, whose mixtures have other shapes than the 2-bit config's.

    The configs point at a data folder that does not exist: loading and
    packing read no data.
    """
    folder = tmp_path_factory.mktemp('bit-width-mismatch')
    configs = {
        bits: write_config(
            folder / f'retinanet_{bits}bit.py', BASES['retinanet'],
            folder / 'no-data',
            f"custom_hooks = [dict(type='DGMSHook', bits={bits})]\n")
        for bits in (4, 2)
    }
    checkpoint = folder / 'retinanet_4bit.pth'
    make_checkpoint(configs[4], checkpoint, seed=0, calibrate_norms=False)
    return configs, checkpoint


def save_with_meta(source, path, meta: dict) -> None:
    """Save the checkpoint ``source`` to ``path`` with ``meta`` in place of
    its meta."""
    checkpoint = torch.load(source, map_location='cpu', weights_only=True)
    torch.save(dict(meta=meta, state_dict=checkpoint['state_dict']), path)


@pytest.mark.parametrize('experiment', [
    'retinanet_4bit', 'retinanet_renamed', 'retinanet_2bit', None
], ids=['found', 'not-found', 'same-name', 'not-recorded'])
def test_pack_mismatch_names_trained_config(bit_width_mismatch, tmp_path,
                                            experiment):
    configs, source = bit_width_mismatch
    meta = dict(dataset_meta=dict(classes=('tree', )))
    if experiment is not None:
        meta['experiment_name'] = f'{experiment}_20240102_030405'
        meta['cfg'] = configs[4].read_text()
    checkpoint = tmp_path / 'model.pth'
    save_with_meta(source, checkpoint, meta)
    out = tmp_path / 'model.dgms'

    with pytest.raises(PackError) as error:
        pack_checkpoint(str(configs[2]), str(checkpoint), str(out))
    message = str(error.value)

    assert f'does not match {configs[2]}' in message
    assert 'shape mismatches' in message
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ['model.pth']
    if experiment == 'retinanet_4bit':
        assert ('Pass the config the checkpoint was trained with: '
                f'{configs[4]} ') in message
        assert "checkpoint['meta']['cfg']" in message
    elif experiment == 'retinanet_renamed':
        assert (f'no retinanet_renamed.py is in {configs[2].parent}'
                in message)
        assert ("Save the text of checkpoint['meta']['cfg'] as "
                'retinanet_renamed.py') in message
    elif experiment == 'retinanet_2bit':
        assert 'the config has changed since training' in message
        assert str(configs[4]) not in message
    else:
        assert 'Pass the config file that tools/train.py was given' in message
        assert "does not record its name" in message


def test_pack_plain_trees_config_suggests_neighbours(tmp_path):
    config = REPO_ROOT / 'configs' / 'trees' / 'retinanet_mnv2_fpn_trees_fp.py'
    checkpoint = tmp_path / 'unused.pth'
    checkpoint.write_bytes(b'')

    with pytest.raises(PackError) as error:
        load_dgms_detector(str(config), str(checkpoint))
    message = str(error.value)

    assert 'neither a DGMSDetector model nor' in message
    for bits in (2, 4):
        dgms_config = config.parent / f'retinanet_mnv2_fpn_trees_dgms{bits}.py'
        assert dgms_config.is_file()
        assert str(dgms_config) in message
    assert 'configs/dgms' not in message


@pytest.mark.parametrize('sibling', [False, True],
                         ids=['alone', 'dgms-sibling'])
def test_pack_plain_config_suggestion_outside_trees(tmp_path, sibling):
    config = write_config(tmp_path / 'retinanet_fp.py', BASES['retinanet'],
                          tmp_path / 'no-data')
    checkpoint = tmp_path / 'unused.pth'
    checkpoint.write_bytes(b'')
    dgms_config = tmp_path / 'retinanet_dgms4.py'
    if sibling:
        write_config(dgms_config, BASES['retinanet'], tmp_path / 'no-data',
                     "custom_hooks = [dict(type='DGMSHook', bits=4)]\n")

    with pytest.raises(PackError) as error:
        load_dgms_detector(str(config), str(checkpoint))
    message = str(error.value)

    assert 'neither a DGMSDetector model nor' in message
    if sibling:
        assert f'such as {dgms_config}' in message
        assert 'configs/dgms' not in message
    else:
        assert 'e.g. one in ' in message
        assert message.endswith(f'configs{os.sep}dgms{os.sep}')
        assert 'such as' not in message
