from .dgms_conv import (DGMSConv2d, convertible_conv_types, hard_weight_cache,
                        set_hard_weight_cache)

__all__ = [
    'DGMSConv2d', 'convertible_conv_types', 'hard_weight_cache',
    'set_hard_weight_cache'
]
