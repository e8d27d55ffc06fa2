"""Map MMDetection detectors to packed graphs and back.

Supported: single-stage detectors with a RetinaHead (RetinaNet) and
two-stage detectors with an RPNHead and a StandardRoIHead whose bbox head
is a ConvFCBBoxHead such as Shared2FCBBoxHead (Faster R-CNN), each with any
backbone and neck that trace to the packed operator set (ResNet,
MobileNetV2, FPN). Graph names and output names:

- ``main``: input the normalised, padded image batch; outputs
  ``cls_score.{i}`` and ``bbox_pred.{i}`` per pyramid level for a
  single-stage detector, or ``feat.{i}``, ``rpn_cls_score.{i}`` and
  ``rpn_bbox_pred.{i}`` for a two-stage one.
- ``roi_bbox_head`` (two-stage only): input the RoI features
  (R, C, 7, 7); outputs ``cls_score`` and ``bbox_pred``.
"""
from typing import Dict, Tuple

from torch import Tensor, nn

from .executor import GraphExecutor
from .graph import Graph, Node, UnsupportedModelError, trace_graph

SINGLE_STAGE_HEADS = ('RetinaHead', )
RPN_HEADS = ('RPNHead', )
ROI_HEADS = ('StandardRoIHead', )


class _DenseTrace(nn.Module):
    """backbone -> neck -> dense head, returning the head's outputs and,
    for two-stage detectors, the neck features too."""

    def __init__(self, detector, head_name: str, with_feats: bool):
        super().__init__()
        self.backbone = detector.backbone
        self.neck = detector.neck
        setattr(self, head_name, getattr(detector, head_name))
        self.head_name = head_name
        self.with_feats = with_feats

    def forward(self, image):
        feats = self.backbone(image)
        if self.neck is not None:
            feats = self.neck(feats)
        outs = getattr(self, self.head_name)(feats)
        return (feats, outs) if self.with_feats else outs


def _type_name(module) -> str:
    return type(module).__name__


def _num_levels(head) -> int:
    return len(head.prior_generator.strides)


def detector_kind(detector) -> str:
    """Return 'single_stage' or 'two_stage', or raise UnsupportedModelError
    naming the part the packed format cannot describe."""
    if getattr(detector, 'neck', None) is None:
        raise UnsupportedModelError(
            f'{_type_name(detector)} without a neck is not supported')
    if hasattr(detector, 'rpn_head') and hasattr(detector, 'roi_head'):
        if _type_name(detector.rpn_head) not in RPN_HEADS:
            raise UnsupportedModelError(
                f'rpn_head {_type_name(detector.rpn_head)} is not supported; '
                f'supported: {RPN_HEADS}')
        roi_head = detector.roi_head
        if _type_name(roi_head) not in ROI_HEADS or getattr(
                roi_head, 'with_mask', False) or getattr(
                    roi_head, 'with_shared_head', False):
            raise UnsupportedModelError(
                f'roi_head {_type_name(roi_head)} is not supported; '
                f'supported: {ROI_HEADS} with a bbox head only (no mask or '
                'shared head)')
        return 'two_stage'
    head = getattr(detector, 'bbox_head', None)
    if head is None or _type_name(head) not in SINGLE_STAGE_HEADS:
        raise UnsupportedModelError(
            f'{_type_name(detector)} with head {_type_name(head)} is not '
            f'supported; supported single-stage heads: {SINGLE_STAGE_HEADS}')
    return 'single_stage'


def _linear_node(layer: nn.Linear, name: str, source: str, output: str,
                 activation: str) -> Node:
    params = dict(weight=layer.weight.detach().float().numpy().copy(),
                  bias=(layer.bias.detach().float().numpy().copy()
                        if layer.bias is not None else None))
    return Node('linear', name, [source], output,
                dict(in_features=layer.in_features,
                     out_features=layer.out_features,
                     activation=activation), params)


def lower_fc_bbox_head(head, prefix: str) -> Graph:
    """Describe a ConvFCBBoxHead made of shared FCs only (Shared2FCBBoxHead).

    Its forward branches on tensor ranks, which torch.fx cannot trace, so
    the graph is written from the head's structure: flatten, the shared
    FCs with ReLU, then fc_cls and fc_reg.
    """
    settings = dict(num_shared_convs=0, num_cls_convs=0, num_reg_convs=0,
                    num_cls_fcs=0, num_reg_fcs=0, with_avg_pool=False,
                    with_cls=True, with_reg=True)
    for key, supported in settings.items():
        if not hasattr(head, key) or getattr(head, key) != supported:
            raise UnsupportedModelError(
                f'{prefix} ({_type_name(head)}) has {key}='
                f'{getattr(head, key, "missing")!r}; the packer supports '
                'bbox heads of shared FCs only, like Shared2FCBBoxHead')
    if not isinstance(head.relu, nn.ReLU):
        raise UnsupportedModelError(f'{prefix}.relu must be nn.ReLU')
    nodes = [Node('flatten', f'{prefix}.flatten', ['v0'], 'v1')]
    value = 'v1'
    for index, fc in enumerate(head.shared_fcs):
        output = f'v{len(nodes) + 1}'
        nodes.append(
            _linear_node(fc, f'{prefix}.shared_fcs.{index}', value, output,
                         'relu'))
        value = output
    cls_value, reg_value = f'v{len(nodes) + 1}', f'v{len(nodes) + 2}'
    nodes.append(
        _linear_node(head.fc_cls, f'{prefix}.fc_cls', value, cls_value,
                     'none'))
    nodes.append(
        _linear_node(head.fc_reg, f'{prefix}.fc_reg', value, reg_value,
                     'none'))
    return Graph(['v0'], nodes, [('cls_score', cls_value),
                                 ('bbox_pred', reg_value)])


def trace_detector(detector) -> Tuple[Dict[str, Graph], Dict]:
    """Return (graphs by name, detector description for META)."""
    if detector.training:
        raise ValueError('trace_detector needs the detector in eval mode')
    kind = detector_kind(detector)
    if kind == 'single_stage':
        levels = _num_levels(detector.bbox_head)
        names = [f'cls_score.{i}' for i in range(levels)]
        names += [f'bbox_pred.{i}' for i in range(levels)]
        main = trace_graph(_DenseTrace(detector, 'bbox_head', False).eval(),
                           names)
        graphs = dict(main=main)
    else:
        levels = _num_levels(detector.rpn_head)
        names = [f'feat.{i}' for i in range(levels)]
        names += [f'rpn_cls_score.{i}' for i in range(levels)]
        names += [f'rpn_bbox_pred.{i}' for i in range(levels)]
        main = trace_graph(_DenseTrace(detector, 'rpn_head', True).eval(),
                           names)
        roi = lower_fc_bbox_head(detector.roi_head.bbox_head,
                                 'roi_head.bbox_head')
        graphs = dict(main=main, roi_bbox_head=roi)
    return graphs, dict(kind=kind, num_levels=levels)


class _FeatureTuple(tuple):
    """Neck features that also carry the RPN outputs computed with them."""
    rpn_outputs = None


class _PackedMain(nn.Module):
    """Stand-in for backbone + neck that runs the packed ``main`` graph."""

    def __init__(self, executor: GraphExecutor, kind: str, levels: int):
        super().__init__()
        self.executor = executor
        self.kind = kind
        self.levels = levels

    def forward(self, image: Tensor):
        out = self.executor(image)
        levels = range(self.levels)
        if self.kind == 'single_stage':
            return ([out[f'cls_score.{i}'] for i in levels],
                    [out[f'bbox_pred.{i}'] for i in levels])
        feats = _FeatureTuple(out[f'feat.{i}'] for i in levels)
        feats.rpn_outputs = ([out[f'rpn_cls_score.{i}'] for i in levels],
                             [out[f'rpn_bbox_pred.{i}'] for i in levels])
        return feats


def _passthrough(head_outputs):
    return head_outputs


def _rpn_outputs(feats):
    outputs = getattr(feats, 'rpn_outputs', None)
    if outputs is None:
        raise RuntimeError('the packed RPN head runs together with the '
                           'packed backbone; call the detector, not '
                           'rpn_head alone')
    return outputs


class _PackedRoIBBoxHead(nn.Module):

    def __init__(self, executor: GraphExecutor):
        super().__init__()
        self.executor = executor

    def forward(self, roi_feats: Tensor):
        out = self.executor(roi_feats)
        return out['cls_score'], out['bbox_pred']


def attach_graphs(detector, graphs: Dict[str, Graph], info: Dict):
    """Make ``detector`` compute its tensors with the packed graphs.

    The detector (built from the packed model config) keeps its data
    preprocessor, anchor generators, box coders, RoI extractor and test
    settings. The ``main`` graph replaces its backbone and neck, and the
    head forwards return the graph outputs. Its own head layers stay
    unused, so the detector is for inference only.
    """
    kind, levels = info['kind'], info['num_levels']
    if detector_kind(detector) != kind:
        raise UnsupportedModelError(
            f'the packed graphs are {kind} but the model config builds a '
            f'{detector_kind(detector)} detector')
    detector.backbone = _PackedMain(GraphExecutor(graphs['main']), kind,
                                    levels)
    detector.neck = None
    if kind == 'single_stage':
        detector.bbox_head.forward = _passthrough
    else:
        detector.rpn_head.forward = _rpn_outputs
        packed_head = _PackedRoIBBoxHead(GraphExecutor(
            graphs['roi_bbox_head']))
        detector.roi_head.packed_bbox_head = packed_head
        detector.roi_head.bbox_head.forward = packed_head.forward
    return detector
