from .functional import FusedSoftWeight, SoftWeight, hard_indices
from .kmeans import KMeans1D, kmeans_1d
from .mixture import (IMPLEMENTATIONS, MAX_BITS, MIN_BITS,
                      GaussianMixtureQuantizer, check_bits)

__all__ = [
    'FusedSoftWeight', 'GaussianMixtureQuantizer', 'IMPLEMENTATIONS',
    'KMeans1D', 'MAX_BITS', 'MIN_BITS', 'SoftWeight', 'check_bits',
    'hard_indices', 'kmeans_1d'
]
