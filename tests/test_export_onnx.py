"""ONNX export of the tiny DGMS RetinaNet: ONNX Runtime against PyTorch."""
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from mmdgms.apis import init_detector
from mmdgms.convert import dgms_layers
from mmdgms.export import (ATOL, RTOL, decode_hard_weights, export_onnx,
                           preprocess_image)

from conftest import REPO_ROOT, run_tool

INPUT_SHAPE = (1, 3, 128, 128)  # the tiny config's 128 px test scale


@pytest.fixture(scope='module')
def dgms_model(configs, dgms_run):
    return init_detector(str(configs[1]), str(dgms_run[1] / 'epoch_2.pth'),
                         device='cpu')


@pytest.fixture(scope='module')
def val_image(dgms_model, tree_data):
    """A validation image as the model's input, with its DetDataSample."""
    image = sorted((tree_data / 'images').glob('OSBS*'))[0]
    inputs, data_sample = preprocess_image(dgms_model, image, INPUT_SHAPE[2:])
    assert tuple(inputs.shape) == INPUT_SHAPE
    return inputs, data_sample


@pytest.fixture(scope='module')
def exported(dgms_model, tmp_path_factory):
    out = tmp_path_factory.mktemp('onnx') / 'tiny.onnx'
    report = export_onnx(dgms_model, str(out), INPUT_SHAPE)
    return out, report


def run_onnx(path, image):
    session = onnxruntime.InferenceSession(
        str(path), providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    return names, session.run(None, {'image': image.numpy()})


def test_ort_outputs_match_pytorch(dgms_model, exported, val_image):
    path, report = exported
    image = val_image[0]
    with torch.no_grad():
        cls_scores, bbox_preds = dgms_model(image, mode='tensor')
    expected = list(cls_scores) + list(bbox_preds)

    names, actual = run_onnx(path, image)
    assert names == [f'cls_score_{i}' for i in range(4)] + [
        f'bbox_pred_{i}' for i in range(4)
    ]
    assert report.output_names == names
    assert len(actual) == len(expected)
    for name, ours, theirs in zip(names, expected, actual):
        np.testing.assert_allclose(theirs, ours.numpy(), rtol=RTOL,
                                   atol=ATOL, err_msg=name)
    assert max(report.max_abs_diff.values()) <= ATOL


def test_graph_has_hard_not_latent_weights(dgms_model, exported, val_image):
    # The latent full-precision weights give other outputs: the match above
    # holds only because the graph carries the codebook values.
    image = val_image[0]
    latent = decode_hard_weights(dgms_model)
    for name, layer in dgms_layers(dgms_model).items():
        latent.get_submodule(name).weight.data.copy_(layer.weight)
    with torch.no_grad():
        cls_scores, bbox_preds = latent(image, mode='tensor')
    _, actual = run_onnx(exported[0], image)
    latent_diff = max(
        float(np.abs(ours - theirs.numpy()).max())
        for ours, theirs in zip(actual, list(cls_scores) + list(bbox_preds)))
    export_diff = max(exported[1].max_abs_diff.values())
    assert latent_diff > 100 * export_diff


def test_decoded_convs_use_codebook_values(dgms_model):
    decoded = decode_hard_weights(dgms_model)
    layers = dgms_layers(dgms_model)
    assert layers
    assert dgms_layers(decoded) == {}
    for name, layer in layers.items():
        conv = decoded.get_submodule(name)
        assert type(conv) is torch.nn.Conv2d
        codebook = layer.mixture.codebook().detach()
        values = conv.weight.detach().unique()
        assert len(values) <= layer.mixture.num_components, name
        assert torch.isin(values, codebook).all(), name
    # The model itself keeps its DGMS layers.
    assert dgms_layers(dgms_model).keys() == layers.keys()


def test_ort_detections_match_pytorch(dgms_model, exported, val_image):
    # Post-processing outside the graph: mmdet's own head decodes the ONNX
    # outputs, as docs/deployment.md shows.
    image, data_sample = val_image
    _, outputs = run_onnx(exported[0], image)
    tensors = [torch.from_numpy(o) for o in outputs]
    ort_results = dgms_model.bbox_head.predict_by_feat(
        tensors[:4], tensors[4:], batch_img_metas=[data_sample.metainfo],
        rescale=True)[0]
    with torch.no_grad():
        torch_results = dgms_model.predict(image, [data_sample])[0]
    ours = torch_results.pred_instances
    assert len(ours) > 0
    assert len(ort_results) == len(ours)
    torch.testing.assert_close(ort_results.bboxes, ours.bboxes, rtol=1e-4,
                               atol=1e-3)
    torch.testing.assert_close(ort_results.scores, ours.scores, rtol=1e-4,
                               atol=1e-5)
    assert torch.equal(ort_results.labels, ours.labels)


def test_onnx_metadata_describes_io(exported, dgms_model):
    model = onnx.load(str(exported[0]))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta['input_shape']) == list(INPUT_SHAPE)
    assert 'NMS' in meta['postprocessing']
    preprocessing = json.loads(meta['preprocessing'])
    assert preprocessing['mean'] == pytest.approx([123.675, 116.28, 103.53])
    assert json.loads(meta['strides']) == [[8, 8], [16, 16], [32, 32],
                                           [64, 64]]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == list(INPUT_SHAPE)


def test_export_features_part(dgms_model, tmp_path):
    out = tmp_path / 'features.onnx'
    report = export_onnx(dgms_model, str(out), INPUT_SHAPE, part='features')
    assert report.output_names == [f'feature_{i}' for i in range(4)]
    assert out.is_file()


def test_export_tool_writes_verified_file(configs, dgms_run, tmp_path):
    out = tmp_path / 'model.onnx'
    log = run_tool([
        REPO_ROOT / 'tools' / 'export_onnx.py', configs[1],
        dgms_run[1] / 'epoch_2.pth', '-o', out
    ])
    assert 'input image [1, 3, 128, 128]' in log
    assert 'cls_score_0' in log
    assert onnx.load(str(out)).graph.input[0].name == 'image'
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx']


def test_export_tool_failure_keeps_old_file(configs, fp_checkpoint,
                                            tmp_path):
    out = tmp_path / 'model.onnx'
    out.write_bytes(b'previous export')
    log = run_tool([
        REPO_ROOT / 'tools' / 'export_onnx.py', configs[1], fp_checkpoint,
        '-o', out
    ], expect_success=False)
    assert 'is a full-precision checkpoint' in log
    assert out.read_bytes() == b'previous export'
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx']
