"""ONNX export of a detector's tensor part with DGMS hard weights decoded.

Every DGMS conv layer becomes a plain ``Conv`` whose weight is the decoded
hard weight: the codebook value of each weight, as float32. The graph thus
computes what the PyTorch model computes in eval mode, with standard
operators only. The graph covers the backbone, the neck and the dense
head's raw outputs (class scores and box deltas per FPN level) at one fixed
input size. Preprocessing (resize, pad, normalise) and post-processing
(anchor decoding, score threshold, NMS) stay outside it.
"""
import copy
import inspect
import json
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.logging import print_log
from torch import Tensor, nn

from ..convert import dgms_layers

OPSET_VERSION = 17
# Largest difference between ONNX Runtime and PyTorch outputs that
# verify_onnx accepts, as |ort - torch| <= ATOL + RTOL * |torch|. Both run
# float32 convolutions that sum in different orders, and the differences
# measured on the demo models are below 1e-5 (docs/deployment.md).
ATOL = 1e-4
RTOL = 1e-3


class TensorGraph(nn.Module):
    """The tensor part of a detector as a module with one image input.

    Args:
        detector (nn.Module): an MMDetection detector.
        part (str): ``'head'`` for the dense head's raw outputs (single-stage
            detectors) or ``'features'`` for the neck's feature maps (any
            detector with ``extract_feat``). Default: 'head'.
    """

    def __init__(self, detector: nn.Module, part: str = 'head'):
        super().__init__()
        if part not in ('head', 'features'):
            raise ValueError(
                f"part must be 'head' or 'features', got {part!r}")
        if part == 'head' and not hasattr(detector, 'bbox_head'):
            raise ValueError(
                f'{type(detector).__name__} has no single dense head '
                '(bbox_head), so its raw outputs cannot be exported: a '
                'two-stage RoI head needs proposals that NMS selects. Export '
                "the backbone and neck features with part='features' "
                '(tools/export_onnx.py --part features)')
        self.detector = detector
        self.part = part

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        feats = self.detector.extract_feat(image)
        if self.part == 'features':
            return tuple(feats)
        outputs = self.detector.bbox_head(feats)
        return tuple(level for output in outputs for level in output)

    @torch.no_grad()
    def output_names(self, image: Tensor) -> List[str]:
        """Return one name per output, e.g. ``cls_score_0``, ``bbox_pred_0``.

        Head outputs are named after the parameters of the head's
        ``predict_by_feat`` (``cls_scores`` -> ``cls_score_<level>``).
        """
        feats = self.detector.extract_feat(image)
        if self.part == 'features':
            return [f'feature_{level}' for level in range(len(feats))]
        outputs = self.detector.bbox_head(feats)
        params = [
            name for name in inspect.signature(
                self.detector.bbox_head.predict_by_feat).parameters
        ]
        names = []
        for index, output in enumerate(outputs):
            base = params[index] if index < len(params) else f'output{index}'
            base = base[:-1] if base.endswith('s') else base
            names += [f'{base}_{level}' for level in range(len(output))]
        return names


def decode_hard_weights(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` with each DGMS conv as a plain ``Conv2d``.

    The plain conv's weight is the layer's hard weight tensor
    ``codebook[indices]``, the weight that the DGMS layer uses in eval mode.
    ``model`` itself is not changed.

    Raises:
        RuntimeError: a DGMS layer has no initialised mixture (the model
            did not get a DGMS checkpoint).
    """
    decoded = copy.deepcopy(model)
    for name, layer in dgms_layers(decoded).items():
        layer.mixture.check_initialized(name)
        conv = nn.Conv2d(layer.in_channels, layer.out_channels,
                         layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None,
                         layer.padding_mode)
        with torch.no_grad():
            conv.weight = nn.Parameter(
                layer.mixture.hard_weights(layer.weight).clone(),
                requires_grad=False)
            if layer.bias is not None:
                conv.bias = nn.Parameter(layer.bias.detach().clone(),
                                         requires_grad=False)
        parent_name, _, child = name.rpartition('.')
        parent = decoded.get_submodule(parent_name) if parent_name else decoded
        setattr(parent, child, conv)
    return decoded.eval()


@dataclass
class ExportReport:
    """Summary of an :func:`export_onnx` call: the graph's inputs and outputs
    and the measured differences between the runtimes.

    Args:
        input_shape (tuple): N, C, H, W of the graph's input.
        output_names (list): names of the graph's outputs, in order.
        decoded_layers (int): DGMS layers exported with hard weights.
        max_abs_diff (dict): output name -> max |ONNX Runtime - PyTorch|.
        max_abs_output (dict): output name -> max |PyTorch output|.
    """
    input_shape: Tuple[int, int, int, int]
    output_names: List[str]
    decoded_layers: int
    max_abs_diff: Dict[str, float] = field(default_factory=dict)
    max_abs_output: Dict[str, float] = field(default_factory=dict)


def preprocessing_metadata(detector: nn.Module) -> dict:
    """Return the normalisation the graph's input must have had."""
    preprocessor = getattr(detector, 'data_preprocessor', None)
    meta = {}
    for key in ('mean', 'std'):
        value = getattr(preprocessor, key, None)
        if isinstance(value, Tensor):
            meta[key] = [float(v) for v in value.reshape(-1)]
    for key in ('pad_size_divisor', 'pad_value'):
        value = getattr(preprocessor, key, None)
        if isinstance(value, (int, float)):
            meta[key] = value
    # bgr_to_rgb and rgb_to_bgr both set _channel_conversion.
    if hasattr(preprocessor, '_channel_conversion'):
        meta['channel_conversion'] = bool(preprocessor._channel_conversion)
    return meta


@torch.no_grad()
def preprocess_image(detector: nn.Module,
                     image_path: str,
                     shape: Optional[Sequence[int]] = None):
    """Return an image as the graph's input, with its DetDataSample.

    The image goes through the test pipeline of ``detector.cfg`` and the
    detector's data preprocessor, as in ``inference_detector``. With
    ``shape`` (height, width), the result is zero-padded at the bottom and
    right to that size, as the data preprocessor pads too.

    Returns:
        tuple: the 1 x 3 x H x W input tensor and the DetDataSample, whose
        ``metainfo`` is what ``bbox_head.predict_by_feat`` needs.

    Raises:
        ValueError: the preprocessed image is larger than ``shape``.
    """
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg

    pipeline = Compose(get_test_pipeline_cfg(detector.cfg))
    data = pipeline(dict(img_path=str(image_path), img_id=0))
    batch = detector.data_preprocessor(
        dict(inputs=[data['inputs']], data_samples=[data['data_samples']]),
        False)
    inputs, data_sample = batch['inputs'], batch['data_samples'][0]
    if shape is None:
        return inputs, data_sample

    height, width = inputs.shape[-2:]
    if height > shape[0] or width > shape[1]:
        raise ValueError(
            f'{image_path} preprocesses to {height}x{width}, larger than the '
            f'input size {shape[0]}x{shape[1]}. Export with a larger input '
            'size (tools/export_onnx.py --shape HEIGHT WIDTH)')
    padded = torch.nn.functional.pad(
        inputs, (0, shape[1] - width, 0, shape[0] - height))
    return padded, data_sample


def export_onnx(detector: nn.Module,
                out_file: str,
                input_shape: Sequence[int],
                part: str = 'head',
                verify_inputs: Optional[Sequence[Tensor]] = None,
                opset_version: int = OPSET_VERSION) -> ExportReport:
    """Export the tensor part of ``detector`` to ``out_file`` and verify it.

    The graph is first written to ``out_file`` as given: callers that need
    an atomic result pass a temporary name (tools/export_onnx.py does). Then
    ONNX Runtime runs it on ``verify_inputs`` (default: one standard normal
    tensor of ``input_shape``) and every output is compared with
    ``detector`` in eval mode, where DGMS layers use their hard weights.

    Args:
        detector (nn.Module): the detector, with loaded weights.
        out_file (str): where to write the ONNX model.
        input_shape (Sequence[int]): N, C, H, W of the fixed input.
        part (str): 'head' or 'features', see :class:`TensorGraph`.
        verify_inputs (Sequence[Tensor], optional): inputs to compare on.
        opset_version (int): ONNX opset. Default: 17.

    Returns:
        ExportReport: shapes, names and the measured differences.

    Raises:
        ValueError: an output of ONNX Runtime differs from PyTorch by more
            than ``ATOL + RTOL * |torch|``.
    """
    import onnx

    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 4 or min(input_shape) < 1:
        raise ValueError('input_shape must be 4 positive sizes N, C, H, W, '
                         f'got {input_shape}')
    num_decoded = len(dgms_layers(detector))
    graph = TensorGraph(decode_hard_weights(detector), part).eval()
    example = torch.zeros(input_shape)
    output_names = graph.output_names(example)

    print_log(
        f'ONNX: exporting {part} outputs ({len(output_names)} tensors) of '
        f'{type(detector).__name__} at input {input_shape}, '
        f'{num_decoded} DGMS layers decoded to hard weights',
        logger='current')
    with warnings.catch_warnings():
        # NOTE: torch 2.9 deprecated this TorchScript-based exporter in
        # favour of the torch.export one, which needs the onnxscript package.
        # A torch release without it needs dynamo=True and onnxscript here.
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        # Tracing fixes every shape, so the graph accepts exactly
        # input_shape. Export again for another input size.
        torch.onnx.export(graph, (example, ), out_file, dynamo=False,
                          opset_version=opset_version,
                          input_names=['image'], output_names=output_names,
                          do_constant_folding=True)

    model_proto = onnx.load(out_file)
    onnx.checker.check_model(model_proto)
    metadata = dict(
        producer='mmdgms',
        detector=type(detector).__name__,
        part=part,
        input_shape=json.dumps(list(input_shape)),
        output_names=json.dumps(output_names),
        preprocessing=json.dumps(preprocessing_metadata(detector)),
        postprocessing='not included: decode boxes, threshold scores and '
        'run NMS outside the graph')
    strides = getattr(getattr(getattr(detector, 'bbox_head', None),
                              'prior_generator', None), 'strides', None)
    if part == 'head' and strides is not None:
        metadata['strides'] = json.dumps([list(s) for s in strides])
    for key, value in metadata.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model_proto, out_file)

    report = ExportReport(input_shape, output_names, num_decoded)
    if verify_inputs is None:
        generator = torch.Generator().manual_seed(0)
        verify_inputs = [torch.randn(input_shape, generator=generator)]
    # Compare with the DGMS model itself (hard weights in eval mode), not
    # with the decoded copy that was exported.
    was_training = detector.training
    detector.eval()
    try:
        verify_onnx(TensorGraph(detector, part), out_file, verify_inputs,
                    report)
    finally:
        detector.train(was_training)
    return report


def verify_onnx(graph: nn.Module, onnx_file: str, inputs: Sequence[Tensor],
                report: ExportReport) -> None:
    """Run ``onnx_file`` in ONNX Runtime and compare it with ``graph``.

    Fills ``report.max_abs_diff`` and ``report.max_abs_output``.

    Raises:
        ValueError: an output differs by more than ``ATOL + RTOL * |torch|``.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(
        onnx_file, providers=['CPUExecutionProvider'])
    for image in inputs:
        with torch.no_grad():
            expected = [t.numpy() for t in graph(image)]
        actual = session.run(report.output_names,
                             {'image': image.numpy().astype(np.float32)})
        for name, ours, theirs in zip(report.output_names, expected, actual):
            if ours.shape != theirs.shape:
                raise ValueError(f'ONNX output {name} has shape '
                                 f'{theirs.shape}, PyTorch {ours.shape}')
            diff = float(np.abs(ours - theirs).max())
            report.max_abs_diff[name] = max(report.max_abs_diff.get(name, 0),
                                            diff)
            report.max_abs_output[name] = max(
                report.max_abs_output.get(name, 0),
                float(np.abs(ours).max()))
            if not np.allclose(theirs, ours, rtol=RTOL, atol=ATOL):
                raise ValueError(
                    f'ONNX Runtime output {name} differs from PyTorch by up '
                    f'to {diff:.3g}, more than atol={ATOL} + rtol={RTOL} '
                    f'allow; {onnx_file} does not compute what the model '
                    'computes')
