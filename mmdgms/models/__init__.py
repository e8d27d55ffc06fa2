from .dgms_detector import build_dgms_detector

__all__ = ['build_dgms_detector']
