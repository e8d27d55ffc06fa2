"""Weight histograms with the learned Gaussian mixtures of a DGMS model."""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..convert import dgms_layers


@dataclass
class MixtureFigureLayout:
    """The panel grid of a mixture figure.

    Args:
        rows (int): rows of the grid.
        cols (int): columns of the grid.
        layers (list): layer name of each panel, row by row.
    """
    rows: int
    cols: int
    layers: List[str]

    @property
    def panels(self) -> int:
        return len(self.layers)


@torch.no_grad()
def component_densities(mixture: nn.Module, grid: Tensor) -> Tensor:
    """Return pi_k N(w | mu_k, sigma_k) for every component k and grid point.

    Returns:
        Tensor: shape (K, len(grid)). Summed over k, it is the mixture's
        density, directly comparable with a density-normalised histogram.
    """
    means, log_coef, inv_two_var = mixture.mixture_terms()
    grid = grid.to(means.dtype).reshape(1, -1)
    exponent = (log_coef.reshape(-1, 1) - inv_two_var.reshape(-1, 1) *
                (grid - means.reshape(-1, 1))**2)
    return exponent.exp() / math.sqrt(2 * math.pi)


def plot_mixtures(model: nn.Module,
                  out_file: str,
                  before_weights: Optional[Dict[str, Tensor]] = None,
                  cols: int = 6,
                  bins: int = 80,
                  dpi: int = 80) -> MixtureFigureLayout:
    """Draw one panel per DGMS layer of ``model`` and save the grid as PNG.

    Each panel shows the histogram of the layer's latent weights (as a
    density), the density of every mixture component scaled by its mixing
    coefficient (component 0, the pruning component at 0, in red), and the
    codebook values as vertical lines. With ``before_weights`` the panel
    also outlines the histogram of those weights, e.g. the full-precision
    weights before DGMS fine-tuning.

    Args:
        model (nn.Module): a model with initialised DGMS layers.
        out_file (str): the PNG file to write.
        before_weights (dict, optional): layer name -> weight tensor.
        cols (int): panels per row. Default: 6.
        bins (int): histogram bins. Default: 80.
        dpi (int): resolution of the PNG. Default: 80.

    Returns:
        MixtureFigureLayout: the grid that was drawn.

    Raises:
        ValueError: the model has no DGMS layer, a mixture is not
            initialised, or ``before_weights`` lacks a layer or has another
            shape for it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = dgms_layers(model)
    if not layers:
        raise ValueError(
            f'{type(model).__name__} has no DGMS layer, so there is no '
            'mixture to plot; build the model from a DGMS config and load a '
            'DGMS checkpoint')
    uninitialised = [n for n, m in layers.items() if not m.mixture.initialized]
    if uninitialised:
        raise ValueError(
            f'{len(uninitialised)} DGMS layers (e.g. {uninitialised[0]}) have '
            'no initialised mixture: the loaded checkpoint is not a '
            'checkpoint of a DGMS run')
    if not isinstance(cols, int) or cols < 1:
        raise ValueError(f'cols must be a positive integer, got {cols!r}')
    if before_weights is not None:
        _check_before_weights(layers, before_weights)

    cols = min(cols, len(layers))
    rows = math.ceil(len(layers) / cols)
    # Fixed margins: constrained layout takes longer than the drawing itself
    # on grids of 50 and more panels.
    width, height = 3.2 * cols, 2.4 * rows + 0.6
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(
        rows, cols, squeeze=False,
        gridspec_kw=dict(left=0.3 / width, right=1 - 0.15 / width,
                         bottom=0.3 / height, top=1 - 0.9 / height,
                         hspace=0.55, wspace=0.25)).reshape(-1)
    for ax, (name, layer) in zip(axes, layers.items()):
        before = None if before_weights is None else before_weights[name]
        _draw_layer(ax, name, layer, before, bins)
    for ax in axes[len(layers):]:
        ax.remove()
    figure.legend(handles=_legend_handles(before_weights is not None),
                  loc='upper center', ncols=5, fontsize=8, frameon=False)
    figure.savefig(out_file, format='png')
    return MixtureFigureLayout(rows, cols, list(layers))


def _legend_handles(with_before: bool) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = [Patch(color='0.75', label='weights (histogram)')]
    if with_before:
        handles.append(
            Patch(fill=False, edgecolor='tab:orange', label='weights before'))
    handles += [
        Line2D([], [], color='tab:red', lw=0.8,
               label='component 0 (pruned, mean 0)'),
        Line2D([], [], color='tab:blue', lw=0.8,
               label='components 1..K-1, pi_k N(w | mu_k, sigma_k)'),
        Line2D([], [], color='k', lw=0.5, ls=':', label='codebook values'),
    ]
    return handles


def _check_before_weights(layers: dict, before: Dict[str, Tensor]) -> None:
    for name, layer in layers.items():
        weight = before.get(name)
        if weight is None:
            raise ValueError(f'the weights to compare with have no {name}. '
                             'Give a checkpoint of the same detector')
        if tuple(weight.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f'{name} has shape {tuple(weight.shape)} in the weights to '
                f'compare with, {tuple(layer.weight.shape)} in the model')


@torch.no_grad()
def _draw_layer(ax, name: str, layer: nn.Module, before: Optional[Tensor],
                bins: int) -> None:
    weights = layer.weight.detach().float().reshape(-1).cpu()
    indices, codebook = layer.mixture.quantize(layer.weight)
    sparsity = float((indices == 0).float().mean())

    values = [weights] if before is None else [
        weights, before.detach().float().reshape(-1).cpu()
    ]
    low = min(float(v.min()) for v in values)
    high = max(float(v.max()) for v in values)
    span = max(high - low, 1e-12)
    low, high = low - 0.05 * span, high + 0.05 * span
    edges = np.linspace(low, high, bins + 1)

    # np.histogram with stairs draws one artist per histogram, where
    # Axes.hist draws one patch per bin.
    heights, _ = np.histogram(weights.numpy(), bins=edges, density=True)
    ax.stairs(heights, edges, fill=True, color='0.75')
    if before is not None:
        before_heights, _ = np.histogram(values[1].numpy(), bins=edges,
                                         density=True)
        ax.stairs(before_heights, edges, color='tab:orange')
    grid = torch.linspace(low, high, 400, dtype=torch.float64)
    densities = component_densities(layer.mixture, grid).cpu().numpy()
    for k, density in enumerate(densities):
        ax.plot(grid.numpy(), density, lw=0.8,
                color='tab:red' if k == 0 else 'tab:blue')
    for value in codebook.cpu().numpy():
        ax.axvline(value, color='k', lw=0.5, ls=':')

    # A narrow component can peak far above the histogram. The y range
    # follows the histogram, so such peaks leave the panel.
    ax.set_ylim(0, 1.3 * max(float(heights.max()), 1e-12))
    ax.set_xlim(low, high)
    ax.set_title(f'{name}\n{layer.bits} bits, sparsity {sparsity:.2f}',
                 fontsize=7)
    ax.tick_params(labelsize=6)
