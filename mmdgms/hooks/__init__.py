from .dgms_hook import DGMSHook

__all__ = ['DGMSHook']
