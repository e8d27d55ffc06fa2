from .dgms_conv import DGMSConv2d, convertible_conv_types

__all__ = ['DGMSConv2d', 'convertible_conv_types']
