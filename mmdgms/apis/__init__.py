"""Inference-side entry points: checked model loading, export, analysis."""
from .checkpoint_match import (CheckpointMismatchError, CheckpointSummary,
                               check_checkpoint_matches, config_has_dgms_hook,
                               read_checkpoint_summary)
from .inference import init_detector, load_config

__all__ = [
    'CheckpointMismatchError', 'CheckpointSummary', 'check_checkpoint_matches',
    'config_has_dgms_hook', 'init_detector', 'load_config',
    'read_checkpoint_summary'
]
