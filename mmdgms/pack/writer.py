"""Serialise traced graphs and their parameters into a packed file."""
import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .codec import (empirical_entropy_bits, pack_bits, packed_size,
                    rans_encode)
from .container import Section, encode_container
from .graph import Graph, Node

FORMAT_NAME = 'mmdgms-packed-detector'
# Arrays inside a layer section start at multiples of this many bytes, so a
# reader that maps the file can use them in place as float32 or SIMD data.
ARRAY_ALIGNMENT = 16
WEIGHT_DTYPES = ('f32', 'f16')
# Values of conv fields that the layer table may leave out.
CONV_DEFAULTS = dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1],
                     groups=1)


@dataclass
class LayerReport:
    """Size figures of one stored layer (conv or linear)."""
    name: str
    kind: str  # 'quantized' or 'dense'
    bits: int  # bits per weight: the index width, or 32 / 16 when dense
    params: int  # weights + per-channel scale and bias values
    weights: int
    sparsity: Optional[float]  # fraction of index 0; None when dense
    stored_bytes: int  # bytes of the layer's arrays, without alignment
    content_bytes: int  # dense-packed size: indices at b bits + the rest
    fp32_bytes: int  # the same parameters in float32
    entropy_bits: Optional[float]  # empirical entropy of the indices
    index_bytes: int  # bytes of the stored index stream


class _SectionBuilder:
    """Accumulate the aligned arrays of one layer section."""

    def __init__(self):
        self.buffer = bytearray()

    def add(self, data: bytes) -> List[int]:
        """Append ``data``; return its [offset, nbytes] in the section."""
        offset = (len(self.buffer) + ARRAY_ALIGNMENT -
                  1) // ARRAY_ALIGNMENT * ARRAY_ALIGNMENT
        self.buffer.extend(b'\0' * (offset - len(self.buffer)))
        self.buffer.extend(data)
        return [offset, len(data)]

    def add_array(self, array: np.ndarray, dtype: str = 'f32') -> List[int]:
        numpy_dtype = {'f32': '<f4', 'f16': '<f2'}[dtype]
        converted = np.ascontiguousarray(array).astype(numpy_dtype)
        if dtype == 'f16' and not np.isfinite(converted).all():
            raise ValueError(
                'a weight exceeds the float16 range (65504); pack with '
                '--weight-dtype f32')
        return self.add(converted.tobytes())


def _add_channel_arrays(entry: Dict, section: _SectionBuilder, name: str,
                        channels: int, **arrays) -> int:
    """Store optional per-channel arrays; return how many values."""
    values = 0
    for key, array in arrays.items():
        if array is not None and array.size != channels:
            raise ValueError(f'{name}: {key} has {array.size} values for '
                             f'{channels} output channels')
        entry[key] = section.add_array(array) if array is not None else None
        values += 0 if array is None else array.size
    return values


def _conv_layer(node: Node, section: _SectionBuilder, weight_dtype: str,
                entropy: bool) -> Tuple[Dict, LayerReport]:
    """Store a conv's arrays in ``section``; return its layer-table entry
    and size report."""
    params, attrs = node.params, node.attrs
    entry = dict(type='conv2d', name=node.name)
    for key in ('in_channels', 'out_channels', 'kernel', 'stride', 'padding',
                'dilation', 'groups'):
        # Fields at their default value are left out to keep the graph
        # description small next to the weights.
        if attrs[key] != CONV_DEFAULTS.get(key):
            entry[key] = attrs[key]
    if params.indices is not None:
        indices = params.indices.reshape(-1)
        num_symbols = len(params.codebook)
        entry['bits'] = params.bits
        if entropy:
            entry['encoding'] = 'rans'
        entry['codebook'] = section.add_array(params.codebook)
        stream = (rans_encode(indices, num_symbols)
                  if entropy else pack_bits(indices, params.bits))
        entry['indices'] = section.add(stream)
        weights = int(indices.size)
        report = dict(kind='quantized', bits=params.bits, weights=weights,
                      sparsity=float((indices == 0).mean()) if weights else 0.,
                      stored=len(stream) + 4 * num_symbols,
                      content=packed_size(weights, params.bits) +
                      4 * num_symbols,
                      entropy_bits=empirical_entropy_bits(
                          indices, num_symbols),
                      index_bytes=len(stream))
    else:
        entry['dtype'] = weight_dtype
        entry['data'] = section.add_array(params.weight, weight_dtype)
        weights = int(params.weight.size)
        bits = 32 if weight_dtype == 'f32' else 16
        report = dict(kind='dense', bits=bits, weights=weights,
                      sparsity=None, stored=weights * bits // 8,
                      content=weights * bits // 8, entropy_bits=None,
                      index_bytes=0)

    extra = _add_channel_arrays(entry, section, node.name,
                                attrs['out_channels'], scale=params.scale,
                                bias=params.bias)
    return entry, LayerReport(node.name, report['kind'], report['bits'],
                              weights + extra, weights, report['sparsity'],
                              report['stored'] + 4 * extra,
                              report['content'] + 4 * extra,
                              4 * (weights + extra), report['entropy_bits'],
                              report['index_bytes'])


def _linear_layer(node: Node, section: _SectionBuilder,
                  weight_dtype: str) -> Tuple[Dict, LayerReport]:
    weight, bias = node.params['weight'], node.params['bias']
    entry = dict(type='linear', name=node.name,
                 in_features=node.attrs['in_features'],
                 out_features=node.attrs['out_features'], dtype=weight_dtype)
    entry['data'] = section.add_array(weight, weight_dtype)
    extra = _add_channel_arrays(entry, section, node.name,
                                node.attrs['out_features'], bias=bias)
    bits = 32 if weight_dtype == 'f32' else 16
    stored = weight.size * bits // 8 + 4 * extra
    return entry, LayerReport(node.name, 'dense', bits, weight.size + extra,
                              weight.size, None, stored, stored,
                              4 * (weight.size + extra), None, 0)


# Node fields besides op, inputs and output, by operator.
_NODE_FIELDS = {
    'max_pool2d': ('kernel', 'stride', 'padding', 'dilation', 'ceil_mode'),
    'resize_nearest': ('mode', 'scale'),
}


class _GraphEncoder:
    """Build the GRPH object and the LAYR sections for several graphs."""

    def __init__(self, weight_dtype: str, entropy: bool):
        self.weight_dtype = weight_dtype
        self.entropy = entropy
        self.sections: List[Section] = []
        self.layers: List[Dict] = []
        self.reports: List[LayerReport] = []
        # A layer called several times with the same folded norm is stored
        # once, and every call refers to its layer-table entry. A RetinaNet
        # head, for example, runs its convs once per pyramid level.
        self.layer_ids: Dict[tuple, int] = {}

    def layer(self, node: Node) -> int:
        key = (node.op, node.name, node.attrs.get('folded_norm'))
        if key not in self.layer_ids:
            builder = _SectionBuilder()
            if node.op == 'conv2d':
                entry, report = _conv_layer(node, builder, self.weight_dtype,
                                            self.entropy)
            else:
                entry, report = _linear_layer(node, builder,
                                              self.weight_dtype)
            # Layer i is stored in section 2 + i: META and GRPH come first.
            self.sections.append(Section('LAYR', bytes(builder.buffer)))
            self.layer_ids[key] = len(self.layers)
            self.layers.append(entry)
            self.reports.append(report)
        return self.layer_ids[key]

    def graph(self, graph: Graph) -> Dict:
        nodes = []
        for node in graph.nodes:
            entry = dict(op=node.op, inputs=node.inputs, output=node.output)
            if node.op in ('conv2d', 'linear'):
                entry['layer'] = self.layer(node)
            if 'activation' in node.attrs:
                entry['activation'] = node.attrs['activation']
            for key in _NODE_FIELDS.get(node.op, ()):
                if key in node.attrs:
                    entry[key] = node.attrs[key]
            nodes.append(entry)
        return dict(inputs=graph.inputs,
                    outputs=[[name, value] for name, value in graph.outputs],
                    nodes=nodes)


def _to_json(value) -> bytes:
    return json.dumps(value, separators=(',', ':'),
                      allow_nan=False).encode('utf-8')


def encode_packed(graphs: Dict[str, Graph], meta: Dict,
                  weight_dtype: str = 'f32',
                  entropy: bool = False):
    """Return (file bytes, per-layer reports) for ``graphs`` and ``meta``.

    Section order: META (model description, JSON), GRPH (layer table and
    graphs, JSON), then one LAYR section per layer-table entry.
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f'weight_dtype must be one of {WEIGHT_DTYPES}, got '
                         f'{weight_dtype!r}')
    encoder = _GraphEncoder(weight_dtype, entropy)
    graph_json = {name: encoder.graph(graph) for name, graph in graphs.items()}
    meta = dict(meta, format=FORMAT_NAME, weight_dtype=weight_dtype,
                index_encoding='rans' if entropy else 'bitpack')
    sections = [
        Section('META', _to_json(meta)),
        Section('GRPH', _to_json(dict(layers=encoder.layers,
                                      graphs=graph_json)))
    ] + encoder.sections
    return encode_container(sections), encoder.reports
