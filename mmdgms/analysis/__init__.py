from .mixture_plot import (MixtureFigureLayout, component_densities,
                           plot_mixtures)

__all__ = ['MixtureFigureLayout', 'component_densities', 'plot_mixtures']
