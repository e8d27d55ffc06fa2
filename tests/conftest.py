"""Shared fixtures: the prepared tree data, configs that point at it, and
a tiny detector trained in full precision and then with DGMS."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

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


def run_tool(args, cwd=REPO_ROOT, expect_success: bool = True) -> str:
    """Run a Python script of this repository and return its output.

    Asserts that the script exits with 0, or with another status when
    ``expect_success`` is False.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if expect_success:
        assert proc.returncode == 0, output[-4000:]
    else:
        assert proc.returncode != 0, output[-4000:]
    return output


def build_runner(config: Path, work_dir: Path, **options) -> Runner:
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(work_dir)
    cfg.merge_from_dict(options)
    return Runner.from_cfg(cfg)


@pytest.fixture(scope='session')
def configs(tree_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp('configs')
    fp = write_config(folder / 'fp.py', TEST_CONFIGS / 'tiny_retinanet_fp.py',
                      tree_data)
    dgms = write_config(folder / 'dgms.py',
                        TEST_CONFIGS / 'tiny_retinanet_dgms.py', tree_data)
    return fp, dgms


@pytest.fixture(scope='session')
def hook_config(tree_data, tmp_path_factory):
    """The DGMS config in the hook-only form (no DGMSDetector)."""
    folder = tmp_path_factory.mktemp('hook-config')
    return write_config(folder / 'dgms_hook.py',
                        TEST_CONFIGS / 'tiny_retinanet_dgms_hook.py', tree_data)


@pytest.fixture(scope='session')
def fp_checkpoint(configs, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('fp')
    build_runner(configs[0], work_dir).train()
    checkpoint = work_dir / 'epoch_1.pth'
    assert checkpoint.is_file()
    return checkpoint


class GradientRecorder(Hook):
    """Record the largest absolute gradient of every mixture parameter."""

    priority = 'LOW'  # after DGMSHook has built and initialised the mixtures

    def __init__(self):
        self.max_grad = {}

    def before_train(self, runner):
        for name, param in runner.model.named_parameters():
            if '.mixture.' in name:
                self.max_grad[name] = 0.0
                param.register_hook(self._recorder(name))

    def _recorder(self, name):
        def record(grad):
            value = float(grad.abs().max())
            if not math.isfinite(value):
                value = math.inf
            self.max_grad[name] = max(self.max_grad[name], value)
        return record


@pytest.fixture(scope='session')
def dgms_run(configs, fp_checkpoint, tmp_path_factory):
    """A finished 2-epoch DGMS run: (runner, work_dir, val metrics)."""
    work_dir = tmp_path_factory.mktemp('dgms')
    runner = build_runner(configs[1], work_dir,
                          load_from=str(fp_checkpoint))
    recorder = GradientRecorder()
    runner.register_hook(recorder)
    runner.train()
    runner.gradient_recorder = recorder
    hub = runner.message_hub
    val_map = [
        hub.get_scalar(f'val/coco/{key}').current()
        for key in ('bbox_mAP', 'bbox_mAP_50')
    ]
    return runner, work_dir, val_map
