"""DGMS checkpoints through MMDetection's inference APIs, and the errors for
a checkpoint that does not fit its config.

Uses the tiny detector of conftest.py: a full-precision checkpoint and the
2-epoch DGMS run fine-tuned from it.
"""
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from PIL import Image

from mmdgms.apis import CheckpointMismatchError
from mmdgms.apis import init_detector as checked_init_detector
from mmdgms.convert import dgms_layers

from conftest import (REPO_ROOT, TEST_CONFIGS, build_runner, run_tool,
                      write_config)


class PredictionRecorder(Hook):
    """Keep the predictions of every test iteration."""

    def __init__(self):
        self.samples = []

    def after_test_iter(self, runner, batch_idx, data_batch=None,
                        outputs=None):
        self.samples.extend(outputs)


@pytest.fixture(scope='module')
def dgms_checkpoint(dgms_run):
    return dgms_run[1] / 'epoch_2.pth'


@pytest.fixture(scope='module')
def test_loop_predictions(configs, dgms_checkpoint, tmp_path_factory):
    """Predictions of the Runner's test loop on the 2 validation images."""
    runner = build_runner(configs[1], tmp_path_factory.mktemp('test-loop'),
                          load_from=str(dgms_checkpoint))
    recorder = PredictionRecorder()
    runner.register_hook(recorder)
    runner.test()
    assert len(recorder.samples) == 2
    return recorder.samples


def assert_same_detections(ours, reference):
    assert len(reference.pred_instances) > 0
    for key in ('bboxes', 'scores', 'labels'):
        assert torch.equal(ours.pred_instances[key],
                           reference.pred_instances[key]), key


@pytest.mark.parametrize('init', ['mmdet', 'mmdgms'])
def test_inference_detector_matches_test_loop(init, configs, dgms_checkpoint,
                                              test_loop_predictions):
    from mmdet.apis import inference_detector
    from mmdet.apis import init_detector as mmdet_init_detector
    init_detector = (mmdet_init_detector
                     if init == 'mmdet' else checked_init_detector)

    model = init_detector(str(configs[1]), str(dgms_checkpoint),
                          device='cpu')
    assert len(dgms_layers(model)) > 0
    assert not model.training
    for reference in test_loop_predictions:
        result = inference_detector(model, reference.img_path)
        assert_same_detections(result, reference)


def test_det_inferencer_matches_test_loop(configs, dgms_checkpoint,
                                          test_loop_predictions, tmp_path):
    from mmdet.apis import DetInferencer
    inferencer = DetInferencer(model=str(configs[1]),
                               weights=str(dgms_checkpoint), device='cpu',
                               show_progress=False)
    reference = test_loop_predictions[0]
    output = inferencer(reference.img_path, out_dir=str(tmp_path),
                        return_datasamples=True)
    assert_same_detections(output['predictions'][0], reference)
    drawn = list((tmp_path / 'vis').glob('*'))
    assert len(drawn) == 1


def test_infer_demo_draws_png(configs, dgms_checkpoint,
                              test_loop_predictions, tmp_path):
    image = test_loop_predictions[0].img_path
    out = tmp_path / 'drawn.png'
    log = run_tool([
        REPO_ROOT / 'tools' / 'infer_demo.py', configs[1], dgms_checkpoint,
        image, '-o', out, '--score-thr', '0.0'
    ])
    assert 'drew them to' in log
    with Image.open(out) as drawn, Image.open(image) as original:
        assert drawn.format == 'PNG'
        assert drawn.size == original.size
    assert [p.name for p in tmp_path.iterdir()] == ['drawn.png']


def test_dgms_checkpoint_in_plain_config_rejected(configs, dgms_checkpoint):
    with pytest.raises(CheckpointMismatchError) as error:
        checked_init_detector(str(configs[0]), str(dgms_checkpoint),
                              device='cpu')
    message = str(error.value)
    assert 'is a DGMS checkpoint' in message
    # The experiment name of the training run names its config, dgms.py.
    assert "the config it was trained with, 'dgms'" in message


def test_plain_checkpoint_in_dgms_config_rejected(configs, fp_checkpoint):
    with pytest.raises(CheckpointMismatchError) as error:
        checked_init_detector(str(configs[1]), str(fp_checkpoint),
                              device='cpu')
    message = str(error.value)
    assert 'is a full-precision checkpoint' in message
    assert "the config it was trained with, 'fp'" in message


def test_dgms_checkpoint_in_hook_only_config_rejected(hook_config,
                                                      dgms_checkpoint):
    with pytest.raises(CheckpointMismatchError,
                       match="converts the model in DGMSHook.*DGMSDetector"):
        checked_init_detector(str(hook_config), str(dgms_checkpoint),
                              device='cpu')


def test_other_bit_width_rejected(configs, dgms_checkpoint, tree_data,
                                  tmp_path):
    config = write_config(
        tmp_path / 'dgms2.py', configs[1], tree_data,
        "dgms = dict(bits=2)\nmodel = dict(dgms=dgms)\n"
        "custom_hooks = [dict(type='DGMSHook', **dgms)]\n")
    with pytest.raises(CheckpointMismatchError,
                       match='has 4 bits in the checkpoint, 2 in the config'):
        checked_init_detector(str(config), str(dgms_checkpoint), device='cpu')


def test_mmdet_init_detector_plain_checkpoint_fails_at_inference(
        configs, fp_checkpoint, test_loop_predictions):
    from mmdet.apis import inference_detector, init_detector
    model = init_detector(str(configs[1]), str(fp_checkpoint), device='cpu')
    with pytest.raises(RuntimeError,
                       match='has no Gaussian mixture for .* quantized'):
        inference_detector(model, test_loop_predictions[0].img_path)


@pytest.mark.parametrize('direction', ['dgms_in_plain', 'plain_in_dgms'])
def test_tools_test_rejects_mismatch(direction, configs, fp_checkpoint,
                                     dgms_checkpoint, tmp_path):
    if direction == 'dgms_in_plain':
        config, checkpoint = configs[0], dgms_checkpoint
        expected = "is a DGMS checkpoint .* trained with, 'dgms'"
    else:
        config, checkpoint = configs[1], fp_checkpoint
        expected = "is a full-precision checkpoint .* trained with, 'fp'"
    log = run_tool([
        REPO_ROOT / 'tools' / 'test.py', config, checkpoint, '--work-dir',
        tmp_path
    ], expect_success=False)
    assert 'error: ' in log
    assert re.search(expected, log), log[-2000:]


def test_tools_test_accepts_hook_only_config(hook_config, dgms_checkpoint,
                                             dgms_run, tmp_path):
    # The hook converts the model before the checkpoint loads, so the
    # hook-only form of the config evaluates a DGMS checkpoint as before.
    log = run_tool([
        REPO_ROOT / 'tools' / 'test.py', hook_config, dgms_checkpoint,
        '--work-dir', tmp_path
    ])
    assert 'DGMS layers at test (hard weights)' in log


def test_hook_rejects_settings_other_than_model(configs, fp_checkpoint,
                                                tree_data, tmp_path):
    config = write_config(
        tmp_path / 'conflict.py', configs[1], tree_data,
        "custom_hooks = [dict(type='DGMSHook', bits=2)]\n")
    runner = build_runner(config, tmp_path, load_from=str(fp_checkpoint))
    with pytest.raises(ValueError, match='bits: model 4, hook 2'):
        runner.train()


def test_hook_only_run_loads_into_dgms_detector(tree_data, fp_checkpoint,
                                                tmp_path):
    # The neck alone, one iteration of 4 images and no validation keep this
    # run short.
    settings = ("dgms = dict(bits=4, include=['neck.*'])\n"
                "custom_hooks = [dict(type='DGMSHook', **dgms)]\n")
    hook_only = write_config(tmp_path / 'hook_only.py',
                             TEST_CONFIGS / 'tiny_retinanet_dgms_hook.py',
                             tree_data, settings)
    detector = write_config(tmp_path / 'detector.py',
                            TEST_CONFIGS / 'tiny_retinanet_dgms.py',
                            tree_data, settings + 'model = dict(dgms=dgms)\n')
    runner = build_runner(hook_only, tmp_path / 'run',
                          load_from=str(fp_checkpoint),
                          train_dataloader=dict(dataset=dict(indices=4)),
                          train_cfg=dict(max_epochs=1, val_interval=2))
    runner.train()
    assert all(n.startswith('neck.') for n in dgms_layers(runner.model))

    checkpoint = tmp_path / 'run' / 'epoch_1.pth'
    model = checked_init_detector(str(detector), str(checkpoint),
                                  device='cpu')
    hook_state = torch.load(checkpoint, weights_only=True)['state_dict']
    assert hook_state.keys() == model.state_dict().keys()
    assert dgms_layers(model).keys() == dgms_layers(runner.model).keys()
    for name, layer in dgms_layers(model).items():
        assert layer.mixture.initialized, name
        assert torch.equal(layer.mixture.means,
                           hook_state[f'{name}.mixture.means']), name


def test_dgms_detector_rejects_unknown_setting(configs):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(str(configs[1])).model
    cfg.dgms = dict(bitz=4)
    with pytest.raises(ValueError, match="unexpected keyword.*'bitz'"):
        MODELS.build(cfg)
    cfg.dgms = dict(bits=4)
    cfg.detector_type = None
    with pytest.raises(ValueError, match='needs detector_type'):
        MODELS.build(cfg)
