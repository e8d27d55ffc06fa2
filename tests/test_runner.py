"""DGMS through MMEngine's real Runner: train, checkpoint, resume, test.

A tiny RetinaNet (tests/configs) is trained in full precision for one epoch
on 8 tree tiles. That checkpoint is the load_from of a 2-epoch DGMS run.
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from mmengine.hooks import Hook

import mmdgms
from mmdgms.convert import dgms_layers
from mmdgms.stats import layer_stats, total_stats

from conftest import REPO_ROOT, build_runner, run_tool


def mixture_state(model) -> dict:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items() if '.mixture.' in k
    }


def parse_map(log: str) -> list:
    """Return the last 'bbox_mAP_copypaste' line of a log as six floats."""
    lines = re.findall(r'bbox_mAP_copypaste: ([-\d. ]+)', log)
    assert lines, log[-3000:]
    return [float(x) for x in lines[-1].split()]


def test_hook_converts_backbone_and_neck(dgms_run):
    runner, _, _ = dgms_run
    names = list(dgms_layers(runner.model))
    assert names
    assert all(n.startswith(('backbone.', 'neck.')) for n in names)
    assert 'backbone.conv1.conv' not in names  # stem stays full precision
    convs = [
        n for n, m in runner.model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and n.startswith('bbox_head.')
    ]
    assert convs
    assert not any(n.startswith('bbox_head.') for n in names)


def test_every_mixture_parameter_trained(dgms_run, fp_checkpoint):
    runner, _, _ = dgms_run
    optimizer = runner.optim_wrapper.optimizer
    mixture_params = {
        n: p
        for n, p in runner.model.named_parameters() if '.mixture.' in n
    }
    assert mixture_params

    # AdamW keeps a state only for parameters that received a gradient.
    no_grad = [n for n, p in mixture_params.items() if p not in optimizer.state]
    assert no_grad == []
    max_grad = runner.gradient_recorder.max_grad
    assert max_grad.keys() == mixture_params.keys()
    zero = [n for n, g in max_grad.items() if g == 0.0]
    assert zero == []
    not_finite = [n for n, g in max_grad.items() if not math.isfinite(g)]
    assert not_finite == []

    # Each mixture moved away from its k-means start, which is deterministic
    # and so can be recomputed from the full-precision weights.
    fp_state = torch.load(fp_checkpoint, weights_only=True)['state_dict']
    unchanged = []
    for name, layer in dgms_layers(runner.model).items():
        fresh = type(layer.mixture)(bits=layer.bits)
        fresh.init_from_weights(fp_state[f'{name}.weight'])
        for pname, start in fresh.named_parameters():
            trained = getattr(layer.mixture, pname)
            if torch.equal(trained.detach(), start.detach()):
                unchanged.append(f'{name}.mixture.{pname}')
    assert unchanged == [], unchanged


def test_paramwise_cfg_applies_to_mixture(dgms_run):
    runner, _, _ = dgms_run
    mixture_ids = {
        id(p)
        for n, p in runner.model.named_parameters() if '.mixture.' in n
    }
    groups = runner.optim_wrapper.optimizer.param_groups
    mixture_groups = [
        g for g in groups if any(id(p) in mixture_ids for p in g['params'])
    ]
    assert mixture_groups
    for group in mixture_groups:
        assert group['weight_decay'] == 0.0
        assert group['initial_lr'] == pytest.approx(1e-3)  # 10 x 1e-4


def test_checkpoint_holds_mixture_and_meta(dgms_run):
    runner, work_dir, _ = dgms_run
    checkpoint = torch.load(work_dir / 'epoch_2.pth', weights_only=True)
    saved = {
        k: v
        for k, v in checkpoint['state_dict'].items() if '.mixture.' in k
    }
    live = mixture_state(runner.model)
    assert saved.keys() == live.keys()
    for key in live:
        assert torch.equal(saved[key], live[key]), key
    layers = checkpoint['meta']['dgms']['layers']
    assert set(layers) == set(dgms_layers(runner.model))
    assert set(layers.values()) == {4}


def test_resume_restores_mixture_without_reinit(configs, dgms_run,
                                                tmp_path):
    _, work_dir, _ = dgms_run
    checkpoint = work_dir / 'epoch_1.pth'
    saved = torch.load(checkpoint, weights_only=True)['state_dict']

    # max_epochs=1 equals the checkpoint's epoch, so train() resumes and
    # stops without an iteration: the model must equal the checkpoint.
    runner = build_runner(configs[1], tmp_path, resume=True,
                          load_from=str(checkpoint),
                          train_cfg=dict(max_epochs=1))
    runner.train()
    live = mixture_state(runner.model)
    assert live
    for key, value in live.items():
        assert torch.equal(value, saved[key]), key
    log = next(tmp_path.glob('*/*.log')).read_text()
    assert 'nothing to initialise' in log
    assert 'by k-means' not in log


def test_resume_continues_training(configs, dgms_run, tmp_path):
    _, work_dir, _ = dgms_run
    runner = build_runner(configs[1], tmp_path, resume=True,
                          load_from=str(work_dir / 'epoch_1.pth'))
    runner.train()
    assert runner.epoch == 2
    assert runner.iter == 4  # 2 epochs x 2 iterations of 4 images


def test_tools_test_matches_last_validation(configs, dgms_run, tmp_path):
    _, work_dir, val_map = dgms_run
    checkpoint = work_dir / 'epoch_2.pth'
    ours = tmp_path / 'ours.pkl'
    log = run_tool([
        REPO_ROOT / 'tools' / 'test.py', configs[1], checkpoint,
        '--work-dir', tmp_path / 'ours', '--out', ours
    ])
    assert parse_map(log)[:2] == pytest.approx(val_map, abs=1e-9)
    assert 'DGMS layers at test (hard weights)' in log

    # mmdet's own copy of tools/test.py, with the plugin loaded only through
    # the config's custom_imports.
    import mmdet
    mmdet_test = Path(mmdet.__file__).parent / '.mim' / 'tools' / 'test.py'
    theirs = tmp_path / 'theirs.pkl'
    log = run_tool([
        mmdet_test, configs[1], checkpoint, '--work-dir',
        tmp_path / 'theirs', '--out', theirs
    ])
    assert parse_map(log)[:2] == pytest.approx(val_map, abs=1e-9)

    import pickle
    with open(ours, 'rb') as f:
        ours_results = pickle.load(f)
    with open(theirs, 'rb') as f:
        theirs_results = pickle.load(f)
    assert len(ours_results) == 2
    for a, b in zip(ours_results, theirs_results):
        boxes = a['pred_instances']['bboxes']
        assert len(boxes) > 0
        assert torch.equal(boxes, b['pred_instances']['bboxes'])
        assert torch.equal(a['pred_instances']['scores'],
                           b['pred_instances']['scores'])


def test_mmdet_train_tool_runs_dgms(configs, fp_checkpoint, tmp_path):
    import mmdet
    mmdet_train = Path(mmdet.__file__).parent / '.mim' / 'tools' / 'train.py'
    log = run_tool([
        mmdet_train, configs[1], '--work-dir', tmp_path, '--cfg-options',
        f'load_from={fp_checkpoint}', 'train_cfg.max_epochs=1'
    ])
    assert 'DGMS: initialised' in log
    checkpoint = torch.load(tmp_path / 'epoch_1.pth', weights_only=True)
    assert any('.mixture.means' in k for k in checkpoint['state_dict'])


def test_missing_load_from_is_reported(configs, tmp_path):
    missing = tmp_path / 'no_such_checkpoint.pth'
    runner = build_runner(configs[1], tmp_path, load_from=str(missing))
    with pytest.raises(FileNotFoundError, match='no_such_checkpoint.pth'):
        runner.train()


def test_no_pretrained_weights_is_rejected(configs, tmp_path):
    runner = build_runner(configs[1], tmp_path, load_from=None)
    with pytest.raises(ValueError, match='load_from is not set'):
        runner.train()


def test_resume_without_checkpoint_is_rejected(configs, tmp_path):
    # An empty work dir: MMEngine finds nothing to resume and loads nothing.
    runner = build_runner(configs[1], tmp_path, resume=True, load_from=None)
    with pytest.raises(ValueError, match='resume found no checkpoint'):
        runner.train()


def test_full_precision_checkpoint_cannot_be_tested(configs, fp_checkpoint,
                                                    tmp_path):
    runner = build_runner(configs[1], tmp_path, load_from=str(fp_checkpoint))
    with pytest.raises(RuntimeError, match='not a checkpoint of a DGMS run'):
        runner.test()


def read_scalars(work_dir: Path) -> list:
    """Return the records of the run's LocalVisBackend scalars.json."""
    files = list(work_dir.glob('*/vis_data/scalars.json'))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


@pytest.fixture(scope='module')
def final_stats(dgms_run):
    """Totals and per-layer rows of the trained model (hard weights)."""
    rows = layer_stats(dgms_run[0].model)
    return total_stats(rows), {row['name']: row for row in rows}


def test_training_scalars_reach_local_backend(dgms_run, final_stats):
    _, work_dir, _ = dgms_run
    records = read_scalars(work_dir)
    train = [r for r in records if 'dgms/sparsity' in r]
    # LoggerHook interval 1: one record per iteration, 2 epochs x 2.
    assert [r['step'] for r in train] == [1, 2, 3, 4]
    for record in train:
        assert 0.0 <= record['dgms/sparsity'] < 1.0
        assert record['dgms/avg_bits'] == 4.0
        assert record['dgms/temperature'] > 0.0
        assert 0.0 < record['dgms/codebook_usage'] <= 1.0
        assert 'loss' in record  # the same record as the losses

    # No optimizer step follows the last logged iteration, so its totals are
    # those of the trained model.
    total, _ = final_stats
    assert train[-1]['dgms/sparsity'] == pytest.approx(total['sparsity'])
    assert train[-1]['dgms/temperature'] == pytest.approx(
        total['temperature'])
    assert train[-1]['dgms/codebook_usage'] == pytest.approx(
        total['codebook_usage'])


def test_evaluation_scalars_reach_local_backend(dgms_run, final_stats):
    _, work_dir, _ = dgms_run
    records = read_scalars(work_dir)
    total, rows = final_stats

    evaluations = [r for r in records if 'dgms_eval/sparsity' in r]
    assert len(evaluations) == 1
    record = evaluations[0]
    assert record['step'] == 2  # LoggerHook steps evaluations by epoch
    assert 'coco/bbox_mAP' in record
    assert record['dgms_eval/sparsity'] == pytest.approx(total['sparsity'])
    assert record['dgms_eval/avg_bits'] == 4.0
    assert record['dgms_eval/temperature'] == pytest.approx(
        total['temperature'])
    assert record['dgms_eval/codebook_usage'] == pytest.approx(
        total['codebook_usage'])

    # Per-layer values: one record after the k-means initialisation (step
    # 0) and one after the evaluation, each with 3 values per layer.
    layer_records = [
        r for r in records if any(k.startswith('dgms_layers/') for k in r)
    ]
    assert [r['step'] for r in layer_records] == [0, 2]
    last = layer_records[-1]
    assert len(last) == 1 + 3 * len(rows)  # with 'step'
    for name, row in rows.items():
        for key in ('sparsity', 'temperature', 'codebook_usage'):
            assert last[f'dgms_layers/{name}/{key}'] == pytest.approx(
                row[key]), (name, key)


def test_text_log_has_totals_only(dgms_run):
    _, work_dir, _ = dgms_run
    log = next(work_dir.glob('*/*.log')).read_text()
    assert re.search(r'dgms/sparsity: [\d.]+', log)
    assert re.search(r'dgms_eval/avg_bits: 4\.0', log)
    assert 'dgms_layers/' not in log


def test_tensorboard_event_file_matches_local_backend(dgms_run):
    from tensorboard.backend.event_processing.event_accumulator import \
        EventAccumulator

    _, work_dir, _ = dgms_run
    records = read_scalars(work_dir)
    event_dirs = {p.parent for p in work_dir.glob('*/vis_data/events.out.*')}
    assert len(event_dirs) == 1, event_dirs
    events = EventAccumulator(str(event_dirs.pop()),
                              size_guidance={'scalars': 0})
    events.Reload()
    tags = set(events.Tags()['scalars'])

    layer_tags = {t for t in tags if t.startswith('dgms_layers/')}
    expected_layer_tags = {
        k for r in records for k in r if k.startswith('dgms_layers/')
    }
    assert layer_tags == expected_layer_tags
    for tag in ('dgms/sparsity', 'dgms/temperature', 'dgms/codebook_usage',
                'dgms/avg_bits', 'dgms_eval/sparsity',
                next(iter(sorted(layer_tags)))):
        assert tag in tags
        logged = [(r['step'], r[tag]) for r in records if tag in r]
        read_back = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in read_back] == [s for s, _ in logged], tag
        for (_, value), (_, expected) in zip(read_back, logged):
            # TensorBoard stores float32.
            assert value == pytest.approx(expected, rel=1e-6), tag


def test_checkpoint_meta_reports_average_bits(dgms_run, final_stats):
    runner, work_dir, _ = dgms_run
    meta = torch.load(work_dir / 'epoch_2.pth',
                      weights_only=True)['meta']['dgms']
    layers = dgms_layers(runner.model)
    assert meta['params'] == sum(m.weight.numel() for m in layers.values())
    assert meta['avg_bits'] == 4.0
    total, _ = final_stats
    assert meta['sparsity'] == pytest.approx(total['sparsity'])


class HardWeightRecorder(Hook):
    """Record one DGMS layer's evaluation weights at every test iteration.

    Like EMAHook, it swaps other weights in (here: the weights times 1.5,
    through ``.data``) before the test epoch and back after it, at a lower
    priority than DGMSHook.
    """

    priority = 'NORMAL'

    def __init__(self):
        self.enabled, self.weights = [], []

    def _layer(self, runner):
        return dgms_layers(runner.model)[self.layer_name]

    def before_test_epoch(self, runner):
        self.layer_name = next(iter(dgms_layers(runner.model)))
        layer = self._layer(runner)
        self.original = layer.weight.detach().clone()
        layer.weight.data.mul_(1.5)
        self.swapped = layer.weight.detach().clone()

    def after_test_iter(self, runner, batch_idx, data_batch=None,
                        outputs=None):
        layer = self._layer(runner)
        self.enabled.append(layer.hard_weight_cache_enabled)
        self.weights.append(layer.quantized_weight())

    def after_test_epoch(self, runner, metrics=None):
        layer = self._layer(runner)
        layer.weight.data.copy_(self.original)
        self.enabled_after = layer.hard_weight_cache_enabled


def test_hard_weights_computed_once_per_test(configs, dgms_run, tmp_path):
    _, work_dir, _ = dgms_run
    runner = build_runner(configs[1], tmp_path,
                          load_from=str(work_dir / 'epoch_2.pth'))
    recorder = HardWeightRecorder()
    runner.register_hook(recorder)

    runner.test()

    assert recorder.enabled == [True, True]
    first, second = recorder.weights
    assert second is first
    layer = dgms_layers(runner.model)[recorder.layer_name]
    torch.testing.assert_close(first,
                               layer.mixture.hard_weights(recorder.swapped),
                               rtol=0, atol=0)
    assert not recorder.enabled_after
