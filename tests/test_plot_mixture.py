"""The mixture plot of the tiny DGMS RetinaNet: PNG, panels and errors."""
import pytest
import torch
from PIL import Image

from mmdgms.analysis import component_densities, plot_mixtures
from mmdgms.apis import init_detector
from mmdgms.convert import dgms_layers

from conftest import REPO_ROOT, run_tool

PLOT_TOOL = REPO_ROOT / 'tools' / 'analysis' / 'plot_mixture.py'


@pytest.fixture(scope='module')
def dgms_model(configs, dgms_run):
    return init_detector(str(configs[1]), str(dgms_run[1] / 'epoch_2.pth'),
                         device='cpu')


def test_plot_has_one_panel_per_layer(dgms_model, tmp_path):
    out = tmp_path / 'mixtures.png'
    layout = plot_mixtures(dgms_model, str(out), cols=5)
    layers = list(dgms_layers(dgms_model))
    assert layout.layers == layers
    assert layout.panels == len(layers)
    assert layout.cols == 5
    assert (layout.rows - 1) * layout.cols < layout.panels
    assert layout.panels <= layout.rows * layout.cols
    with Image.open(out) as image:
        assert image.format == 'PNG'
        image.verify()


def test_component_densities_integrate_to_one(dgms_model):
    layer = next(iter(dgms_layers(dgms_model).values()))
    spread = float(layer.weight.abs().max()) * 4
    grid = torch.linspace(-spread, spread, 200001, dtype=torch.float64)
    densities = component_densities(layer.mixture, grid)
    assert densities.shape == (layer.mixture.num_components, len(grid))
    total = torch.trapezoid(densities.sum(0), grid)
    assert float(total) == pytest.approx(1.0, abs=1e-3)


def test_plot_tool_with_before_checkpoint(configs, dgms_run, fp_checkpoint,
                                          tmp_path):
    out = tmp_path / 'before_after.png'
    log = run_tool([
        PLOT_TOOL, configs[1], dgms_run[1] / 'epoch_2.pth', '-o', out,
        '--before', fp_checkpoint
    ])
    panels = len(dgms_layers(dgms_run[0].model))
    assert f'wrote {out}: {panels} panels' in log
    with Image.open(out) as image:
        assert image.format == 'PNG'
    assert [p.name for p in tmp_path.iterdir()] == ['before_after.png']


def test_plot_tool_rejects_plain_checkpoint(configs, fp_checkpoint, tmp_path):
    out = tmp_path / 'plain.png'
    log = run_tool([PLOT_TOOL, configs[0], fp_checkpoint, '-o', out],
                   expect_success=False)
    assert 'not a checkpoint of a DGMS run' in log
    assert 'Traceback' not in log
    assert list(tmp_path.iterdir()) == []


def test_plot_rejects_model_without_dgms_layers(configs, fp_checkpoint,
                                                tmp_path):
    model = init_detector(str(configs[0]), str(fp_checkpoint), device='cpu')
    with pytest.raises(ValueError, match='has no DGMS layer'):
        plot_mixtures(model, str(tmp_path / 'x.png'))


def test_plot_rejects_before_weights_of_other_shape(dgms_model, tmp_path):
    layers = dgms_layers(dgms_model)
    before = {name: layer.weight.detach() for name, layer in layers.items()}
    name = next(iter(before))
    before[name] = before[name][:1]
    with pytest.raises(ValueError, match=f'{name} has shape'):
        plot_mixtures(dgms_model, str(tmp_path / 'x.png'), before)
