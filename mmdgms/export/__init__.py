"""Deployment export of DGMS detectors (hard weights as plain floats)."""
from .onnx_export import (ATOL, RTOL, ExportReport, TensorGraph,
                          decode_hard_weights, export_onnx, preprocess_image,
                          preprocessing_metadata, verify_onnx)

__all__ = [
    'ATOL', 'RTOL', 'ExportReport', 'TensorGraph', 'decode_hard_weights',
    'export_onnx', 'preprocess_image', 'preprocessing_metadata',
    'verify_onnx'
]
