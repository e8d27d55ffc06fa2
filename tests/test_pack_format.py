"""The packed file format: codecs, container, graph semantics, bad files.

These tests build small graphs by hand, so every byte of a file can be
truncated or changed in reasonable time.
"""
import json
import random
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmdgms.pack import PackedFormatError, read_packed
from mmdgms.pack.codec import (empirical_entropy_bits, pack_bits,
                               quantize_frequencies, rans_decode,
                               rans_encode, unpack_bits)
from mmdgms.pack.container import (ALIGNMENT, HEADER_SIZE, MAGIC, Section,
                                   decode_container, encode_container,
                                   write_atomic)
from mmdgms.pack.executor import GraphExecutor
from mmdgms.pack.graph import ConvParams, Graph, Node, fold_batch_norm
from mmdgms.pack.writer import encode_packed

META = dict(detector=dict(kind='single_stage', num_levels=1), classes=None)


def _conv(name, inputs, output, in_ch, out_ch, params, kernel=3, stride=1,
          padding=1, dilation=1, groups=1, activation='none'):
    attrs = dict(in_channels=in_ch, out_channels=out_ch,
                 kernel=[kernel, kernel], stride=[stride, stride],
                 padding=[padding, padding], dilation=[dilation, dilation],
                 groups=groups, activation=activation)
    return Node('conv2d', name, inputs, output, attrs, params)


def micro_graph(bits=2, codebook_size=None, seed=0) -> Graph:
    """A quantized conv with folded BN and ReLU, a dense depthwise conv, a
    residual add, max pooling, a nearest resize and a linear layer."""
    rng = np.random.default_rng(seed)
    k = codebook_size or 2**bits
    codebook = np.concatenate([[0.0], np.sort(rng.normal(size=k - 1))])
    quantized = ConvParams(
        indices=rng.integers(0, k, size=(4, 3, 3, 3)).astype(np.uint8),
        codebook=codebook.astype(np.float32), bits=bits,
        scale=rng.uniform(0.5, 2, 4).astype(np.float32),
        bias=rng.normal(size=4).astype(np.float32))
    dense = ConvParams(weight=rng.normal(size=(4, 1, 3, 3)).astype(
        np.float32), bias=rng.normal(size=4).astype(np.float32))
    linear = dict(weight=rng.normal(size=(2, 4 * 3 * 3)).astype(np.float32),
                  bias=rng.normal(size=2).astype(np.float32))
    nodes = [
        _conv('q', ['v0'], 'v1', 3, 4, quantized, activation='relu'),
        _conv('dw', ['v1'], 'v2', 4, 4, dense, stride=2, groups=4),
        Node('max_pool2d', 'pool', ['v1'], 'v3',
             dict(kernel=[3, 3], stride=[2, 2], padding=[1, 1],
                  dilation=[1, 1], ceil_mode=False)),
        Node('add', 'add', ['v2', 'v3'], 'v4', dict(activation='relu6')),
        Node('resize_nearest', 'up', ['v4', 'v1'], 'v5',
             dict(mode='size_of')),
        Node('resize_nearest', 'up2', ['v4'], 'v6',
             dict(mode='scale', scale=[2, 2])),
        Node('relu', 'relu', ['v5'], 'v7'),
        Node('max_pool2d', 'shrink', ['v4'], 'v8',
             dict(kernel=[2, 2], stride=[2, 2], padding=[0, 0],
                  dilation=[1, 1], ceil_mode=True)),
        Node('flatten', 'flatten', ['v8'], 'v9'),
        Node('linear', 'fc', ['v9'], 'v10',
             dict(in_features=36, out_features=2, activation='none'), linear),
    ]
    return Graph(['v0'], nodes, [('out', 'v7'), ('up', 'v6'),
                                 ('fc', 'v10')])


def micro_file(**kwargs) -> bytes:
    data, _ = encode_packed(dict(main=micro_graph(**kwargs)), META)
    return data


def reference_outputs(graph: Graph, x: torch.Tensor) -> dict:
    """The micro graph computed directly with torch."""
    q, dw = graph.nodes[0].params, graph.nodes[1].params
    fc = graph.nodes[-1].params
    weight = torch.from_numpy(q.codebook)[torch.from_numpy(
        q.indices.astype(np.int64))]
    v1 = F.conv2d(x, weight, None, 1, 1)
    v1 = F.relu(v1 * torch.from_numpy(q.scale).view(1, -1, 1, 1) +
                torch.from_numpy(q.bias).view(1, -1, 1, 1))
    v2 = F.conv2d(v1, torch.from_numpy(dw.weight), torch.from_numpy(dw.bias),
                  2, 1, 1, 4)
    v3 = F.max_pool2d(v1, 3, 2, 1)
    v4 = F.relu6(v2 + v3)
    v5 = F.interpolate(v4, size=v1.shape[2:], mode='nearest')
    v8 = F.max_pool2d(v4, 2, 2, 0, ceil_mode=True)
    v10 = F.linear(v8.flatten(1), torch.from_numpy(fc['weight']),
                   torch.from_numpy(fc['bias']))
    return dict(out=F.relu(v5), up=F.interpolate(v4, scale_factor=2),
                fc=v10)


def rewrite_section(data: bytes, index: int, new_bytes: bytes) -> bytes:
    """Replace one section and re-encode, so every checksum is valid."""
    sections = decode_container(data)
    sections[index] = Section(sections[index].tag, new_bytes)
    return encode_container(sections)


def rewrite_grph(data: bytes, edit) -> bytes:
    sections = decode_container(data)
    obj = json.loads(sections[1].data)
    edit(obj)
    return rewrite_section(data, 1, json.dumps(obj).encode())


# --- codecs -----------------------------------------------------------


@pytest.mark.parametrize('bits', [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize('count', [0, 1, 7, 8, 9, 1000])
def test_bit_packing_round_trip(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    indices = rng.integers(0, 2**bits, size=count).astype(np.uint8)
    data = pack_bits(indices, bits)
    assert len(data) == (count * bits + 7) // 8
    assert np.array_equal(unpack_bits(data, bits, count), indices)


def test_bit_packing_layout_is_lsb_first():
    # 3-bit indices 1, 2, 7: bits 100 010 111 -> byte 0 = 0b11010001.
    data = pack_bits(np.array([1, 2, 7], np.uint8), 3)
    assert data == bytes([0b11010001, 0b00000001])


def test_bit_packing_rejects_wrong_length():
    with pytest.raises(PackedFormatError, match='takes 2 bytes'):
        unpack_bits(b'\0', 3, 5)


@pytest.mark.parametrize('count,symbols,skew', [(1, 2, 0.0), (5, 16, 0.0),
                                                (4096, 4, 3.0),
                                                (50000, 16, 0.5),
                                                (200000, 256, 0.05),
                                                (300001, 4, 8.0)])
def test_rans_round_trip_and_bound(count, symbols, skew):
    rng = np.random.default_rng(count)
    probs = np.exp(-skew * np.arange(symbols))
    indices = rng.choice(symbols, size=count, p=probs / probs.sum())
    indices = indices.astype(np.uint8)
    data = rans_encode(indices, symbols)
    assert np.array_equal(rans_decode(data, symbols, count), indices)
    # Within 3% of the entropy bound, plus the fixed parts: the 16-byte
    # header, the frequency table and one 4-byte final state per lane.
    lanes = struct.unpack_from('<I', data)[0]
    fixed_bytes = 16 + 4 * symbols + 4 * lanes
    bound = empirical_entropy_bits(indices, symbols)
    assert 8 * (len(data) - fixed_bytes) <= 1.03 * bound + 16


def test_rans_single_symbol_stream():
    indices = np.zeros(10000, np.uint8)
    data = rans_encode(indices, 4)
    assert np.array_equal(rans_decode(data, 4, 10000), indices)
    assert len(data) < 64


def test_rans_detects_changed_words():
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 16, size=20000).astype(np.uint8)
    data = bytearray(rans_encode(indices, 16))
    data[-3] ^= 0x5A
    with pytest.raises(PackedFormatError, match='end state'):
        rans_decode(bytes(data), 16, 20000)


def test_frequencies_sum_and_keep_rare_symbols():
    counts = np.array([10**7, 1, 0, 3, 5])
    freqs = quantize_frequencies(counts)
    assert freqs.sum() == 1 << 16
    assert freqs[2] == 0
    assert (freqs[[0, 1, 3, 4]] >= 1).all()


# --- container and graph ---------------------------------------------


def test_container_layout_is_aligned_little_endian():
    data = encode_container([Section('META', b'{}'), Section('LAYR', b'x')])
    magic, major, minor, header_size = struct.unpack_from('<8sHHI', data)
    assert (magic, major, minor, header_size) == (MAGIC, 1, 0, HEADER_SIZE)
    sections = decode_container(data)
    assert [s.tag for s in sections] == ['META', 'LAYR']
    offsets = [
        struct.unpack_from('<Q', data, HEADER_SIZE + 32 * i + 8)[0]
        for i in range(2)
    ]
    assert all(offset % ALIGNMENT == 0 for offset in offsets)


@pytest.mark.parametrize('bits,size', [(2, 4), (2, 3), (3, 8), (8, 256)])
def test_micro_graph_matches_torch(bits, size):
    graph = micro_graph(bits=bits, codebook_size=size)
    data, reports = encode_packed(dict(main=graph), META)
    packed = read_packed(data)
    x = torch.randn(1, 3, 10, 12, generator=torch.Generator().manual_seed(3))
    got = GraphExecutor(packed.graphs['main'])(x)
    expected = reference_outputs(graph, x)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-5)
    assert np.array_equal(packed.graphs['main'].nodes[0].params.indices,
                          graph.nodes[0].params.indices)
    assert [r.kind for r in reports] == ['quantized', 'dense', 'dense']


def test_fp16_storage_rounds_dense_weights_only():
    graph = micro_graph()
    data, _ = encode_packed(dict(main=graph), META, weight_dtype='f16')
    nodes = read_packed(data).graphs['main'].nodes
    dense = graph.nodes[1].params.weight
    assert np.array_equal(nodes[1].params.weight,
                          dense.astype(np.float16).astype(np.float32))
    assert np.array_equal(nodes[0].params.codebook,
                          graph.nodes[0].params.codebook)
    assert np.array_equal(nodes[0].params.scale, graph.nodes[0].params.scale)


def test_batch_norm_folding_is_exact():
    torch.manual_seed(0)
    for channels in (1, 7, 64, 301):
        bn = torch.nn.BatchNorm2d(channels).eval()
        bn.running_mean.normal_(std=3)
        bn.running_var.uniform_(1e-5, 20)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
        x = torch.randn(2, channels, 9, 5) * 4
        scale, bias = fold_batch_norm(bn, None)
        folded = torch.addcmul(
            torch.from_numpy(bias).view(1, -1, 1, 1), x,
            torch.from_numpy(scale).view(1, -1, 1, 1))
        assert torch.equal(folded, bn(x)), channels


# --- malformed files --------------------------------------------------


def test_every_truncation_is_rejected():
    data = micro_file()
    assert len(data) < 4096
    for length in range(len(data)):
        with pytest.raises(PackedFormatError):
            read_packed(data[:length])


def test_trailing_bytes_are_rejected():
    with pytest.raises(PackedFormatError, match='trailing data'):
        read_packed(micro_file() + b'\0')


def test_every_changed_byte_is_detected():
    data = micro_file()
    rng = random.Random(0)
    for position in range(len(data)):
        corrupt = bytearray(data)
        corrupt[position] ^= rng.randrange(1, 256)
        with pytest.raises(PackedFormatError):
            read_packed(bytes(corrupt))


def test_wrong_magic_is_named():
    data = b'NOTAPACK' + micro_file()[8:]
    with pytest.raises(PackedFormatError, match='not a packed DGMS model'):
        read_packed(data)


def test_newer_version_is_rejected():
    data = bytearray(micro_file())
    struct.pack_into('<H', data, 8, 2)
    struct.pack_into('<I', data, 44, 0)
    import zlib
    struct.pack_into('<I', data, 44, zlib.crc32(bytes(data[:HEADER_SIZE])))
    with pytest.raises(PackedFormatError, match='newer than'):
        read_packed(bytes(data))


def test_index_outside_codebook_is_rejected():
    graph = micro_graph(bits=2, codebook_size=3)
    graph.nodes[0].params.indices[0, 0, 0, 0] = 3
    data, _ = encode_packed(dict(main=graph), META)
    with pytest.raises(PackedFormatError, match='outside its codebook of 3'):
        read_packed(data)


@pytest.mark.parametrize('field,value,message', [
    ('out_channels', 1 << 40, 'outside'),
    ('out_channels', 0, 'outside'),
    ('groups', 3, 'does not divide'),
    ('kernel', [3, -1], 'two integers'),
    ('stride', [1], 'two integers'),
    ('bits', 9, 'outside'),
    ('in_channels', '3', 'integer'),
    ('indices', [1 << 62, 4], 'outside its'),
    ('encoding', 'zip', 'unknown index encoding'),
])
def test_absurd_layer_fields_are_rejected(field, value, message):

    def edit(obj):
        obj['layers'][0][field] = value

    with pytest.raises(PackedFormatError, match=message):
        read_packed(rewrite_grph(micro_file(), edit))


@pytest.mark.parametrize('edit,message', [
    (lambda g: g['graphs']['main']['nodes'][0].update(op='gelu'),
     'unknown operator'),
    (lambda g: g['graphs']['main']['nodes'][1].update(inputs=['v99']),
     'not defined'),
    (lambda g: g['graphs']['main']['nodes'][0].update(layer=7),
     'not in the layer table'),
    (lambda g: g['graphs']['main']['outputs'].append(['x', 'v42']),
     'undefined'),
    (lambda g: g.pop('layers'), "missing field 'layers'"),
])
def test_inconsistent_graphs_are_rejected(edit, message):
    with pytest.raises(PackedFormatError, match=message):
        read_packed(rewrite_grph(micro_file(), edit))


def test_invalid_json_is_rejected():
    with pytest.raises(PackedFormatError, match='not valid JSON'):
        read_packed(rewrite_section(micro_file(), 1, b'{"layers": ['))


def test_write_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / 'model.dgms'
    path.write_bytes(b'old')
    # A str is not bytes-like, so the write fails after the temporary file
    # was created.
    with pytest.raises(TypeError):
        write_atomic(str(path), 'new')
    assert path.read_bytes() == b'old'
    assert [p.name for p in tmp_path.iterdir()] == ['model.dgms']


# --- what the packer cannot describe --------------------------------------


class _Block(torch.nn.Module):

    def __init__(self, tail):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.tail = tail

    def forward(self, x):
        return self.tail(self.conv(x))


@pytest.mark.parametrize('tail,message', [
    (torch.nn.GELU(), 'GELU'),
    (torch.sigmoid, 'sigmoid'),
    (lambda x: F.interpolate(x, scale_factor=2, mode='bilinear'),
     'nearest'),
    (lambda x: x * 2, 'mul'),
    (torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'),
     'padding_mode'),
    (torch.nn.BatchNorm2d(4), None),
])
def test_unsupported_parts_are_named(tail, message):
    from mmdgms.pack.graph import UnsupportedModelError, trace_graph
    module = _Block(tail).eval()
    if message is None:
        # BatchNorm right after a conv is folded, not rejected.
        graph = trace_graph(module, ['out'])
        assert [n.op for n in graph.nodes] == ['conv2d']
        assert graph.nodes[0].params.scale is not None
        return
    with pytest.raises(UnsupportedModelError, match=message):
        trace_graph(module, ['out'])


def test_batch_norm_without_conv_is_rejected():
    from mmdgms.pack.graph import UnsupportedModelError, trace_graph
    module = torch.nn.Sequential(torch.nn.ReLU(),
                                 torch.nn.BatchNorm2d(3)).eval()
    with pytest.raises(UnsupportedModelError, match='must directly follow'):
        trace_graph(module, ['out'])


def test_write_atomic_uses_umask_permissions(tmp_path):
    import os
    path = tmp_path / 'model.dgms'
    old = os.umask(0o022)
    try:
        write_atomic(str(path), b'data')
    finally:
        os.umask(old)
    assert path.read_bytes() == b'data'
    assert path.stat().st_mode & 0o777 == 0o644
