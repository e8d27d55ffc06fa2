"""mmdgms: DGMS Gaussian-mixture weight-sharing quantization for MMDetection.

Importing the package (``custom_imports = dict(imports=['mmdgms'])`` in a
config) registers the ``DGMSConv`` conv layer, the ``DGMSDetector`` model builder
and the ``DGMSHook`` hook, and allows MMEngine checkpoints under torch's
weights-only loading (see :mod:`mmdgms.checkpoint`).
"""
from .checkpoint import register_safe_globals
from .convert import DGMSConfig, convert_model, dgms_layers, select_layers
from .hooks import DGMSHook
from .models import build_dgms_detector
from .ops import DGMSConv2d
from .quant import GaussianMixtureQuantizer, kmeans_1d

__version__ = '0.1.0'

register_safe_globals()

__all__ = [
    'DGMSConfig', 'DGMSConv2d', 'DGMSHook', 'GaussianMixtureQuantizer',
    'build_dgms_detector', 'convert_model', 'dgms_layers', 'kmeans_1d',
    'register_safe_globals', 'select_layers'
]
