"""Fast 1-D k-means used to initialise a layer's Gaussian mixture."""
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KMeans1D:
    """Result of :func:`kmeans_1d`, every field of shape (k,), centres sorted.

    Attributes:
        centers (Tensor): cluster centres, ascending, float64.
        counts (Tensor): number of values in each cluster, int64.
        sq_dev (Tensor): sum of squared deviations from the centre, float64.
        iterations (int): Lloyd iterations run until the partition was stable.
    """
    centers: Tensor
    counts: Tensor
    sq_dev: Tensor
    iterations: int


def kmeans_1d(values: Tensor, k: int, max_iters: int = 300) -> KMeans1D:
    """Cluster a 1-D set of values into ``k`` clusters with Lloyd's algorithm.

    On sorted data every cluster of an optimal or Lloyd partition is a
    contiguous run. After one sort, the assignment step is therefore a binary
    search of the k - 1 midpoints between centres, and the update step reads
    sums from prefix sums, so each iteration costs O(k log N), not O(k N). Centres
    start at the quantiles (i + 0.5) / k, so the result is deterministic and
    needs no random seed.

    Args:
        values (Tensor): any shape, flattened; must not be empty.
        k (int): number of clusters, at least 1. Clusters may come out empty
            when the values have fewer than ``k`` distinct entries; an empty
            cluster keeps its starting centre and has count 0.
        max_iters (int): upper bound on Lloyd iterations. Default: 300.

    Returns:
        KMeans1D: centres, counts and within-cluster squared deviations.
    """
    if k < 1:
        raise ValueError(f'k must be at least 1, got k={k}')
    data = values.detach().reshape(-1).to(device='cpu', dtype=torch.float64)
    n = data.numel()
    if n == 0:
        raise ValueError('kmeans_1d received an empty tensor')

    data, _ = torch.sort(data)
    zero = torch.zeros(1, dtype=torch.float64)
    prefix = torch.cat([zero, torch.cumsum(data, 0)])
    prefix_sq = torch.cat([zero, torch.cumsum(data * data, 0)])

    quantiles = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    positions = (quantiles * n).long().clamp_(max=n - 1)
    centers = data[positions].clone()

    bounds = None
    iterations = 0
    for iterations in range(1, max_iters + 1):
        mids = 0.5 * (centers[:-1] + centers[1:])
        inner = torch.searchsorted(data, mids)
        new_bounds = torch.cat([torch.zeros(1, dtype=torch.long), inner,
                                torch.full((1, ), n, dtype=torch.long)])
        counts = new_bounds[1:] - new_bounds[:-1]
        sums = prefix[new_bounds[1:]] - prefix[new_bounds[:-1]]
        filled = counts > 0
        centers = torch.where(filled, sums / counts.clamp(min=1), centers)
        # Keep centres sorted so the midpoints stay valid boundaries.
        centers, _ = torch.sort(centers)
        if bounds is not None and torch.equal(new_bounds, bounds):
            break
        bounds = new_bounds

    counts = bounds[1:] - bounds[:-1]
    sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
    sums_sq = prefix_sq[bounds[1:]] - prefix_sq[bounds[:-1]]
    # sum (x - c)^2 = sum x^2 - 2 c sum x + n c^2
    sq_dev = (sums_sq - 2.0 * centers * sums + counts * centers * centers)
    return KMeans1D(centers=centers, counts=counts,
                    sq_dev=sq_dev.clamp(min=0.0), iterations=iterations)
