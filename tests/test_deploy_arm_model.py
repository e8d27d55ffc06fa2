"""The mobile runtime on packed detectors: end to end against the Python
reference reader, COCO mAP, malformed files, sanitizers, AArch64, and
dgms_detect's PPM preprocessing against MMDetection's pipeline.

The tiny RetinaNet (tests/configs/tiny_retinanet_fp.py) gets a 4-bit DGMS
checkpoint without training (random weights, k-means mixtures) and is
packed with rANS indices. Tolerance against the Python reader: the C++
convolutions sum in another order, so scores move by float32 rounding;
every one of the reference's 20 best detections must have a runtime
detection of the same label among the 40 best with IoU >= 0.99 and a
score within 1e-4, and the other way round.
"""
import ctypes
import json
import os
import platform
import re
import shutil
import struct
import subprocess

import cv2
import numpy as np
import pytest
import torch

from mmdgms.deploy_arm import RUNTIME_DIR, RuntimeDetector, RuntimeFailure
from mmdgms.pack import load_packed_detector, read_packed
from mmdgms.pack.container import Section, decode_container, encode_container
from mmdgms.pack.packer import pack_checkpoint

from conftest import REPO_ROOT, TEST_CONFIGS, write_config
from test_pack_detectors import first_batches, make_checkpoint
from test_runner import parse_map, run_tool

TOP = 20


@pytest.fixture(scope='module')
def packed(tree_data, tmp_path_factory):
    """(config, checkpoint, packed file) of a 4-bit tiny RetinaNet."""
    folder = tmp_path_factory.mktemp('runtime_model')
    config = write_config(
        folder / 'retinanet_4.py', TEST_CONFIGS / 'tiny_retinanet_fp.py',
        tree_data, "custom_hooks = [dict(type='DGMSHook', bits=4)]\n")
    checkpoint = folder / 'retinanet_4.pth'
    make_checkpoint(config, checkpoint, seed=4)
    path = folder / 'retinanet_4.dgms'
    pack_checkpoint(str(config), str(checkpoint), str(path), entropy=True)
    return config, checkpoint, path


def assert_same_detections(expected, got, min_iou=0.99, score_tol=1e-4):
    from mmdet.structures.bbox import bbox_overlaps
    for a, b in ((expected, got), (got, expected)):
        count = min(TOP, len(a.scores))
        candidates = min(2 * TOP, len(b.scores))
        assert count > 0 and candidates > 0
        overlaps = bbox_overlaps(a.bboxes[:count], b.bboxes[:candidates])
        for i in range(count):
            match = ((overlaps[i] >= min_iou)
                     & (b.labels[:candidates] == a.labels[i])
                     & ((b.scores[:candidates] - a.scores[i]).abs()
                        <= score_tol))
            assert bool(match.any()), (i, a.bboxes[i], a.scores[i])


def write_tensor_file(path, image, img_shape, scale_factor):
    """The DGMSTENS layout of docs/deploy_arm.md."""
    image = np.ascontiguousarray(image, dtype='<f4')
    header = b'DGMSTENS' + struct.pack('<6I2d', 1, *image.shape,
                                       img_shape[0], img_shape[1],
                                       *scale_factor)
    path.write_bytes(header + image.tobytes())


def read_tensor_file(path):
    """Read a DGMSTENS file into (tensor, img_shape, scale_factor)."""
    data = path.read_bytes()
    assert data[:8] == b'DGMSTENS'
    version, channels, height, width, img_h, img_w = struct.unpack(
        '<6I', data[8:32])
    assert version == 1
    scale_factor = struct.unpack('<2d', data[32:48])
    tensor = np.frombuffer(data[48:], '<f4').reshape(channels, height, width)
    return tensor, (img_h, img_w), scale_factor


def test_runtime_matches_python_reader(packed):
    config, _, path = packed
    reference, _ = load_packed_detector(str(path))
    runtime = RuntimeDetector(path, threads=2)
    assert runtime.kind == 'single_stage'
    for batch in first_batches(config):
        with torch.no_grad():
            expected = reference.test_step(batch)
            data = reference.data_preprocessor(batch, False)
        got = runtime.predict(data['inputs'], data['data_samples'])
        for a, b in zip(expected, got):
            assert_same_detections(a.pred_instances, b.pred_instances)


def test_detect_rejects_bad_image_info(packed):
    """detect rejects an img_shape outside the input tensor, scale factors
    that are not positive and finite, and an empty input, naming the
    value."""
    _, _, path = packed
    runtime = RuntimeDetector(path)
    image = np.random.default_rng(0).random((3, 128, 128), np.float32)
    cases = [
        (np.ascontiguousarray(image), (0, 0), (1.0, 1.0),
         'img_shape (0, 0), expected 1 to (128, 128)'),
        (image, (129, 100), (1.0, 1.0),
         'img_shape (129, 100), expected 1 to (128, 128)'),
        (image, (128, 128), (float('nan'), 1.0),
         'scale factors are (nan, 1.000000), expected positive finite'),
        (image, (128, 128), (0.0, 0.0),
         'scale factors are (0.000000, 0.000000)'),
        (np.zeros((3, 0, 0), np.float32), (1, 1), (1.0, 1.0),
         'the input is 0 x 0, expected 1 to 65536 pixels a side'),
    ]
    for array, img_shape, scale, message in cases:
        with pytest.raises(RuntimeFailure) as error:
            runtime.detect(array, img_shape, scale)
        assert message in str(error.value), (img_shape, scale)
    bboxes, _, _ = runtime.detect(image, (128, 128), (1.0, 1.0))
    assert bboxes.shape[1] == 4


def test_detect_rejects_bad_arguments(packed):
    """detect rejects a non-finite input value, an integer image, argument
    pairs of the wrong length or kind, and a call after close(), each
    with a message that names the problem."""
    _, _, path = packed
    runtime = RuntimeDetector(path)
    image = np.random.default_rng(0).random((3, 128, 128), np.float32)
    for value, where, text in ((np.nan, (1, 5, 7), 'is nan'),
                               (np.inf, (2, 127, 127), 'is inf')):
        bad = image.copy()
        bad[where] = value
        with pytest.raises(RuntimeFailure) as error:
            runtime.detect(bad, (128, 128), (1.0, 1.0))
        c, y, x = where
        assert (f'(image 0, channel {c}, row {y}, column {x}) {text}'
                in str(error.value))

    cases = [
        ((image * 255).astype(np.uint8), (128, 128), (1.0, 1.0),
         'dtype uint8, expected float32'),
        (image, (128, 127.5), (1.0, 1.0), 'expected whole pixel counts'),
        (image, 128, (1.0, 1.0), 'img_shape is 128, expected two values'),
        (image, (128, 128), (1.0, ), 'scale_factor is (1.0,), expected two'),
        (image, (128, 'x'), (1.0, 1.0), 'expected numbers'),
    ]
    for array, img_shape, scale, message in cases:
        with pytest.raises(ValueError) as error:
            runtime.detect(array, img_shape, scale)
        assert message in str(error.value), message

    # float64 is converted; the detections are the float32 ones.
    expected = runtime.detect(image, (128, 128), (1.0, 1.0))
    for got, want in zip(runtime.detect(image.astype(np.float64), (128, 128),
                                        (1.0, 1.0)), expected):
        np.testing.assert_array_equal(got, want)

    runtime.close()
    with pytest.raises(RuntimeFailure, match='the detector is closed'):
        runtime.detect(image, (128, 128), (1.0, 1.0))


def first_image(packed):
    """The first test image as the runtime takes it: (image, data sample)."""
    config, _, path = packed
    reference, _ = load_packed_detector(str(path))
    batch = first_batches(config, 1)[0]
    data = reference.data_preprocessor(batch, False)
    return data['inputs'][0].numpy(), data['data_samples'][0]


def test_thread_counts_agree(packed):
    path = packed[2]
    image, sample = first_image(packed)
    results = [RuntimeDetector(path, threads=n).detect(
        image, sample.img_shape, sample.scale_factor) for n in (1, 3)]
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_binding_quant_winograd_option(packed):
    """RuntimeDetector's quant_winograd_max_bytes: 0 runs the codebook
    kernels. Their detections differ from the default's (Winograd on the
    quantized 3x3 layers) but stay within the tolerance. Bad values of it
    and of threads are rejected with their value in the message."""
    path = packed[2]
    image, sample = first_image(packed)
    default = RuntimeDetector(path).detect(image, sample.img_shape,
                                           sample.scale_factor)
    codebook = RuntimeDetector(path, quant_winograd_max_bytes=0).detect(
        image, sample.img_shape, sample.scale_factor)
    same_cap = RuntimeDetector(path.read_bytes(),
                               quant_winograd_max_bytes=1 << 20).detect(
        image, sample.img_shape, sample.scale_factor)
    for a, b in zip(default, same_cap):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(codebook[1][:TOP], default[1][:TOP],
                               atol=1e-4)
    np.testing.assert_allclose(codebook[0][:TOP], default[0][:TOP],
                               atol=1e-2)
    assert not np.array_equal(codebook[1], default[1])
    for bad in (-1, 1 << 63, '1k', 1.5, True):
        with pytest.raises(ValueError,
                           match=f'quant_winograd_max_bytes is {bad!r}'):
            RuntimeDetector(path, quant_winograd_max_bytes=bad)
    for bad in (0, '2', 257):
        with pytest.raises(ValueError, match=f'threads is {bad!r}'):
            RuntimeDetector(path, threads=bad)


def test_map_through_runtime_equals_pytorch(packed, tmp_path):
    config, checkpoint, path = packed
    pytorch_log = run_tool([
        REPO_ROOT / 'tools' / 'test.py', config, checkpoint, '--work-dir',
        tmp_path / 'ckpt'])
    runtime_log = run_tool([
        REPO_ROOT / 'tools' / 'test_runtime.py', config, path, '--threads',
        '2', '--work-dir', tmp_path / 'runtime'])
    expected, got = parse_map(pytorch_log), parse_map(runtime_log)
    assert abs(expected[0] - got[0]) <= 0.1, (expected, got)
    assert abs(expected[1] - got[1]) <= 0.1, (expected, got)


def expect_rejected(data: bytes, what: str) -> str:
    with pytest.raises(RuntimeFailure) as info:
        RuntimeDetector(data)
    message = str(info.value)
    assert message, what
    return message


def rebuild(sections, index, data):
    """The file with section ``index`` replaced (CRCs recomputed)."""
    changed = list(sections)
    changed[index] = Section(changed[index].tag, data)
    return encode_container(changed)


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data, old
    return data.replace(old, new, 1)


def test_malformed_files_are_rejected(packed):
    _, _, path = packed
    data = path.read_bytes()
    RuntimeDetector(data)  # the intact file loads
    assert 'truncated' in expect_rejected(data[:40], 'short')
    assert 'magic' in expect_rejected(b'X' + data[1:], 'magic')
    # Every truncation of the first 4 KB and a spread of longer ones.
    lengths = list(range(0, 4096, 7)) + list(
        np.linspace(4096, len(data) - 1, 60).astype(int))
    for length in lengths:
        expect_rejected(data[:length], f'truncated to {length}')
    expect_rejected(data + b'\0', 'trailing byte')
    rng = np.random.default_rng(0)
    for position in rng.integers(0, len(data), 150):
        flipped = bytearray(data)
        flipped[position] ^= 1 << int(rng.integers(0, 8))
        expect_rejected(bytes(flipped), f'flip at {position}')


def test_corrupt_content_with_valid_checksums(packed):
    """Damage behind valid CRCs: JSON fields, absurd shapes, index data."""
    _, _, path = packed
    sections = decode_container(path.read_bytes())
    grph = json.loads(sections[1].data)
    conv = next(i for i, layer in enumerate(grph['layers'])
                if 'bits' in layer and layer.get('groups', 1) == 1)
    layer = grph['layers'][conv]
    assert layer['bias'] is not None

    def with_layer(**fields):
        changed = json.loads(sections[1].data)
        changed['layers'][conv].update(fields)
        return rebuild(sections, 1, json.dumps(changed).encode())

    cases = {
        'outside': with_layer(in_channels=1 << 40),
        'two integers in [1, 64]': with_layer(kernel=[1000, 1]),
        'groups': with_layer(groups=7),
        'are stored': with_layer(bias=[layer['bias'][0],
                                       layer['bias'][1] - 4]),
        'rANS': with_layer(out_channels=layer['out_channels'] + 1),
        'spans bytes': with_layer(indices=[0, 1 << 62]),
        'unknown index encoding': with_layer(encoding='zip'),
        'invalid JSON': rebuild(sections, 1, sections[1].data[:-1]),
        'not defined': rebuild(sections, 1, replace_once(
            sections[1].data, b'"inputs":["v1"]', b'"inputs":["nope"]')),
    }
    for expected, data in cases.items():
        message = expect_rejected(data, expected)
        assert expected in message, (expected, message)
    # Random damage inside a quantized layer's section: either a clear
    # error (rANS end state, index range, NaN) or a model that loads.
    layer_section = sections[2 + conv].data
    rng = np.random.default_rng(1)
    errors = 0
    for _ in range(40):
        damaged = bytearray(layer_section)
        for position in rng.integers(0, len(damaged), 3):
            damaged[position] = int(rng.integers(0, 256))
        try:
            RuntimeDetector(rebuild(sections, 2 + conv, bytes(damaged)))
        except RuntimeFailure as error:
            assert str(error)
            errors += 1
    assert errors > 0


def build_variant(name, *cmake_args):
    build_dir = RUNTIME_DIR / 'build' / name
    subprocess.run(['cmake', '-S', str(RUNTIME_DIR), '-B', str(build_dir),
                    *cmake_args], check=True, capture_output=True)
    subprocess.run(['cmake', '--build', str(build_dir), '--target',
                    'dgms_detect', '-j', '2'], check=True,
                   capture_output=True)
    return build_dir / 'dgms_detect'


def detections_of(command, env=None):
    proc = subprocess.run(command, capture_output=True, text=True,
                          timeout=600, env=env)
    return proc


@pytest.fixture(scope='module')
def tensor_file(packed, tmp_path_factory):
    config, _, path = packed
    reference, _ = load_packed_detector(str(path))
    batch = first_batches(config, 1)[0]
    data = reference.data_preprocessor(batch, False)
    sample = data['data_samples'][0]
    out = tmp_path_factory.mktemp('tensor') / 'image.bin'
    write_tensor_file(out, data['inputs'][0].numpy(), sample.img_shape,
                      sample.scale_factor)
    expected = RuntimeDetector(path).detect(data['inputs'][0].numpy(),
                                            sample.img_shape,
                                            sample.scale_factor)
    return out, expected


def check_cli_detections(proc, expected):
    assert proc.returncode == 0, proc.stderr[-3000:]
    dets = json.loads(proc.stdout)['detections']
    bboxes, scores, labels = expected
    assert len(dets) == len(scores)
    got_boxes = np.array([d['bbox'] for d in dets], np.float32)
    got_scores = np.array([d['score'] for d in dets], np.float32)
    np.testing.assert_allclose(got_boxes[:TOP], bboxes[:TOP], atol=1e-2)
    np.testing.assert_allclose(got_scores[:TOP], scores[:TOP], atol=1e-4)
    assert dets[0]['class'] == 'tree'


def profile_counts(stderr):
    """Nodes per operator from ``dgms_detect --profile`` output."""
    counts = {}
    for line in stderr.splitlines():
        match = re.match(r'\s+(\S.*?)\s+(\d+) nodes\s', line)
        if match:
            counts[match.group(1)] = int(match.group(2))
    return counts


def test_add_then_activation_runs_fused(packed, tensor_file, tmp_path):
    """An add whose only reader is a relu or relu6 node runs as one node.

    Its results equal those of an add that carries the activation. An add
    whose sum has another reader keeps its activation node."""
    config, _, path = packed
    sections = decode_container(path.read_bytes())
    nodes = json.loads(sections[1].data)['graphs']['main']['nodes']
    adds = [i for i, node in enumerate(nodes)
            if node['op'] == 'add' and node['activation'] == 'none']
    first, second = adds[1], adds[3]

    def variant(name, edit):
        grph = json.loads(sections[1].data)
        edit(grph['graphs']['main']['nodes'])
        out = tmp_path / f'{name}.dgms'
        out.write_bytes(rebuild(sections, 1, json.dumps(grph).encode()))
        return out

    def with_activation(nodes):
        nodes[first]['activation'] = 'relu'
        nodes[second]['activation'] = 'relu6'

    def separate_nodes(nodes):
        # The later add first, so that `first` still indexes its add.
        for index, op in ((second, 'relu6'), (first, 'relu')):
            value = nodes[index]['output']
            nodes[index]['output'] = value + '_sum'
            nodes.insert(index + 1, {'op': op, 'inputs': [value + '_sum'],
                                     'output': value})

    def shared_sum(nodes):
        value = nodes[first]['output']
        nodes[first]['output'] = value + '_sum'
        nodes[first + 1:first + 1] = [
            {'op': 'relu', 'inputs': [value + '_sum'],
             'output': value + '_relu'},
            {'op': 'add', 'inputs': [value + '_sum', value + '_relu'],
             'output': value, 'activation': 'none'}]

    binary = build_variant('release', '-DCMAKE_BUILD_TYPE=Release')
    runs = {}
    for name, edit in (('fused', with_activation),
                       ('separate', separate_nodes), ('shared', shared_sum)):
        model = variant(name, edit)
        proc = detections_of([str(binary), str(model), str(tensor_file[0]),
                              '--profile'])
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        runs[name] = (json.loads(proc.stdout)['detections'],
                      profile_counts(proc.stderr), model)
    fused, separate, shared = runs['fused'], runs['separate'], runs['shared']
    assert separate[0] == fused[0]
    assert separate[1] == fused[1]
    assert 'relu' not in separate[1] and 'relu6' not in separate[1]
    assert shared[1]['relu'] == 1
    assert shared[1]['add'] == fused[1]['add'] + 1
    # The shared sum feeds two nodes: compare with the Python reader.
    reference, _ = load_packed_detector(str(shared[2]))
    runtime = RuntimeDetector(shared[2])
    batch = first_batches(config, 1)[0]
    with torch.no_grad():
        expected = reference.test_step(batch)
        data = reference.data_preprocessor(batch, False)
    got = runtime.predict(data['inputs'], data['data_samples'])
    for a, b in zip(expected, got):
        assert_same_detections(a.pred_instances, b.pred_instances)


def test_conv_chains_run_banded(packed, tensor_file, detect_binary):
    """Each MobileNetV2 block (1x1 -> depthwise -> 1x1) runs as one
    conv_chain node, and the first block, which has no 1x1 expand, takes
    in the 3x3 stride-2 stem before it. Band by band (bands of one to a
    few rows, forced by a small --chain-band), one band per thread (the
    default band on 2 or 3 threads) or conv by conv (--chain-band 0), it
    gives the same bits."""
    _, _, path = packed
    base = [str(detect_binary), str(path), str(tensor_file[0])]
    runs = {}
    for band in ('0', '1', '5', '1024'):
        for threads in ('1', '2', '3'):
            proc = detections_of(base + ['--chain-band', band, '--threads',
                                         threads, '--profile'])
            check_cli_detections(proc, tensor_file[1])
            runs[band, threads] = (json.loads(proc.stdout)['detections'],
                                   profile_counts(proc.stderr))
    reference = runs['0', '1'][0]
    for key, (dets, _) in runs.items():
        assert dets == reference, key
    # MobileNetV2 has 17 blocks. The first has no expand conv and starts
    # with the full-precision stem instead.
    chains = runs['1', '1'][1]
    assert chains.get('conv_chain 3 q4') == 16, chains
    assert chains.get('conv_chain 3 f32/q4') == 1, chains
    assert 'conv_chain 2 q4' not in chains, chains
    assert 'conv2d 3x3 dw q4' not in chains, chains
    separate = runs['0', '1'][1]
    assert separate.get('conv2d 3x3 dw q4') == 17, separate
    assert not any(op.startswith('conv_chain') for op in separate), separate
    proc = detections_of(base + ['--chain-band', '-1'])
    assert proc.returncode == 2
    assert "--chain-band is '-1', expected an integer" in proc.stderr


def concurrent_nodes(stderr):
    """Return the count of concurrent nodes in ``dgms_detect --profile``."""
    match = re.search(r'; (\d+) nodes ran concurrently', stderr)
    return int(match.group(1)) if match else 0


def test_independent_nodes_run_concurrently(packed, tensor_file,
                                            detect_binary):
    """On 2 or 3 threads the FPN's 3x3 convs and the head's branches run
    as a task graph, each node on one thread, with the same bits as on
    one thread. The quantized 3x3 layers run Winograd on their decoded
    weights by default and the codebook kernels with --quant-winograd 0,
    both within the tolerance of the Python reader. The head's sibling
    convs run separately, because merged, this small head has too little
    work beside its longest path for a task graph."""
    _, _, path = packed
    base = [str(detect_binary), str(path), str(tensor_file[0]), '--profile',
            '--sibling-convs', 'separate']
    runs = {}
    for winograd in ('1024', '0'):
        for threads in ('1', '2', '3'):
            proc = detections_of(base + ['--threads', threads,
                                         '--quant-winograd', winograd])
            check_cli_detections(proc, tensor_file[1])
            runs[winograd, threads] = (json.loads(proc.stdout)['detections'],
                                       concurrent_nodes(proc.stderr))
        dets, concurrent = runs[winograd, '1']
        assert concurrent == 0
        for threads in ('2', '3'):
            assert runs[winograd, threads][0] == dets, (winograd, threads)
            # At least 2 levels of 5 nodes: the FPN conv and two head
            # branches of 2 convs.
            assert runs[winograd, threads][1] >= 10, runs[winograd, threads]
    assert runs['1024', '1'][0] != runs['0', '1'][0]
    proc = detections_of(base + ['--quant-winograd', '-5'])
    assert proc.returncode == 2
    assert "--quant-winograd is '-5', expected an integer" in proc.stderr


def test_sibling_convs_merge(packed, tensor_file, detect_binary):
    """The first convs of the head's class and box branches read the same
    value and run as one conv over both outputs. The detections are the
    same bits as with --sibling-convs separate, on 1 and 2 threads, with
    one node fewer per pyramid level. A bad value exits 2."""
    _, _, path = packed

    graph = json.loads(decode_container(path.read_bytes())[1].data)
    names = [layer['name'] for layer in graph['layers']]
    levels = sum(names[node['layer']] == 'bbox_head.retina_cls.conv'
                 or names[node['layer']] == 'bbox_head.retina_cls'
                 for node in graph['graphs']['main']['nodes']
                 if node['op'] == 'conv2d')
    assert levels >= 3

    base = [str(detect_binary), str(path), str(tensor_file[0]), '--profile']
    for threads in ('1', '2'):
        runs = {}
        for mode in ('merge', 'separate'):
            proc = detections_of(base + ['--threads', threads,
                                         '--sibling-convs', mode])
            check_cli_detections(proc, tensor_file[1])
            runs[mode] = (json.loads(proc.stdout)['detections'],
                          profile_counts(proc.stderr)['conv2d 3x3 f32'])
        assert runs['merge'][0] == runs['separate'][0], threads
        assert runs['separate'][1] - runs['merge'][1] == levels, runs

    default = detections_of(base)
    assert (profile_counts(default.stderr)['conv2d 3x3 f32']
            == runs['merge'][1])
    proc = detections_of(base + ['--sibling-convs', 'both'])
    assert proc.returncode == 2
    assert "--sibling-convs is 'both', expected merge or separate" in \
        proc.stderr


def test_cli_under_sanitizers(packed, tensor_file, tmp_path):
    """dgms_detect built with ASan + UBSan: a clean run, and malformed
    files give an error exit, never a sanitizer report."""
    _, _, path = packed
    binary = build_variant('sanitize', '-DCMAKE_BUILD_TYPE=RelWithDebInfo',
                           '-DDGMS_RT_SANITIZE=ON',
                           '-DDGMS_RT_BUILD_BENCHMARKS=OFF')
    env = dict(os.environ, ASAN_OPTIONS='detect_leaks=1:abort_on_error=1',
               UBSAN_OPTIONS='print_stacktrace=1:halt_on_error=1')
    for band in ('1024', '1'):  # conv chains whole and in 1-row bands
        check_cli_detections(
            detections_of([str(binary), str(path), str(tensor_file[0]),
                           '--threads', '2', '--chain-band', band], env),
            tensor_file[1])
    data = path.read_bytes()
    sections = decode_container(data)
    bad = {
        'short': data[:100],
        'flip': data[:5000] + bytes([data[5000] ^ 4]) + data[5001:],
        'json': rebuild(sections, 1, sections[1].data[:len(sections[1].data)
                                                       // 2]),
        'shape': rebuild(sections, 1, replace_once(
            sections[1].data, b'"in_channels":3,',
            b'"in_channels":99999999,')),
    }
    for name, content in bad.items():
        bad_path = tmp_path / f'{name}.dgms'
        bad_path.write_bytes(content)
        proc = detections_of([str(binary), str(bad_path),
                              str(tensor_file[0])], env)
        assert proc.returncode == 1, (name, proc.stderr[-3000:])
        assert 'dgms_detect: error:' in proc.stderr
        assert 'Sanitizer' not in proc.stderr
    # PPM preprocessing: downscaling, upscaling and a one-pixel-high
    # image, each dumped the same as by the release build.
    release = build_variant('release', '-DCMAKE_BUILD_TYPE=Release')
    for height, width in ((233, 301), (47, 61), (1, 5)):
        ppm = tmp_path / f'{width}x{height}.ppm'
        write_ppm(ppm, synthetic_rgb(height, width, seed=2))
        dumps = []
        for name, command in (('sanitize', binary), ('release', release)):
            dumps.append(tmp_path / f'{width}x{height}.{name}.bin')
            proc = detections_of([str(command), str(path), str(ppm),
                                  '--dump-input', str(dumps[-1])], env)
            assert proc.returncode == 0, (ppm.name, proc.stderr[-3000:])
            assert 'Sanitizer' not in proc.stderr
        assert dumps[0].read_bytes() == dumps[1].read_bytes(), ppm.name


def test_cli_on_aarch64_under_qemu(packed, tensor_file):
    """The AArch64 build (NEON kernels) gives the native detections."""
    if shutil.which('aarch64-linux-gnu-g++') is None or shutil.which(
            'qemu-aarch64') is None:
        pytest.fail('install g++-aarch64-linux-gnu and qemu-user to test '
                    'the AArch64 build')
    _, _, path = packed
    binary = build_variant(
        'aarch64', '-DCMAKE_BUILD_TYPE=Release',
        f'-DCMAKE_TOOLCHAIN_FILE={RUNTIME_DIR}/cmake/aarch64-linux-gnu.cmake')
    for band in ('1024', '1'):  # conv chains whole and in 1-row bands
        check_cli_detections(
            detections_of(['qemu-aarch64', '-L', '/usr/aarch64-linux-gnu',
                           str(binary), str(path), str(tensor_file[0]),
                           '--threads', '2', '--chain-band', band]),
            tensor_file[1])


def write_ppm(path, rgb):
    """Write an 8-bit (height, width, 3) RGB array as a binary PPM (P6)."""
    height, width, _ = rgb.shape
    header = f'P6\n# written by the runtime tests\n{width} {height}\n255\n'
    path.write_bytes(header.encode() + np.ascontiguousarray(rgb).tobytes())


def synthetic_rgb(height, width, seed):
    """Make an 8-bit RGB image with gradients, a sine pattern, a
    checkerboard with hard edges, a flat rectangle and noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.empty((height, width, 3))
    image[..., 0] = 255 * x / (width - 1)
    image[..., 1] = 127.5 + 127.5 * np.sin(x / 7 + y / 11)
    image[..., 2] = 255 * ((x // 13 + y // 17) % 2)
    image[height // 3:height // 2, width // 4:width // 2] = (250, 20, 5)
    image += np.random.default_rng(seed).normal(0, 6, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def mmdet_input(config, image_path):
    """Preprocess one image file as MMDetection does for ``config``.

    Runs the config's test pipeline without LoadAnnotations, since the
    image has no annotations (cv2 decoding as BGR and the Resize step),
    then its data preprocessor (channel swap, normalisation, padding).
    Returns the (3, H, W) input, its data sample and the config."""
    from mmengine.config import Config
    from mmengine.dataset import Compose
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(str(config))
    steps = [step for step in cfg.test_dataloader.dataset.pipeline
             if step['type'] != 'LoadAnnotations']
    assert [step['type'] for step in steps][:2] == [
        'LoadImageFromFile', 'Resize']
    preprocessor = MODELS.build(cfg.model.data_preprocessor)
    packed_inputs = Compose(steps)(dict(img_path=str(image_path), img_id=0))
    data = preprocessor(dict(inputs=[packed_inputs['inputs']],
                             data_samples=[packed_inputs['data_samples']]),
                        False)
    return data['inputs'][0].numpy(), data['data_samples'][0], cfg


def cli_detections(proc):
    """Parse dgms_detect's JSON output into InstanceData, best first."""
    from mmengine.structures import InstanceData
    assert proc.returncode == 0, proc.stderr[-3000:]
    dets = json.loads(proc.stdout)['detections']
    return InstanceData(
        bboxes=torch.tensor([d['bbox'] for d in dets]).reshape(-1, 4),
        scores=torch.tensor([d['score'] for d in dets]),
        labels=torch.tensor([d['label'] for d in dets]))


@pytest.fixture(scope='module')
def detect_binary():
    return build_variant('release', '-DCMAKE_BUILD_TYPE=Release')


# Synthetic images by name: (height, width, noise seed).
SYNTHETIC_IMAGES = {
    'synthetic-301x233': (233, 301, 0),
    'synthetic-61x47': (47, 61, 1),
    'synthetic-5x1': (1, 5, 2),
}


# NOTE: the expected values come from the opencv-python build that
# MMDetection uses here (5.1.0 on x86-64). Other builds of cv2.resize
# (another HAL, e.g. on ARM) may round differently.
@pytest.mark.parametrize('image', ['tree', *SYNTHETIC_IMAGES])
def test_ppm_input_matches_mmdet_pipeline(packed, tree_data, detect_binary,
                                          image, tmp_path):
    """dgms_detect's own preprocessing of a PPM against MMDetection's.

    'tree' is a 400x400 validation tile, downscaled by 0.32 to 128x128.
    The synthetic images are downscaled to 128x99, upscaled about 2.1x to
    128x99, and stretched to 128x26 from a single row, so the padding to
    a multiple of 32 adds rows to each of them.
    """
    config, _, path = packed
    if image == 'tree':
        val = json.loads((tree_data / 'annotations' / 'val.json').read_text())
        bgr = cv2.imread(str(tree_data / 'images' / val['images'][0][
            'file_name']))
        rgb = bgr[..., ::-1]
    else:
        rgb = synthetic_rgb(*SYNTHETIC_IMAGES[image])
    ppm = tmp_path / 'image.ppm'
    write_ppm(ppm, rgb)
    expected, sample, cfg = mmdet_input(config, ppm)

    dump = tmp_path / 'input.bin'
    from_ppm = detections_of([str(detect_binary), str(path), str(ppm),
                              '--dump-input', str(dump)])
    assert from_ppm.returncode == 0, from_ppm.stderr[-3000:]
    got, img_shape, scale_factor = read_tensor_file(dump)
    assert got.shape == expected.shape
    assert img_shape == tuple(sample.img_shape)
    np.testing.assert_allclose(scale_factor, sample.scale_factor, rtol=0,
                               atol=1e-6)

    # One 8-bit level is 1 / std after normalisation.
    level = 1 / np.asarray(cfg.model.data_preprocessor.std, np.float32)
    diff = np.abs(got - expected)
    assert np.all(diff <= level[:, None, None] + 1e-5), diff.max()
    img_h, img_w = img_shape
    differing = float(np.mean(diff[:, :img_h, :img_w] > 1e-5))
    # Measured 0 on every image here (the tensors are bit-identical). The
    # bound leaves room for another cv2 build, and rejects a plain float
    # bilinear resize, which puts 7.9-12.5 % of these values one level off.
    assert differing <= 0.01, differing
    assert np.all(got[:, img_h:, :] == expected[:, img_h:, :])
    assert np.all(got[:, :, img_w:] == expected[:, :, img_w:])

    tensor = tmp_path / 'mmdet_input.bin'
    write_tensor_file(tensor, expected, sample.img_shape, sample.scale_factor)
    from_tensor = detections_of([str(detect_binary), str(path), str(tensor)])
    assert from_tensor.returncode == 0, from_tensor.stderr[-3000:]
    same = (json.loads(from_ppm.stdout)['detections'] ==
            json.loads(from_tensor.stdout)['detections'])
    # Shown with pytest -s, for the figures in docs/deploy_arm.md.
    print(f'\n{image}: {int(np.sum(diff[:, :img_h, :img_w] > 1e-5))} of '
          f'{3 * img_h * img_w} image values differ, max |diff| '
          f'{diff.max():.3g}; identical detections: {same}')
    # Measured: identical boxes and scores, since the inputs are identical.
    # 1e-4 is the float32 tolerance of the other runtime tests.
    assert_same_detections(cli_detections(from_tensor),
                           cli_detections(from_ppm), min_iou=0.9,
                           score_tol=1e-4)


def test_cli_usage(detect_binary):
    """--help prints the usage on stdout and succeeds; a wrong argument
    count or value is an error that names what was expected."""
    proc = subprocess.run([str(detect_binary), '--help'], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('usage: dgms_detect'), proc.stdout
    proc = subprocess.run([str(detect_binary), 'model.dgms'],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert 'expected two arguments, MODEL.dgms and INPUT, got 1' in \
        proc.stderr
    proc = subprocess.run([str(detect_binary), 'm.dgms', 'i.ppm', '--repeat',
                           '0'], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--repeat is '0'" in proc.stderr
    proc = subprocess.run([str(detect_binary), 'm.dgms', 'i.ppm', '--isa',
                           'sse'], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--isa is 'sse', expected auto, scalar, avx2, avx512 or neon" in \
        proc.stderr


def test_instruction_sets_agree(packed, tensor_file, detect_binary):
    """Every instruction set this CPU runs gives the scalar kernels'
    detections, and the SIMD ones give the same bits as each other. One
    that the CPU lacks is an error that names it."""
    _, _, path = packed
    base = [str(detect_binary), str(path), str(tensor_file[0])]
    outputs = {}
    for isa in ('scalar', 'avx2', 'avx512', 'neon'):
        proc = detections_of(base + ['--isa', isa])
        if proc.returncode == 1 and 'is not available' in proc.stderr:
            assert f'--isa {isa} is not available' in proc.stderr
            continue
        check_cli_detections(proc, tensor_file[1])
        outputs[isa] = json.loads(proc.stdout)['detections']
    assert 'scalar' in outputs
    simd = [isa for isa in outputs if isa != 'scalar']
    if platform.machine() in ('x86_64', 'AMD64'):
        assert 'avx2' in simd, 'this x86-64 CPU ran no SIMD kernels'
    for isa in simd[1:]:
        assert outputs[isa] == outputs[simd[0]], (isa, simd[0])


def test_outputs_never_overwrite_inputs(packed, tensor_file, detect_binary,
                                       tmp_path):
    """--output or --dump-input naming the model or the input is an error
    that leaves both intact, and a folder as the model or the input is an
    error, not a crash."""
    _, _, path = packed
    model = tmp_path / 'model.dgms'
    model.write_bytes(path.read_bytes())
    image = tmp_path / 'image.tens'
    image.write_bytes(tensor_file[0].read_bytes())
    base = [str(detect_binary), str(model), str(image)]
    for option in ('--output', '--dump-input'):
        for target, spelled in ((model, model),
                                (image, tmp_path / '.' / 'image.tens')):
            proc = detections_of(base + [option, str(spelled)])
            assert proc.returncode == 1, (option, target, proc.stderr)
            assert 'that this run reads' in proc.stderr, proc.stderr
    assert model.read_bytes() == path.read_bytes()
    assert image.read_bytes() == tensor_file[0].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'image.tens', 'model.dgms']

    for args, kind in (([str(tmp_path), str(image)], 'packed .dgms file'),
                       ([str(model), str(tmp_path)], 'image or tensor file')):
        proc = detections_of([str(detect_binary)] + args)
        assert proc.returncode == 1, (args, proc.stderr)
        assert 'is not a regular file' in proc.stderr, proc.stderr
        assert kind in proc.stderr, proc.stderr


def test_dump_input_rejects_bad_paths(packed, tensor_file, detect_binary,
                                      tmp_path):
    """A dump that cannot be written is an error and leaves no file."""
    _, _, path = packed
    base = [str(detect_binary), str(path), str(tensor_file[0])]
    folder = tmp_path / 'folder'
    folder.mkdir()
    (folder / 'kept.txt').write_text('kept')
    cases = {
        'missing folder': (tmp_path / 'missing' / 'input.bin',
                           'does not exist'),
        'existing folder': (folder, 'is a folder'),
    }
    for name, (target, message) in cases.items():
        proc = detections_of(base + ['--dump-input', str(target)])
        assert proc.returncode == 1, (name, proc.stderr)
        assert message in proc.stderr, (name, proc.stderr)
        assert str(target) in proc.stderr, (name, proc.stderr)
        assert proc.stdout == '', name
    assert sorted(p.name for p in tmp_path.iterdir()) == ['folder']
    assert [p.name for p in folder.iterdir()] == ['kept.txt']

    same = tmp_path / 'out.json'
    proc = detections_of(base + ['--dump-input', str(same), '--output',
                                 str(same)])
    assert proc.returncode == 1, proc.stderr
    assert 'different files' in proc.stderr
    assert not same.exists()
    # The same file through another spelling of its path.
    spelled = tmp_path / 'folder' / '..' / 'out.json'
    proc = detections_of(base + ['--dump-input', str(same), '--output',
                                 str(spelled)])
    assert proc.returncode == 1, proc.stderr
    assert 'same file' in proc.stderr
    assert not same.exists()

    # A tensor file dumps unchanged, beside the detections of --output,
    # and no temporary file remains.
    dump = tmp_path / 'copy.bin'
    proc = detections_of(base + ['--dump-input', str(dump), '--output',
                                 str(same)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert dump.read_bytes() == tensor_file[0].read_bytes()
    assert json.loads(same.read_text())['detections']
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'copy.bin', 'folder', 'out.json']


def test_benchmark_folds_scales_exactly_enough(packed):
    """The ONNX Runtime baseline of tools/benchmark_runtime.py runs the
    graph with each conv's scale folded into its weights. That changes
    only the rounding of the graph's outputs."""
    from benchmark_runtime import fold_scales
    from mmdgms.pack.executor import GraphExecutor

    _, _, path = packed
    graph = read_packed(path.read_bytes()).graphs['main']
    plain = GraphExecutor(graph).eval()
    folded = fold_scales(GraphExecutor(graph).eval())
    scales = [name for name, _ in plain.named_buffers()
              if name.endswith('_scale')]
    assert scales, 'the test model has no folded BatchNorm scales'
    assert not [name for name, _ in folded.named_buffers()
                if name.endswith('_scale')]
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected, got = plain(image), folded(image)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4,
                                   atol=1e-4, msg=lambda m: f'{name}: {m}')
