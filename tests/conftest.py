"""Shared fixtures: the prepared tree data and configs that point at it."""
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIGS = REPO_ROOT / 'tests' / 'configs'
if str(REPO_ROOT / 'tools') not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / 'tools'))


@pytest.fixture(scope='session')
def tree_data(tmp_path_factory):
    """The real DeepForest tree data, prepared once per test session."""
    from mmdgms.data import prepare_tree_dataset
    out_dir = tmp_path_factory.mktemp('tree-data') / 'trees'
    prepare_tree_dataset(out_dir)
    return out_dir


def write_config(path: Path, base: Path, data_root: Path,
                 extra: str = '') -> Path:
    """Write a config that inherits ``base`` and reads ``data_root``."""
    root = f'{data_root}/'
    ann = f'{root}annotations/val.json'
    path.write_text(
        f"_base_ = [{str(base)!r}]\n"
        f"data_root = {root!r}\n"
        f"train_dataloader = dict(dataset=dict(data_root={root!r}))\n"
        f"val_dataloader = dict(dataset=dict(data_root={root!r}))\n"
        f"test_dataloader = dict(dataset=dict(data_root={root!r}))\n"
        f"val_evaluator = dict(ann_file={ann!r})\n"
        f"test_evaluator = dict(ann_file={ann!r})\n" + extra)
    return path
