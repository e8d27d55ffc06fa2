"""Export a detector's tensor part to ONNX with DGMS hard weights decoded.

The graph takes one normalised image tensor of a fixed size and returns the
dense head's raw outputs per FPN level (or, with --part features, the neck's
feature maps). Box decoding, score thresholds and NMS are not in the graph.
The tool checks the written file with ONNX Runtime against PyTorch before it
replaces OUT.onnx, so a file that lands there has passed that check.

Example:
    python tools/export_onnx.py \\
        configs/trees/retinanet_mnv2_fpn_trees_dgms4.py \\
        work_dirs/demo/dgms4/epoch_6.pth -o dgms4.onnx \\
        --image data/trees/images/OSBS_029.png
"""
import argparse
import math
import os.path as osp

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

import torch

import mmdgms  # noqa: F401  (registers DGMS parts and safe checkpoint loading)
from mmdgms.apis import CheckpointMismatchError, init_detector
from mmdgms.export import ATOL, RTOL, export_onnx, preprocess_image
from mmdgms.fileio import atomic_output


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='detector config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('-o', '--out', required=True,
                        help='ONNX file to write')
    parser.add_argument(
        '--shape', type=int, nargs=2, metavar=('HEIGHT', 'WIDTH'),
        help='fixed input height and width in pixels; default: the scale '
        "of the test pipeline's Resize, rounded up to the data "
        "preprocessor's pad_size_divisor")
    parser.add_argument('--part', choices=['head', 'features'],
                        default='head',
                        help="'head': raw outputs of a single-stage "
                        "detector's dense head; 'features': backbone and "
                        'neck feature maps of any detector (default: head)')
    parser.add_argument('--image',
                        help='also compare ONNX Runtime with PyTorch on this '
                        'image, preprocessed as the test pipeline does')
    return parser.parse_args()


def default_shape(cfg, detector):
    """Return (height, width) from the test pipeline's Resize scale."""
    from mmdet.utils import get_test_pipeline_cfg
    scale = None
    for transform in get_test_pipeline_cfg(cfg):
        if transform.get('type', '').split('.')[-1] == 'Resize':
            scale = transform.get('scale')
    if scale is None:
        raise SystemExit('the test pipeline has no Resize with a scale, so '
                         'the input size is unknown; pass --shape HEIGHT '
                         'WIDTH')
    width, height = (scale, scale) if isinstance(scale, int) else scale
    divisor = getattr(detector.data_preprocessor, 'pad_size_divisor', 1) or 1
    return (math.ceil(height / divisor) * divisor,
            math.ceil(width / divisor) * divisor)


def main():
    args = parse_args()
    if not args.out.endswith('.onnx'):
        raise SystemExit(f'--out must end with .onnx, got {args.out}')
    if args.image is not None and not osp.isfile(args.image):
        raise SystemExit(f'image file not found: {args.image}')
    if args.shape is not None and min(args.shape) < 1:
        raise SystemExit(f'--shape must be positive, got {args.shape}')

    try:
        detector = init_detector(args.config, args.checkpoint, device='cpu')
    except (CheckpointMismatchError, FileNotFoundError) as error:
        raise SystemExit(f'error: {error}') from None
    shape = tuple(args.shape) if args.shape else default_shape(
        detector.cfg, detector)
    input_shape = (1, 3) + shape

    generator = torch.Generator().manual_seed(0)
    verify_inputs = [torch.randn(input_shape, generator=generator)]
    try:
        if args.image is not None:
            verify_inputs.append(
                preprocess_image(detector, args.image, shape)[0])
        with atomic_output(args.out) as temp_name:
            report = export_onnx(detector, temp_name, input_shape, args.part,
                                 verify_inputs)
    except ValueError as error:
        raise SystemExit(f'error: {error}') from None

    print(f'wrote {args.out}: input image {list(input_shape)}, '
          f'{len(report.output_names)} outputs, {report.decoded_layers} DGMS '
          'layers decoded to hard weights')
    print(f'ONNX Runtime vs PyTorch on {len(verify_inputs)} input(s), '
          f'accepted up to atol={ATOL} + rtol={RTOL} * |torch|:')
    for name in report.output_names:
        print(f'  {name:<16} max |diff| {report.max_abs_diff[name]:.3g}   '
              f'max |output| {report.max_abs_output[name]:.3g}')


if __name__ == '__main__':
    main()
