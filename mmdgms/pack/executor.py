"""Run a packed graph with PyTorch: the Python reference for runtimes."""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graph import Graph


def _activate(x: Tensor, activation: str) -> Tensor:
    if activation == 'relu':
        return F.relu(x)
    if activation == 'relu6':
        return F.relu6(x)
    return x


class GraphExecutor(nn.Module):
    """Execute a :class:`Graph` on float32 tensors.

    Quantized weights are decoded once to codebook[indices]. A conv with a
    folded BatchNorm computes fma(conv(x), scale, bias) per output channel
    (``torch.addcmul``), the same arithmetic as torch's CPU BatchNorm in
    eval mode, so a float32 packed model reproduces the detector it came
    from exactly on torch 2.13 CPU.
    """

    def __init__(self, graph: Graph):
        super().__init__()
        self.graph = graph
        # Buffer prefix of each conv or linear node. Nodes that share one
        # parameter record (a head called once per pyramid level) share
        # one set of buffers.
        self.buffer_prefix: Dict[int, str] = {}
        prefixes: Dict[int, str] = {}
        for index, node in enumerate(graph.nodes):
            if node.op not in ('conv2d', 'linear'):
                continue
            if id(node.params) in prefixes:
                self.buffer_prefix[index] = prefixes[id(node.params)]
                continue
            key = f'layer{len(prefixes)}'
            prefixes[id(node.params)] = self.buffer_prefix[index] = key
            if node.op == 'conv2d':
                params = node.params
                if params.indices is not None:
                    codebook = torch.from_numpy(params.codebook.copy())
                    weight = codebook[torch.from_numpy(
                        params.indices.astype('int64'))]
                else:
                    weight = torch.from_numpy(params.weight.copy())
                self.register_buffer(f'{key}_weight', weight)
                self._register_optional(f'{key}_scale', params.scale)
                self._register_optional(f'{key}_bias', params.bias)
            else:
                self.register_buffer(
                    f'{key}_weight',
                    torch.from_numpy(node.params['weight'].copy()))
                self._register_optional(f'{key}_bias', node.params['bias'])

    def _register_optional(self, name: str, array) -> None:
        self.register_buffer(
            name, torch.from_numpy(array.copy()) if array is not None else None)

    def _conv(self, index: int, node, x: Tensor) -> Tensor:
        attrs = node.attrs
        key = self.buffer_prefix[index]
        weight = getattr(self, f'{key}_weight')
        scale = getattr(self, f'{key}_scale')
        bias = getattr(self, f'{key}_bias')
        y = F.conv2d(x, weight, bias if scale is None else None,
                     attrs['stride'], attrs['padding'], attrs['dilation'],
                     attrs['groups'])
        if scale is not None:
            y = torch.addcmul(bias.view(1, -1, 1, 1), y, scale.view(1, -1, 1,
                                                                     1))
        return _activate(y, attrs['activation'])

    def forward(self, *inputs: Tensor) -> Dict[str, Tensor]:
        """Return the graph outputs by name for the graph inputs in order."""
        graph = self.graph
        if len(inputs) != len(graph.inputs):
            raise ValueError(f'the graph takes {len(graph.inputs)} inputs, '
                             f'got {len(inputs)}')
        values = dict(zip(graph.inputs, inputs))
        for index, node in enumerate(graph.nodes):
            args = [values[name] for name in node.inputs]
            attrs = node.attrs
            if node.op == 'conv2d':
                out = self._conv(index, node, args[0])
            elif node.op == 'linear':
                key = self.buffer_prefix[index]
                out = F.linear(args[0], getattr(self, f'{key}_weight'),
                               getattr(self, f'{key}_bias'))
                out = _activate(out, attrs['activation'])
            elif node.op == 'add':
                out = _activate(args[0] + args[1], attrs['activation'])
            elif node.op in ('relu', 'relu6'):
                out = _activate(args[0], node.op)
            elif node.op == 'max_pool2d':
                out = F.max_pool2d(args[0], attrs['kernel'], attrs['stride'],
                                   attrs['padding'], attrs['dilation'],
                                   attrs['ceil_mode'])
            elif node.op == 'resize_nearest':
                if attrs['mode'] == 'size_of':
                    out = F.interpolate(args[0], size=args[1].shape[2:],
                                        mode='nearest')
                else:
                    out = F.interpolate(args[0],
                                        scale_factor=attrs['scale'],
                                        mode='nearest')
            elif node.op == 'flatten':
                out = args[0].flatten(1)
            else:  # the reader rejects unknown operators
                raise RuntimeError(f'unknown operator {node.op!r}')
            values[node.output] = out
        return {name: values[value] for name, value in graph.outputs}
