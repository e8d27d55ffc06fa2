"""Read and validate a packed file into graphs with numpy parameters.

Every field is checked before use: a malformed, truncated or corrupt file
raises :class:`PackedFormatError` naming the part that is wrong, never an
IndexError or a garbage model. Only numpy and the standard library are
needed here.
"""
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np

from .codec import rans_decode, unpack_bits
from .container import PackedFormatError, Section, decode_container
from .graph import ACTIVATIONS, ConvParams, Graph, Node
from .writer import CONV_DEFAULTS, FORMAT_NAME, WEIGHT_DTYPES

# Limits that no real detector reaches; larger values mean a corrupt or
# hostile file, and checking them first keeps allocations bounded.
MAX_CHANNELS = 1 << 16
MAX_KERNEL = 64
MAX_STRIDE = 64
MAX_PADDING = 1 << 12
OPS_INPUTS = {
    'conv2d': 1,
    'linear': 1,
    'add': 2,
    'relu': 1,
    'relu6': 1,
    'max_pool2d': 1,
    'resize_nearest': (1, 2),
    'flatten': 1,
}


@dataclass
class PackedModel:
    """A parsed packed file: the META object and the graphs by name."""
    meta: Dict[str, Any]
    graphs: Dict[str, Graph]
    file_size: int


class _Checker:
    """Typed access to JSON fields with errors that name the field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, message: str):
        raise PackedFormatError(f'{self.source}: {where}: {message}')

    def get(self, obj, key: str, kind, where: str):
        if not isinstance(obj, dict) or key not in obj:
            self.fail(where, f'missing field {key!r}')
        value = obj[key]
        if kind is int and (isinstance(value, bool)
                            or not isinstance(value, int)):
            self.fail(where, f'{key} must be an integer, got {value!r}')
        if kind is not int and not isinstance(value, kind):
            self.fail(where, f'{key} has the wrong type ({type(value).__name__})')
        return value

    def int_range(self, obj, key, low, high, where, default=None) -> int:
        if default is not None and isinstance(obj, dict) and key not in obj:
            return default
        value = self.get(obj, key, int, where)
        if not low <= value <= high:
            self.fail(where, f'{key}={value} is outside [{low}, {high}]')
        return value

    def pair(self, obj, key, low, high, where, default=None) -> List[int]:
        if default is not None and isinstance(obj, dict) and key not in obj:
            return list(default)
        value = self.get(obj, key, list, where)
        if len(value) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool)
                and low <= v <= high for v in value):
            self.fail(where, f'{key}={value!r} must be two integers in '
                      f'[{low}, {high}]')
        return value


def _parse_json(section: Section, source: str) -> Dict:
    try:
        value = json.loads(section.data.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PackedFormatError(
            f'{source}: the {section.tag} section is not valid JSON: '
            f'{error}') from None
    if not isinstance(value, dict):
        raise PackedFormatError(
            f'{source}: the {section.tag} section must hold a JSON object')
    return value


class _GraphReader:
    """Parse the GRPH object: the layer table, then the graphs."""

    def __init__(self, sections: List[Section], check: _Checker):
        self.sections = sections
        self.check = check
        self.layers: List[Tuple[Dict, Any]] = []

    def raw(self, section: bytes, entry, key: str, where: str) -> bytes:
        ref = self.check.get(entry, key, list, where)
        if len(ref) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in ref):
            self.check.fail(where, f'{key} must be [offset, nbytes], got '
                            f'{ref!r}')
        offset, nbytes = ref
        if offset < 0 or nbytes < 0 or offset + nbytes > len(section):
            self.check.fail(
                where, f'{key} spans bytes {offset}-{offset + nbytes}, '
                f'outside its {len(section)}-byte section')
        return section[offset:offset + nbytes]

    def array(self, section: bytes, entry, key: str, shape: List[int],
              dtype: str, where: str) -> np.ndarray:
        data = self.raw(section, entry, key, where)
        itemsize = 4 if dtype == 'f32' else 2
        count = math.prod(shape)
        if len(data) != count * itemsize:
            self.check.fail(
                where, f'{key} of shape {shape} in {dtype} takes '
                f'{count * itemsize} bytes, but {len(data)} are stored')
        array = np.frombuffer(data, '<f4' if dtype == 'f32' else '<f2')
        array = array.astype(np.float32).reshape(shape)
        if not np.isfinite(array).all():
            self.check.fail(where, f'{key} contains NaN or infinity')
        return array

    def optional_array(self, section, entry, key, channels, where):
        if entry.get(key) is None:
            return None
        return self.array(section, entry, key, [channels], 'f32', where)

    def dtype(self, entry, where: str) -> str:
        dtype = self.check.get(entry, 'dtype', str, where)
        if dtype not in WEIGHT_DTYPES:
            self.check.fail(where, f'dtype {dtype!r} is not one of '
                            f'{WEIGHT_DTYPES}')
        return dtype

    def conv(self, entry, section: bytes, where: str):
        check = self.check
        in_channels = check.int_range(entry, 'in_channels', 1, MAX_CHANNELS,
                                      where)
        out_channels = check.int_range(entry, 'out_channels', 1,
                                       MAX_CHANNELS, where)
        groups = check.int_range(entry, 'groups', 1, MAX_CHANNELS, where,
                                 CONV_DEFAULTS['groups'])
        if in_channels % groups or out_channels % groups:
            check.fail(where, f'groups={groups} does not divide '
                       f'{in_channels} input and {out_channels} output '
                       'channels')
        attrs = dict(in_channels=in_channels, out_channels=out_channels,
                     groups=groups,
                     kernel=check.pair(entry, 'kernel', 1, MAX_KERNEL, where),
                     stride=check.pair(entry, 'stride', 1, MAX_STRIDE, where,
                                       CONV_DEFAULTS['stride']),
                     padding=check.pair(entry, 'padding', 0, MAX_PADDING,
                                        where, CONV_DEFAULTS['padding']),
                     dilation=check.pair(entry, 'dilation', 1, MAX_KERNEL,
                                         where, CONV_DEFAULTS['dilation']))
        shape = [out_channels, in_channels // groups] + attrs['kernel']
        params = ConvParams()
        if 'bits' in entry:
            params.bits = check.int_range(entry, 'bits', 1, 8, where)
            data = self.raw(section, entry, 'codebook', where)
            size = len(data) // 4
            if len(data) % 4 or not 2 <= size <= 1 << params.bits:
                check.fail(where, f'a {params.bits}-bit codebook must have '
                           f'2 to {1 << params.bits} float32 entries, got '
                           f'{len(data)} bytes')
            params.codebook = self.array(section, entry, 'codebook', [size],
                                         'f32', where)
            params.indices = self.indices(section, entry, shape, params,
                                          where)
        else:
            params.weight = self.array(section, entry, 'data', shape,
                                       self.dtype(entry, where), where)
        params.scale = self.optional_array(section, entry, 'scale',
                                           out_channels, where)
        params.bias = self.optional_array(section, entry, 'bias',
                                          out_channels, where)
        if params.scale is not None and params.bias is None:
            check.fail(where, 'a folded scale needs a bias')
        return attrs, params

    def indices(self, section, entry, shape, params, where) -> np.ndarray:
        check = self.check
        count = math.prod(shape)
        data = self.raw(section, entry, 'indices', where)
        encoding = entry.get('encoding', 'bitpack')
        if encoding not in ('bitpack', 'rans'):
            check.fail(where, f'unknown index encoding {encoding!r}')
        try:
            if encoding == 'bitpack':
                indices = unpack_bits(data, params.bits, count)
            else:
                indices = rans_decode(data, len(params.codebook), count)
        except PackedFormatError as error:
            check.fail(where, str(error))
        if count and int(indices.max()) >= len(params.codebook):
            check.fail(where, f'index {int(indices.max())} is outside its '
                       f'codebook of {len(params.codebook)} entries')
        return indices.reshape(shape)

    def linear(self, entry, section: bytes, where: str):
        check = self.check
        in_features = check.int_range(entry, 'in_features', 1, 1 << 24,
                                      where)
        out_features = check.int_range(entry, 'out_features', 1, 1 << 24,
                                       where)
        weight = self.array(section, entry, 'data',
                            [out_features, in_features],
                            self.dtype(entry, where), where)
        params = dict(weight=weight,
                      bias=self.optional_array(section, entry, 'bias',
                                               out_features, where))
        return dict(in_features=in_features, out_features=out_features), \
            params

    def layer_table(self, table) -> None:
        check = self.check
        used = set()
        for index, entry in enumerate(table):
            where = f'layer {index}'
            kind = check.get(entry, 'type', str, where)
            name = check.get(entry, 'name', str, where)
            where = f'layer {index} ({name})'
            section_index = 2 + index
            if section_index >= len(self.sections) or self.sections[
                    section_index].tag != 'LAYR':
                check.fail(where, f'section {section_index} must be its LAYR '
                           'section')
            used.add(section_index)
            section = self.sections[section_index].data
            if kind == 'conv2d':
                attrs, params = self.conv(entry, section, where)
            elif kind == 'linear':
                attrs, params = self.linear(entry, section, where)
            else:
                check.fail(where, f'unknown layer type {kind!r}')
            self.layers.append((dict(attrs, type=kind, name=name), params))
        unused = set(range(2, len(self.sections))) - used
        if unused:
            check.fail('layers', f'sections {sorted(unused)} belong to no '
                       'layer')

    def graph(self, name: str, obj) -> Graph:
        check = self.check
        where = f'graph {name!r}'
        inputs = check.get(obj, 'inputs', list, where)
        defined = set()
        for value in inputs:
            if not isinstance(value, str) or value in defined:
                check.fail(where, f'invalid input name {value!r}')
            defined.add(value)
        nodes = []
        for index, entry in enumerate(check.get(obj, 'nodes', list, where)):
            nodes.append(self.node(entry, f'{where} node {index}', defined))
        outputs = []
        for entry in check.get(obj, 'outputs', list, where):
            if (not isinstance(entry, list) or len(entry) != 2
                    or not all(isinstance(v, str) for v in entry)):
                check.fail(where, f'an output must be [name, value], got '
                           f'{entry!r}')
            if entry[1] not in defined:
                check.fail(where, f'output {entry[0]!r} refers to undefined '
                           f'value {entry[1]!r}')
            outputs.append((entry[0], entry[1]))
        return Graph(inputs, nodes, outputs)

    def node(self, entry, where: str, defined: set) -> Node:
        check = self.check
        op = check.get(entry, 'op', str, where)
        if op not in OPS_INPUTS:
            check.fail(where, f'unknown operator {op!r}; this reader '
                       f'supports {sorted(OPS_INPUTS)}')
        inputs = check.get(entry, 'inputs', list, where)
        allowed = OPS_INPUTS[op]
        allowed = allowed if isinstance(allowed, tuple) else (allowed, )
        if len(inputs) not in allowed:
            check.fail(where, f'{op} takes {allowed} inputs, got '
                       f'{len(inputs)}')
        for value in inputs:
            if value not in defined:
                check.fail(where, f'input {value!r} is not defined before '
                           'this node')
        output = check.get(entry, 'output', str, where)
        if output in defined:
            check.fail(where, f'output {output!r} is defined twice')
        defined.add(output)

        name, attrs, params = op, {}, None
        if op in ('conv2d', 'linear'):
            index = check.get(entry, 'layer', int, where)
            if not 0 <= index < len(self.layers):
                check.fail(where, f'layer {index} is not in the layer table '
                           f'of {len(self.layers)} layers')
            layer_attrs, params = self.layers[index]
            if layer_attrs['type'] != op:
                check.fail(where, f'layer {index} is a '
                           f'{layer_attrs["type"]}, not a {op}')
            name = layer_attrs['name']
            attrs.update(layer_attrs)
        if op in ('conv2d', 'linear', 'add'):
            attrs['activation'] = check.get(entry, 'activation', str, where)
            if attrs['activation'] not in ACTIVATIONS:
                check.fail(where, 'unknown activation '
                           f'{attrs["activation"]!r}')
        if op == 'max_pool2d':
            attrs.update(
                kernel=check.pair(entry, 'kernel', 1, MAX_KERNEL, where),
                stride=check.pair(entry, 'stride', 1, MAX_STRIDE, where),
                padding=check.pair(entry, 'padding', 0, MAX_KERNEL, where),
                dilation=check.pair(entry, 'dilation', 1, MAX_KERNEL, where),
                ceil_mode=check.get(entry, 'ceil_mode', bool, where))
        elif op == 'resize_nearest':
            attrs['mode'] = check.get(entry, 'mode', str, where)
            if attrs['mode'] == 'scale':
                attrs['scale'] = check.pair(entry, 'scale', 1, MAX_STRIDE,
                                            where)
                expected = 1
            elif attrs['mode'] == 'size_of':
                expected = 2
            else:
                check.fail(where, f'unknown resize mode {attrs["mode"]!r}')
            if len(inputs) != expected:
                check.fail(where, f'resize mode {attrs["mode"]!r} takes '
                           f'{expected} inputs')
        return Node(op, name, list(inputs), output, attrs, params)


def read_packed(source, name: str = None) -> PackedModel:
    """Parse and validate a packed file.

    Args:
        source: a path, or the file's bytes.
        name: how to refer to the file in errors (default: the path).

    Raises:
        PackedFormatError: for any malformed, truncated or corrupt content.
        FileNotFoundError: when the path does not exist.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or 'packed data'
    else:
        name = name or str(source)
        with open(source, 'rb') as f:
            data = f.read()
    sections = decode_container(data, name)
    check = _Checker(name)
    if len(sections) < 2 or [s.tag for s in sections[:2]] != ['META',
                                                               'GRPH']:
        check.fail('sections', 'the first two sections must be META and '
                   f'GRPH, got {[s.tag for s in sections[:2]]}')
    meta = _parse_json(sections[0], name)
    if meta.get('format') != FORMAT_NAME:
        check.fail('META', f'format is {meta.get("format")!r}, expected '
                   f'{FORMAT_NAME!r}')
    graph_obj = _parse_json(sections[1], name)
    reader = _GraphReader(sections, check)
    reader.layer_table(check.get(graph_obj, 'layers', list, 'GRPH'))
    graphs_obj = check.get(graph_obj, 'graphs', dict, 'GRPH')
    graphs = {
        graph_name: reader.graph(graph_name, obj)
        for graph_name, obj in graphs_obj.items()
    }
    return PackedModel(meta, graphs, len(data))
