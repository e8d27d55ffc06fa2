"""Detect objects in one image with a detector and draw them to a PNG.

Works on DGMS and full-precision configs alike; a DGMS model runs with hard
(codebook) weights. The config and the checkpoint must fit: a DGMS
checkpoint with a full-precision config, or the other way round, is an
error that names the config to use.

Example:
    python tools/infer_demo.py \\
        configs/trees/retinanet_mnv2_fpn_trees_dgms4.py \\
        work_dirs/demo/dgms4/epoch_6.pth \\
        data/trees/images/OSBS_029.png -o osbs_dgms4.png
"""
import argparse
import os.path as osp

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

import mmcv

import mmdgms  # noqa: F401  (registers DGMS parts and safe checkpoint loading)
from mmdgms.apis import CheckpointMismatchError, init_detector
from mmdgms.fileio import atomic_output


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='detector config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('image', help='image file to run the detector on')
    parser.add_argument('-o', '--out', required=True,
                        help='PNG file to write the drawn detections to')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='draw detections with at least this score '
                        '(default: 0.3)')
    parser.add_argument('--device', default='cpu',
                        help="torch device, e.g. 'cpu' or 'cuda:0' "
                        "(default: 'cpu')")
    return parser.parse_args()


def draw_detections(model, image_path: str, score_thr: float):
    """Run ``model`` on one image and draw its detections.

    Returns:
        tuple: the drawn RGB image (H, W, 3 uint8), the number of drawn
        detections and the DetDataSample with all of them.
    """
    from mmdet.apis import inference_detector
    from mmdet.visualization import DetLocalVisualizer

    result = inference_detector(model, image_path)
    image = mmcv.imread(image_path, channel_order='rgb')
    visualizer = DetLocalVisualizer(name='infer_demo')
    visualizer.dataset_meta = model.dataset_meta
    visualizer.add_datasample('detections', image, data_sample=result,
                              draw_gt=False, show=False,
                              pred_score_thr=score_thr)
    drawn = int((result.pred_instances.scores >= score_thr).sum())
    return visualizer.get_image(), drawn, result


def main():
    args = parse_args()
    if not osp.isfile(args.image):
        raise SystemExit(f'image file not found: {args.image}')
    if not args.out.lower().endswith('.png'):
        raise SystemExit(f'--out must end with .png, got {args.out}')

    try:
        model = init_detector(args.config, args.checkpoint,
                              device=args.device)
    except (CheckpointMismatchError, FileNotFoundError) as error:
        raise SystemExit(f'error: {error}') from None
    image, drawn, result = draw_detections(model, args.image, args.score_thr)
    with atomic_output(args.out) as temp_name:
        if not mmcv.imwrite(mmcv.rgb2bgr(image), temp_name):
            raise SystemExit(f'could not write {args.out}')
    print(f'{drawn} of {len(result.pred_instances)} detections have a score '
          f'>= {args.score_thr}; drew them to {args.out}')


if __name__ == '__main__':
    main()
