"""Trace a detector's tensor computation into the packed graph description.

torch.fx traces the eval-mode forward of the backbone, neck and heads with
convs, norms, activations, pooling and linear layers kept as leaves. The
trace is then lowered to the small operator set of docs/packed-format.md:
BatchNorm is folded into the conv before it as a per-output-channel scale
and bias, and ReLU or ReLU6 is fused into the conv or add that feeds it.
Anything outside that set raises :class:`UnsupportedModelError` naming the
module or function, so no layer is ever skipped silently.
"""
import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..ops.dgms_conv import DGMSConv2d

ACTIVATIONS = ('none', 'relu', 'relu6')


class UnsupportedModelError(ValueError):
    """A model part that the packed format cannot describe."""


@dataclass
class ConvParams:
    """Parameters of one conv node, in float32 unless noted.

    ``indices`` and ``codebook`` are set for a quantized conv (weight =
    codebook[indices] * 1); ``weight`` for a dense one. ``scale`` and
    ``bias`` are per output channel; ``scale`` is set only where BatchNorm
    was folded in.
    """
    weight: Optional[np.ndarray] = None
    indices: Optional[np.ndarray] = None
    codebook: Optional[np.ndarray] = None
    bits: int = 0
    scale: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None


@dataclass
class Node:
    """One operator, which reads ``inputs`` (value names) and writes
    ``output``. ``attrs`` are JSON-serialisable settings and ``params`` the
    arrays: ConvParams for conv2d, a dict of arrays for linear."""
    op: str
    name: str
    inputs: List[str]
    output: str
    attrs: Dict[str, Any] = field(default_factory=dict)
    params: Any = None


@dataclass
class Graph:
    """A traced graph: named inputs, nodes in execution order, and named
    outputs (output name -> value name)."""
    inputs: List[str]
    nodes: List[Node]
    outputs: List[Tuple[str, str]]


class _LeafTracer(fx.Tracer):
    LEAVES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Identity,
              nn.MaxPool2d, nn.Linear)

    def is_leaf_module(self, module, qualified_name):
        if isinstance(module, self.LEAVES):
            return True
        return super().is_leaf_module(module, qualified_name)


def _pair(value, what: str, layer: str) -> List[int]:
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) for v in value):
        return [int(v) for v in value]
    raise UnsupportedModelError(
        f'{layer}: {what}={value!r} is not supported; the packed format '
        'stores two integers')


def fold_batch_norm(bn: nn.BatchNorm2d,
                    conv_bias: Optional[torch.Tensor]) -> Tuple[np.ndarray,
                                                                np.ndarray]:
    """Return (scale, bias) with BN(conv(x) + conv_bias) = scale * conv(x)
    + bias per output channel.

    scale = gamma / sqrt(var + eps) is computed in float32 with rsqrt and
    bias = beta - mean * scale with a single rounding. This matches how
    torch 2.13's CPU BatchNorm forms its per-channel terms in eval mode, so
    fma(conv(x), scale, bias) reproduces BN(conv(x)) to the bit there, as a
    test checks. Other builds may differ in the last bit.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError(
            'BatchNorm without running statistics cannot be folded; build '
            'the model with track_running_stats=True')
    var = bn.running_var.detach().float()
    mean = bn.running_mean.detach().float()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().float()
    beta = (bn.bias.detach().double()
            if bn.bias is not None else torch.zeros_like(mean).double())
    shifted = mean.double()
    if conv_bias is not None:
        shifted = shifted - conv_bias.detach().double()
    bias = (beta - shifted * scale.double()).float()
    return scale.numpy().copy(), bias.numpy().copy()


def _conv_params(module: nn.Conv2d) -> ConvParams:
    bias = (module.bias.detach().float().numpy().copy()
            if module.bias is not None else None)
    if isinstance(module, DGMSConv2d):
        indices, codebook = module.mixture.quantize(module.weight)
        return ConvParams(indices=indices.numpy().copy(),
                          codebook=codebook.float().numpy().copy(),
                          bits=module.bits,
                          bias=bias)
    return ConvParams(weight=module.weight.detach().float().numpy().copy(),
                      bias=bias)


def _conv_attrs(module: nn.Conv2d, name: str) -> Dict[str, Any]:
    if module.padding_mode != 'zeros':
        raise UnsupportedModelError(
            f'{name}: padding_mode={module.padding_mode!r} is not '
            "supported; the packed format pads with zeros only")
    if isinstance(module.padding, str):
        raise UnsupportedModelError(
            f'{name}: padding={module.padding!r} is not supported; give '
            'the padding as integers')
    if module.weight.dim() != 4:
        raise UnsupportedModelError(f'{name}: only 2-D convs are supported')
    return dict(in_channels=module.in_channels,
                out_channels=module.out_channels,
                kernel=_pair(module.kernel_size, 'kernel_size', name),
                stride=_pair(module.stride, 'stride', name),
                padding=_pair(module.padding, 'padding', name),
                dilation=_pair(module.dilation, 'dilation', name),
                groups=module.groups,
                activation='none')


class _Lowering:
    """Lower one fx graph to packed nodes; see the module docstring."""

    def __init__(self, root: nn.Module, fx_graph: fx.Graph):
        self.root = root
        self.fx_graph = fx_graph
        self.nodes: List[Node] = []
        self.value_of: Dict[fx.Node, str] = {}
        self.producer: Dict[str, Node] = {}
        self.shape_source: Dict[fx.Node, fx.Node] = {}
        self.conv_cache: Dict[str, ConvParams] = {}
        self.counter = 0

    def _new_value(self) -> str:
        name = f'v{self.counter}'
        self.counter += 1
        return name

    def _emit(self, fx_node: fx.Node, op: str, name: str, inputs: List[str],
              attrs=None, params=None) -> Node:
        node = Node(op, name, inputs, self._new_value(), attrs or {}, params)
        self.nodes.append(node)
        self.producer[node.output] = node
        self.value_of[fx_node] = node.output
        return node

    def _input(self, fx_node: fx.Node, arg) -> str:
        if not isinstance(arg, fx.Node) or arg not in self.value_of:
            raise UnsupportedModelError(
                f'{fx_node.format_node()}: an input is not a tensor computed '
                'by the graph')
        return self.value_of[arg]

    def _single_user(self, fx_node: fx.Node) -> bool:
        return len(fx_node.users) == 1

    def _fuse_activation(self, fx_node: fx.Node, source: fx.Node,
                         activation: str, name: str) -> None:
        value = self._input(fx_node, source)
        producer = self.producer.get(value)
        if (producer is not None and producer.op in ('conv2d', 'add', 'linear')
                and producer.attrs.get('activation') == 'none'
                and self._single_user(source)):
            producer.attrs['activation'] = activation
            self.value_of[fx_node] = value
            return
        self._emit(fx_node, activation, name, [value])

    def lower(self) -> Tuple[List[str], List[Node], Any]:
        inputs, result = [], None
        for fx_node in self.fx_graph.nodes:
            if fx_node.op == 'placeholder':
                value = self._new_value()
                self.value_of[fx_node] = value
                inputs.append(value)
            elif fx_node.op == 'call_module':
                self._lower_module(fx_node)
            elif fx_node.op in ('call_function', 'call_method'):
                self._lower_function(fx_node)
            elif fx_node.op == 'output':
                result = fx_node.args[0]
            else:
                raise UnsupportedModelError(
                    f'{fx_node.format_node()} is not supported by the packed '
                    'format')
        return inputs, self.nodes, result

    def _lower_module(self, fx_node: fx.Node) -> None:
        module = self.root.get_submodule(fx_node.target)
        name = fx_node.target
        if fx_node.kwargs or len(fx_node.args) != 1:
            raise UnsupportedModelError(
                f'{name} is called with {len(fx_node.args)} arguments; the '
                'packed format supports one input tensor per layer')
        source = fx_node.args[0]
        if isinstance(module, nn.Conv2d):
            # A module called several times (a head shared across pyramid
            # levels) is quantized once. Every call gets its own copy of the
            # parameter record because BatchNorm folding replaces fields.
            if name not in self.conv_cache:
                self.conv_cache[name] = _conv_params(module)
            params = dataclasses.replace(self.conv_cache[name])
            self._emit(fx_node, 'conv2d', name,
                       [self._input(fx_node, source)],
                       _conv_attrs(module, name), params)
        elif isinstance(module, nn.BatchNorm2d):
            self._fold_bn(fx_node, module, name, source)
        elif isinstance(module, nn.ReLU6):
            self._fuse_activation(fx_node, source, 'relu6', name)
        elif isinstance(module, nn.ReLU):
            self._fuse_activation(fx_node, source, 'relu', name)
        elif isinstance(module, nn.Identity):
            self.value_of[fx_node] = self._input(fx_node, source)
        elif isinstance(module, nn.MaxPool2d):
            self._emit(fx_node, 'max_pool2d', name,
                       [self._input(fx_node, source)],
                       self._pool_attrs(name, module.kernel_size,
                                        module.stride, module.padding,
                                        module.dilation, module.ceil_mode,
                                        module.return_indices))
        elif isinstance(module, nn.Linear):
            params = dict(weight=module.weight.detach().float().numpy().copy(),
                          bias=(module.bias.detach().float().numpy().copy()
                                if module.bias is not None else None))
            self._emit(fx_node, 'linear', name,
                       [self._input(fx_node, source)],
                       dict(in_features=module.in_features,
                            out_features=module.out_features,
                            activation='none'), params)
        else:
            raise UnsupportedModelError(
                f'{name} ({type(module).__name__}) is not supported by the '
                'packed format')

    def _fold_bn(self, fx_node, module, name, source) -> None:
        value = self._input(fx_node, source)
        producer = self.producer.get(value)
        if (producer is None or producer.op != 'conv2d'
                or producer.params.scale is not None
                or producer.attrs['activation'] != 'none'
                or not self._single_user(source)):
            raise UnsupportedModelError(
                f'{name}: BatchNorm must directly follow a conv whose output '
                'is used only by it, so it can be folded into that conv')
        if module.num_features != producer.attrs['out_channels']:
            raise UnsupportedModelError(
                f'{name} has {module.num_features} channels but '
                f'{producer.name} produces {producer.attrs["out_channels"]}')
        bias = producer.params.bias
        conv_bias = torch.from_numpy(bias) if bias is not None else None
        scale, bias = fold_batch_norm(module, conv_bias)
        producer.params.scale = scale
        producer.params.bias = bias
        producer.attrs['folded_norm'] = name
        self.value_of[fx_node] = value

    @staticmethod
    def _pool_attrs(name, kernel, stride, padding, dilation, ceil_mode,
                    return_indices) -> Dict[str, Any]:
        if return_indices:
            raise UnsupportedModelError(
                f'{name}: max pooling with return_indices is not supported')
        if stride is None or stride == []:
            stride = kernel
        return dict(kernel=_pair(kernel, 'kernel_size', name),
                    stride=_pair(stride, 'stride', name),
                    padding=_pair(padding, 'padding', name),
                    dilation=_pair(dilation, 'dilation', name),
                    ceil_mode=bool(ceil_mode))

    def _lower_function(self, fx_node: fx.Node) -> None:
        target = fx_node.target
        where = fx_node.format_node()
        args, kwargs = fx_node.args, dict(fx_node.kwargs)

        if target in (operator.add, torch.add, 'add', operator.iadd):
            if len(args) != 2 or kwargs or not all(
                    isinstance(a, fx.Node) for a in args):
                raise UnsupportedModelError(
                    f'{where}: only the sum of two tensors is supported')
            self._emit(fx_node, 'add', fx_node.name,
                       [self._input(fx_node, a) for a in args],
                       dict(activation='none'))
        elif target in (F.relu, torch.relu, 'relu'):
            self._fuse_activation(fx_node, args[0], 'relu', fx_node.name)
        elif target in (F.relu6, 'relu6'):
            self._fuse_activation(fx_node, args[0], 'relu6', fx_node.name)
        elif target is getattr and len(args) == 2 and args[1] == 'shape':
            self.shape_source[fx_node] = args[0]
        elif (target is operator.getitem and isinstance(args[0], fx.Node)
              and args[0] in self.shape_source):
            if args[1] != slice(2, None, None):
                raise UnsupportedModelError(
                    f'{where}: only the spatial size, shape[2:], of a tensor '
                    'can be used')
            self.shape_source[fx_node] = self.shape_source[args[0]]
        elif target is F.interpolate:
            self._lower_interpolate(fx_node, args, kwargs)
        elif target in (F.max_pool2d, torch.max_pool2d):
            self._lower_functional_max_pool(fx_node, args, kwargs)
        elif target in (torch.flatten, 'flatten'):
            start = args[1] if len(args) > 1 else kwargs.get('start_dim', 0)
            end = args[2] if len(args) > 2 else kwargs.get('end_dim', -1)
            if (start, end) != (1, -1):
                raise UnsupportedModelError(
                    f'{where}: only flatten(start_dim=1) is supported')
            self._emit(fx_node, 'flatten', fx_node.name,
                       [self._input(fx_node, args[0])])
        else:
            raise UnsupportedModelError(
                f'{where}: the function or method {target!r} is not '
                'supported by the packed format')

    def _lower_interpolate(self, fx_node, args, kwargs) -> None:
        names = ('input', 'size', 'scale_factor', 'mode', 'align_corners',
                 'recompute_scale_factor', 'antialias')
        call = dict(zip(names, args))
        call.update(kwargs)
        where = fx_node.format_node()
        if call.get('mode', 'nearest') != 'nearest' or call.get(
                'antialias', False):
            raise UnsupportedModelError(
                f'{where}: only mode="nearest" resizing is supported')
        inputs = [self._input(fx_node, call['input'])]
        size, scale = call.get('size'), call.get('scale_factor')
        if isinstance(size, fx.Node) and size in self.shape_source:
            inputs.append(self._input(fx_node, self.shape_source[size]))
            attrs = dict(mode='size_of')
        elif size is None and scale is not None:
            factors = _pair(scale, 'scale_factor', where) if isinstance(
                scale, int) or (isinstance(scale, (tuple, list)) and all(
                    isinstance(s, int) for s in scale)) else None
            if factors is None:
                if isinstance(scale, float) and scale.is_integer():
                    factors = [int(scale), int(scale)]
                else:
                    raise UnsupportedModelError(
                        f'{where}: only integer scale factors are supported')
            attrs = dict(mode='scale', scale=factors)
        else:
            raise UnsupportedModelError(
                f'{where}: the output size must be the spatial size of '
                'another tensor of the graph, or an integer scale factor')
        self._emit(fx_node, 'resize_nearest', fx_node.name, inputs, attrs)

    def _lower_functional_max_pool(self, fx_node, args, kwargs) -> None:
        names = ('input', 'kernel_size', 'stride', 'padding', 'dilation',
                 'ceil_mode', 'return_indices')
        call = dict(zip(names, args))
        call.update(kwargs)
        attrs = self._pool_attrs(fx_node.name, call['kernel_size'],
                                 call.get('stride'), call.get('padding', 0),
                                 call.get('dilation', 1),
                                 call.get('ceil_mode', False),
                                 call.get('return_indices', False))
        self._emit(fx_node, 'max_pool2d', fx_node.name,
                   [self._input(fx_node, call['input'])], attrs)


def _flatten_outputs(result) -> List[Any]:
    """Flatten nested tuples and lists of fx nodes, in order."""
    if isinstance(result, (tuple, list)):
        flat = []
        for item in result:
            flat.extend(_flatten_outputs(item))
        return flat
    return [result]


def trace_graph(module: nn.Module, output_names: List[str]) -> Graph:
    """Trace ``module`` (eval mode; one tensor input) into a Graph.

    Args:
        module: the part to trace; its forward returns a possibly nested
            tuple of tensors.
        output_names: one name per returned tensor, in flattened order.
    """
    if module.training:
        raise ValueError('trace_graph needs a module in eval mode')
    tracer = _LeafTracer()
    try:
        fx_graph = tracer.trace(module)
    except Exception as error:  # fx raises many types while tracing
        raise UnsupportedModelError(
            f'the model could not be traced for packing: {error}') from error
    lowering = _Lowering(module, fx_graph)
    inputs, nodes, result = lowering.lower()
    flat = _flatten_outputs(result)
    if len(flat) != len(output_names):
        raise UnsupportedModelError(
            f'the traced part returns {len(flat)} tensors, expected '
            f'{len(output_names)} ({", ".join(output_names)})')
    outputs = [(name, lowering._input(fx_node, fx_node))
               for name, fx_node in zip(output_names, flat)]
    return Graph(inputs, nodes, outputs)
