"""Packed DGMS detectors: the file the mobile runtime loads.

``pack_checkpoint`` writes a packed file from a DGMS config and checkpoint;
``read_packed`` parses and validates one; ``load_packed_detector`` turns it
back into an MMDetection detector. The format is specified in
docs/packed-format.md.
"""
from .container import PackedFormatError
from .graph import UnsupportedModelError
from .packer import (PackError, PackResult, build_packed_detector,
                     load_dgms_detector, load_packed_detector,
                     pack_checkpoint)
from .reader import PackedModel, read_packed

__all__ = [
    'PackError', 'PackResult', 'PackedFormatError', 'PackedModel',
    'UnsupportedModelError', 'build_packed_detector', 'load_dgms_detector',
    'load_packed_detector', 'pack_checkpoint', 'read_packed'
]
