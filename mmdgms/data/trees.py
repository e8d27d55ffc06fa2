"""Tree-crown detection dataset built from the images shipped in DeepForest.

The ``deepforest==2.1.0`` wheel on PyPI (MIT license) contains four RGB aerial
images of the NEON sites YELL, OSBS and SOAP with Pascal VOC box annotations.
:func:`prepare_tree_dataset` turns them into a COCO-format dataset with one
class, ``tree``:

* train: overlapping tiles of the two large YELL crops;
* val: the two 400x400 images of OSBS and SOAP, unchanged, so validation
  measures transfer to sites never seen in training.
"""
import io
import json
import logging
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from mmengine.logging import print_log
from PIL import Image

from .pypi_cache import download_wheel, sha256_of_file

PathLike = Union[str, os.PathLike]

DEEPFOREST_REQUIREMENT = 'deepforest==2.1.0'
# SHA-256 of deepforest-2.1.0-py3-none-any.whl as downloaded from PyPI.
DEEPFOREST_WHEEL_SHA256 = (
    '8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54')

TREE_CATEGORY = {'id': 1, 'name': 'tree'}
# VOC class names in the wheel. SOAP_061 labels crowns as dead or alive,
# and every name becomes the single class ``tree``.
VOC_TREE_NAMES = frozenset({'Tree', 'Dead', 'Alive'})

# Version of the output layout. Changing it invalidates prepared datasets.
_FORMAT_VERSION = 1
_SUMMARY_FILE = 'dataset.json'


@dataclass(frozen=True)
class TreeSource:
    """One annotated image inside the DeepForest wheel."""

    image_member: str
    xml_member: str
    site: str
    split: str
    tiled: bool


TREE_SOURCES: Tuple[TreeSource, ...] = (
    TreeSource('deepforest/data/2019_YELL_2_528000_4978000_image_crop2.png',
               'deepforest/data/2019_YELL_2_528000_4978000_image_crop2.xml',
               site='YELL', split='train', tiled=True),
    TreeSource('deepforest/data/2019_YELL_2_541000_4977000_image_crop.png',
               'deepforest/data/2019_YELL_2_541000_4977000_image_crop.xml',
               site='YELL', split='train', tiled=True),
    # The XML names OSBS_029.tif, but the wheel's PNG contains the same pixels.
    TreeSource('deepforest/data/OSBS_029.png', 'deepforest/data/OSBS_029.xml',
               site='OSBS', split='val', tiled=False),
    TreeSource('deepforest/data/SOAP_061.png', 'deepforest/data/SOAP_061.xml',
               site='SOAP', split='val', tiled=False),
)
SPLITS = ('train', 'val')


def fetch_deepforest_wheel(cache_dir: Optional[PathLike] = None) -> Path:
    """Download the ``deepforest==2.1.0`` wheel once and return its path.

    See :func:`mmdgms.data.pypi_cache.download_wheel` for the cache folder
    and the errors raised. The wheel is checked against its PyPI SHA-256.
    """
    return download_wheel(
        DEEPFOREST_REQUIREMENT, cache_dir, sha256=DEEPFOREST_WHEEL_SHA256)


def tile_origins(length: int, tile_size: int, overlap: int) -> List[int]:
    """Return the start offsets of tiles that cover ``[0, length)``.

    Tiles advance by ``tile_size - overlap``. When the last regular tile
    stops short of the end, one more tile is placed flush with the end, so
    every tile is full size and the last overlap may be larger.
    """
    if tile_size > length:
        raise ValueError(
            f'tile_size {tile_size} is larger than the image side {length}')
    stride = tile_size - overlap
    origins = list(range(0, length - tile_size + 1, stride))
    if origins[-1] + tile_size < length:
        origins.append(length - tile_size)
    return origins


def read_voc_boxes(xml_bytes: bytes,
                   source_name: str) -> Tuple[int, int, np.ndarray]:
    """Parse a Pascal VOC file into image size and corner boxes.

    Returns ``(width, height, boxes)`` with ``boxes`` of shape ``(N, 4)`` as
    float ``xmin, ymin, xmax, ymax``. The values are used as pixel corner
    coordinates, not as the 1-based inclusive pixel indices of the original
    VOC convention, because DeepForest writes them that way: boxes reach
    ``xmax == width`` and the box width is ``xmax - xmin``.

    Raises:
        ValueError: An object has an unknown class name, a box has no area,
            or a box lies partly outside the image.
    """
    root = ET.fromstring(xml_bytes)
    width = int(root.findtext('size/width'))
    height = int(root.findtext('size/height'))

    boxes = []
    for index, obj in enumerate(root.iter('object')):
        name = obj.findtext('name')
        if name not in VOC_TREE_NAMES:
            raise ValueError(
                f'{source_name}: object {index} has class {name!r}, '
                f'expected one of {sorted(VOC_TREE_NAMES)}')
        box = [
            float(obj.findtext(f'bndbox/{key}'))
            for key in ('xmin', 'ymin', 'xmax', 'ymax')
        ]
        xmin, ymin, xmax, ymax = box
        if not (xmax > xmin and ymax > ymin):
            raise ValueError(
                f'{source_name}: object {index} has an empty box {box}')
        if xmin < 0 or ymin < 0 or xmax > width or ymax > height:
            raise ValueError(
                f'{source_name}: object {index} box {box} lies outside the '
                f'{width}x{height} image')
        boxes.append(box)
    return width, height, np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _validate_settings(tile_size: int, tile_overlap: int,
                       min_visible: float) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) \
            or tile_size <= 0:
        raise ValueError(
            f'tile_size must be a positive integer, got {tile_size!r}')
    if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) \
            or not 0 <= tile_overlap < tile_size:
        raise ValueError(
            f'tile_overlap must be an integer in [0, tile_size={tile_size}), '
            f'got {tile_overlap!r}')
    if not 0 < min_visible <= 1:
        raise ValueError(
            f'min_visible must be in (0, 1], got {min_visible!r}')


def _read_member(archive: zipfile.ZipFile, member: str) -> bytes:
    try:
        return archive.read(member)
    except KeyError:
        raise ValueError(
            f'{archive.filename} has no member {member}, so it is not the '
            f'{DEEPFOREST_REQUIREMENT} wheel') from None


def _coco_box(box: Sequence[float]) -> List[float]:
    xmin, ymin, xmax, ymax = (float(value) for value in box)
    return [xmin, ymin, xmax - xmin, ymax - ymin]


def _crop_boxes(boxes: np.ndarray, origin_x: int, origin_y: int,
                tile_size: int,
                min_visible: float) -> Tuple[np.ndarray, np.ndarray]:
    """Return the indices of boxes kept in a tile and their clipped boxes.

    A box is kept when at least ``min_visible`` of its area lies inside the
    tile. Clipped boxes are in tile coordinates.
    """
    shifted = boxes - np.array([origin_x, origin_y, origin_x, origin_y])
    clipped = np.clip(shifted, 0, tile_size)
    clipped_area = (clipped[:, 2] - clipped[:, 0]) * (
        clipped[:, 3] - clipped[:, 1])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept_indices = np.flatnonzero(clipped_area >= min_visible * area)
    return kept_indices, clipped[kept_indices]


class _CocoSplit:
    """COCO ``images`` and ``annotations`` of one split under construction."""

    def __init__(self) -> None:
        self.images: List[dict] = []
        self.annotations: List[dict] = []

    def add_image(self, file_name: str, width: int, height: int,
                  source: TreeSource, origin: Tuple[int, int],
                  boxes: np.ndarray, source_indices: np.ndarray) -> None:
        image_id = len(self.images) + 1
        self.images.append({
            'id': image_id,
            'file_name': file_name,
            'width': width,
            'height': height,
            'site': source.site,
            'source_image': Path(source.image_member).name,
            'tile_origin': list(origin),
        })
        for box, source_index in zip(boxes, source_indices):
            bbox = _coco_box(box)
            self.annotations.append({
                'id': len(self.annotations) + 1,
                'image_id': image_id,
                'category_id': TREE_CATEGORY['id'],
                'bbox': bbox,
                'area': bbox[2] * bbox[3],
                'iscrowd': 0,
                # Index of the object in the source VOC file, so boxes cut
                # from the same tree in overlapping tiles can be matched.
                'source_box_index': int(source_index),
            })

    def count_images_without_boxes(self) -> int:
        image_ids_with_boxes = {ann['image_id'] for ann in self.annotations}
        return len(self.images) - len(image_ids_with_boxes)

    def to_coco(self, wheel_name: str) -> dict:
        return {
            'info': {
                'description': 'Tree crowns from the DeepForest sample data',
                'source': wheel_name,
            },
            'images': self.images,
            'annotations': self.annotations,
            'categories': [dict(TREE_CATEGORY)],
        }


def _add_source(split: _CocoSplit, source: TreeSource, image: Image.Image,
                boxes: np.ndarray, images_dir: Path, tile_size: int,
                tile_overlap: int, min_visible: float) -> Dict[str, int]:
    """Write the image or its tiles and record their boxes.

    Returns counts for the summary: images written, boxes written and source
    boxes kept in at least one image.
    """
    image_name = Path(source.image_member).name
    stem = Path(image_name).stem
    all_indices = np.arange(len(boxes))
    if not source.tiled:
        file_name = f'{stem}.png'
        image.save(images_dir / file_name)
        split.add_image(file_name, image.width, image.height, source, (0, 0),
                        boxes, all_indices)
        return {
            'images': 1,
            'boxes': len(boxes),
            'source_boxes': len(boxes),
            'source_boxes_kept': len(boxes),
        }

    if tile_size > min(image.width, image.height):
        raise ValueError(
            f'tile_size {tile_size} is larger than {image_name} '
            f'({image.width}x{image.height}); use a smaller tile_size')

    kept_any = np.zeros(len(boxes), dtype=bool)
    num_tiles = 0
    num_boxes = 0
    for origin_y in tile_origins(image.height, tile_size, tile_overlap):
        for origin_x in tile_origins(image.width, tile_size, tile_overlap):
            kept_indices, tile_boxes = _crop_boxes(boxes, origin_x, origin_y,
                                                   tile_size, min_visible)
            file_name = f'{stem}_x{origin_x:04d}_y{origin_y:04d}.png'
            tile = image.crop((origin_x, origin_y, origin_x + tile_size,
                               origin_y + tile_size))
            tile.save(images_dir / file_name)
            split.add_image(file_name, tile_size, tile_size, source,
                            (origin_x, origin_y), tile_boxes, kept_indices)
            kept_any[kept_indices] = True
            num_tiles += 1
            num_boxes += len(kept_indices)
    return {
        'images': num_tiles,
        'boxes': num_boxes,
        'source_boxes': len(boxes),
        'source_boxes_kept': int(kept_any.sum()),
    }


def _load_source(archive: zipfile.ZipFile,
                 source: TreeSource) -> Tuple[Image.Image, np.ndarray]:
    xml_bytes = _read_member(archive, source.xml_member)
    width, height, boxes = read_voc_boxes(xml_bytes, source.xml_member)
    image_bytes = _read_member(archive, source.image_member)
    with Image.open(io.BytesIO(image_bytes)) as opened:
        image = opened.convert('RGB')
    if image.size != (width, height):
        raise ValueError(
            f'{source.image_member} is {image.width}x{image.height} but '
            f'{source.xml_member} says {width}x{height}')
    return image, boxes


def _read_existing_summary(out_dir: Path) -> Optional[dict]:
    summary_path = out_dir / _SUMMARY_FILE
    if not summary_path.is_file():
        return None
    try:
        with open(summary_path) as file:
            return json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        print_log(
            f'ignoring unreadable {summary_path}: {error}',
            logger='current',
            level=logging.WARNING)
        return None


def _build_dataset(work_dir: Path, wheel: Path, settings: dict) -> dict:
    """Write images and COCO files into ``work_dir`` and return the summary."""
    images_dir = work_dir / 'images'
    annotations_dir = work_dir / 'annotations'
    images_dir.mkdir()
    annotations_dir.mkdir()

    splits = {name: _CocoSplit() for name in SPLITS}
    site_counts: Dict[str, Dict[str, Dict[str, int]]] = {
        name: {}
        for name in SPLITS
    }
    with zipfile.ZipFile(wheel) as archive:
        for source in TREE_SOURCES:
            print_log(
                f'adding {Path(source.image_member).name} to the '
                f'{source.split} split',
                logger='current')
            image, boxes = _load_source(archive, source)
            counts = _add_source(splits[source.split], source, image, boxes,
                                 images_dir, settings['tile_size'],
                                 settings['tile_overlap'],
                                 settings['min_visible'])
            totals = site_counts[source.split].setdefault(
                source.site, dict.fromkeys(counts, 0))
            for key, value in counts.items():
                totals[key] += value

    for name, split in splits.items():
        with open(annotations_dir / f'{name}.json', 'w') as file:
            json.dump(split.to_coco(wheel.name), file)

    return {
        'format_version': _FORMAT_VERSION,
        'settings': settings,
        'source': {
            'requirement': DEEPFOREST_REQUIREMENT,
            'wheel': wheel.name,
            'sha256': sha256_of_file(wheel),
        },
        'categories': [dict(TREE_CATEGORY)],
        'box_convention': 'VOC xmin/ymin/xmax/ymax read as pixel corners; '
        'COCO bbox is [x, y, w, h] with w = xmax - xmin',
        'splits': {
            name: {
                'annotation_file': f'annotations/{name}.json',
                'images': len(split.images),
                'boxes': len(split.annotations),
                'images_without_boxes': split.count_images_without_boxes(),
                'sites': site_counts[name],
            }
            for name, split in splits.items()
        },
    }


def _check_replaceable(out_dir: Path) -> None:
    """Raise FileExistsError unless ``out_dir`` may be written or replaced.

    An existing ``out_dir`` is replaced only when it is empty or contains a
    dataset written by this module, so an unrelated folder is never deleted.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f'{out_dir} exists and is not a folder')
    is_empty = not any(out_dir.iterdir())
    if not is_empty and not (out_dir / _SUMMARY_FILE).is_file():
        raise FileExistsError(
            f'{out_dir} exists and is not a tree dataset (no {_SUMMARY_FILE}).'
            ' Remove it or choose another output folder.')


def _move_into_place(work_dir: Path, out_dir: Path) -> None:
    """Rename the finished ``work_dir`` to ``out_dir``, replacing it if any."""
    # Checked again because out_dir may have changed during the build.
    _check_replaceable(out_dir)
    if not out_dir.exists():
        os.rename(work_dir, out_dir)
        return

    print_log(f'replacing the dataset in {out_dir}', logger='current')
    old_dir = Path(
        tempfile.mkdtemp(prefix=f'.{out_dir.name}.old-', dir=out_dir.parent))
    os.rename(out_dir, old_dir / out_dir.name)
    try:
        os.rename(work_dir, out_dir)
    except OSError:
        os.rename(old_dir / out_dir.name, out_dir)
        os.rmdir(old_dir)
        raise
    shutil.rmtree(old_dir)


def prepare_tree_dataset(out_dir: PathLike,
                         cache_dir: Optional[PathLike] = None,
                         tile_size: int = 400,
                         tile_overlap: int = 100,
                         min_visible: float = 0.5) -> dict:
    """Build the COCO tree-crown dataset from the DeepForest wheel.

    Writes ``out_dir/images/*.png``, ``out_dir/annotations/train.json``
    (tiles of the two YELL crops), ``out_dir/annotations/val.json``
    (OSBS_029 and SOAP_061, untiled) and ``out_dir/dataset.json`` (this
    summary). All annotations use the category ``{"id": 1, "name": "tree"}``.

    Tiles are ``tile_size`` square and overlap their neighbours by
    ``tile_overlap`` pixels. The last row and column are shifted inward so
    that every tile is full size (see :func:`tile_origins`). A box goes into
    a tile when at least ``min_visible`` of its area lies inside it, and is
    clipped to the tile.

    VOC coordinates are read as pixel corners, the way DeepForest writes
    them, not as 1-based inclusive pixel indices: a box spans
    ``[xmin, xmax) x [ymin, ymax)`` and its COCO width is ``xmax - xmin``.

    Everything is built in a temporary folder next to ``out_dir`` and
    renamed into place at the end, so a failure leaves no partial dataset.
    When ``out_dir/dataset.json`` already records the same settings, its
    summary is returned and nothing is downloaded or written.

    Args:
        out_dir: Output folder. It must not exist, be empty, or hold a
            dataset written by this function, which is then replaced.
        cache_dir: Wheel cache folder, see :func:`fetch_deepforest_wheel`.
        tile_size: Side of the square training tiles in pixels.
        tile_overlap: Overlap of neighbouring tiles in pixels.
        min_visible: Minimum fraction of a box's area inside a tile for the
            box to be kept in that tile.

    Returns:
        The summary stored in ``dataset.json``: settings, source wheel name
        and SHA-256, and image and box counts per split and per site.

    Raises:
        ValueError: An argument is out of range, or the wheel content is not
            as expected.
        FileExistsError: ``out_dir`` is an unrelated non-empty folder or a
            file.
        WheelDownloadError: The wheel could not be downloaded.
    """
    _validate_settings(tile_size, tile_overlap, min_visible)
    out_dir = Path(out_dir)
    settings = {
        'tile_size': tile_size,
        'tile_overlap': tile_overlap,
        'min_visible': float(min_visible),
    }

    existing = _read_existing_summary(out_dir)
    if existing is not None \
            and existing.get('format_version') == _FORMAT_VERSION \
            and existing.get('settings') == settings:
        print_log(
            f'tree dataset in {out_dir} is up to date', logger='current')
        return existing

    _check_replaceable(out_dir)
    wheel = fetch_deepforest_wheel(cache_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(
        tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))
    try:
        # mkdtemp creates the folder accessible by its owner only.
        os.chmod(work_dir, 0o755)
        summary = _build_dataset(work_dir, wheel, settings)
        with open(work_dir / _SUMMARY_FILE, 'w') as file:
            json.dump(summary, file, indent=2)
        _move_into_place(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise

    for name, counts in summary['splits'].items():
        print_log(
            f'{name}: {counts["images"]} images, {counts["boxes"]} boxes',
            logger='current')
    print_log(f'tree dataset written to {out_dir}', logger='current')
    return summary
