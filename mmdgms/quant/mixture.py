"""Per-layer Gaussian-mixture quantizer (DGMS)."""
import math
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from .functional import (FusedSoftWeight, SoftWeight, hard_indices,
                         plain_soft_weights)
from .kmeans import kmeans_1d

MIN_BITS = 1
MAX_BITS = 8

# Values of GaussianMixtureQuantizer.implementation.
IMPLEMENTATIONS = ('fused', 'chunked', 'plain')


def check_bits(bits, name: str = 'bits') -> int:
    """Return ``bits`` as an int, or raise ValueError when it is not 1 to 8."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f'{name} must be an integer from {MIN_BITS} to '
                         f'{MAX_BITS}, got {name}={bits!r}')
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f'{name}={bits} is out of range: DGMS supports {MIN_BITS} to '
            f'{MAX_BITS} bits per weight (2 to 256 mixture components); '
            f'set {name} to a value in that range, e.g. 4')
    return bits


class GaussianMixtureQuantizer(nn.Module):
    """Learned Gaussian mixture whose means are a layer's weight codebook.

    The mixture has K = 2 ** bits components. Component 0 has its mean fixed
    at 0 (weights assigned to it are pruned); components 1..K-1 have learned
    means. Standard deviations, mixing coefficients and the temperature are
    stored in unconstrained form (logarithms and logits) and mapped into
    their valid ranges in :meth:`mixture_terms`, so no optimizer step can
    leave those ranges:

    - sigma_k = max(exp(log_stds_k), min_std) > 0,
    - pi = softmax(mix_logits), positive and summing to 1,
    - tau = max(exp(log_temperature), min_temperature) > 0.

    Args:
        bits (int): bits per weight, 1 to 8. Default: 4.
        init_temperature (float): temperature tau before training.
            Default: 0.01.
        learn_temperature (bool): train tau with the other mixture parameters
            (True) or keep it fixed (False, stored as a buffer).
            Default: True.
        min_std (float): lower bound on every standard deviation.
            Default: 1e-6.
        min_temperature (float): lower bound on tau. Default: 1e-4.
    """

    def __init__(self,
                 bits: int = 4,
                 init_temperature: float = 0.01,
                 learn_temperature: bool = True,
                 min_std: float = 1e-6,
                 min_temperature: float = 1e-4):
        super().__init__()
        self.bits = check_bits(bits)
        self.num_components = 2**self.bits
        if not (isinstance(min_std, (int, float)) and min_std > 0):
            raise ValueError(f'min_std must be positive, got {min_std!r}')
        if not (isinstance(min_temperature, (int, float))
                and min_temperature > 0):
            raise ValueError('min_temperature must be positive, got '
                             f'{min_temperature!r}')
        if not (isinstance(init_temperature, (int, float))
                and init_temperature >= min_temperature):
            raise ValueError(
                f'init_temperature must be at least min_temperature='
                f'{min_temperature}, got {init_temperature!r}')
        self.implementation = 'fused'
        self.min_std = float(min_std)
        self.min_temperature = float(min_temperature)
        self.learn_temperature = bool(learn_temperature)

        k = self.num_components
        self.means = nn.Parameter(torch.linspace(-1.0, 1.0, k)[1:].clone())
        self.log_stds = nn.Parameter(torch.zeros(k))
        self.mix_logits = nn.Parameter(torch.zeros(k))
        log_tau = torch.tensor(math.log(init_temperature))
        if self.learn_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer('log_temperature', log_tau)
        # Number of components this mixture was initialised with; 0 before
        # initialisation. A checkpoint saved at another bit width cannot load
        # its mixture into this one, so it leaves the value unequal to K and
        # the mixture is initialised again instead of being used half-loaded.
        self.register_buffer('init_components',
                             torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        own_keys = [prefix + name for name, _ in self.named_parameters()]
        own_keys += [prefix + name for name, _ in self.named_buffers()]
        if not any(key in state_dict for key in own_keys):
            # A full-precision checkpoint has no mixture at all: that is the
            # normal input of DGMS fine-tuning, not a missing entry. The
            # mixture stays uninitialised (init_components == 0), so it is
            # initialised from the loaded weights or reported as missing
            # before it is used.
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def initialized(self) -> bool:
        return int(self.init_components) == self.num_components

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp().clamp(min=self.min_temperature)

    def codebook(self) -> Tensor:
        """Return the K means (mu_0 = 0 first) as one tensor."""
        return torch.cat([self.means.new_zeros(1), self.means])

    def mixture_terms(self) -> Tuple[Tensor, Tensor, Tensor]:
        """Return (means, log pi - log sigma, 1 / (2 sigma^2)), each (K,)."""
        log_stds = self.log_stds.clamp(min=math.log(self.min_std))
        log_pi = torch.log_softmax(self.mix_logits, dim=0)
        log_coef = log_pi - log_stds
        inv_two_var = 0.5 * torch.exp(-2.0 * log_stds)
        return self.codebook(), log_coef, inv_two_var

    def check_initialized(self, owner: str = 'layer') -> None:
        if not self.initialized:
            raise RuntimeError(
                f'the Gaussian mixture of {owner} is not initialised. Call '
                'init_from_weights() on it, or train with DGMSHook, which '
                'initialises every mixture from the loaded full-precision '
                'weights before the first iteration')

    def soft_weights(self, weight: Tensor) -> Tensor:
        """Return the training weights sum_k r_k(w) mu_k, shaped like
        ``weight``; gradients reach the weights and every mixture parameter.

        ``self.implementation`` selects how:

        - 'fused' (default): the compiled CPU kernels
          (:class:`~mmdgms.quant.functional.FusedSoftWeight`) for CPU
          tensors. Tensors on other devices use the 'chunked' path, which is
          the only implementation for them;
        - 'chunked': chunked torch operations, on any device;
        - 'plain': plain autograd, the memory-hungry reference used by tests
          and tools/benchmark_dgms.py.

        Raises:
            ValueError: for any other ``implementation``.
            RuntimeError: for 'fused' on CPU when the kernels are not built.
        """
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f'implementation={self.implementation!r} is not one of '
                f'{IMPLEMENTATIONS}; use \'fused\' for training on CPU')
        means, log_coef, inv_two_var = self.mixture_terms()
        flat = weight.reshape(-1)
        if self.implementation == 'plain':
            function = plain_soft_weights
        elif self.implementation == 'fused' and flat.device.type == 'cpu':
            function = FusedSoftWeight.apply
        else:
            function = SoftWeight.apply
        out = function(flat, means, log_coef, inv_two_var, self.temperature)
        return out.view_as(weight)

    @torch.no_grad()
    def quantize(self, weight: Tensor) -> Tuple[Tensor, Tensor]:
        """Return (indices, codebook): the hard assignment of every weight.

        ``indices`` is uint8 shaped like ``weight`` with values in [0, K);
        ``codebook`` contains the K means with codebook[0] = 0, so
        ``codebook[indices.long()]`` is the hard weight tensor.
        """
        means, log_coef, inv_two_var = self.mixture_terms()
        idx = hard_indices(weight.reshape(-1), means, log_coef, inv_two_var)
        return idx.to(torch.uint8).view(weight.shape), means.detach().clone()

    @torch.no_grad()
    def hard_weights(self, weight: Tensor) -> Tensor:
        """Return mu_{argmax_k g_k(w)} for every weight (no gradient)."""
        indices, codebook = self.quantize(weight)
        return codebook[indices.long()]

    @torch.no_grad()
    def init_from_weights(self, weight: Tensor) -> Dict[str, float]:
        """Fit the mixture to ``weight`` with 1-D k-means.

        The cluster centre nearest to zero becomes component 0 (mean set to
        exactly 0); the others become components 1..K-1 in ascending order.
        pi comes from the cluster sizes, sigma from each cluster's root mean
        squared deviation around its component mean (around 0 for
        component 0). Empty or single-valued clusters get a small positive
        count and a standard deviation of 1 % of the layer's weight spread,
        so no component starts with pi = 0 or sigma = 0. The temperature is
        left unchanged.

        Returns:
            dict: ``iterations`` of k-means and the initial ``sparsity``
            (fraction of weights in component 0).
        """
        k = self.num_components
        flat = weight.detach().reshape(-1).double().cpu()
        result = kmeans_1d(flat, k)
        centers, counts = result.centers, result.counts.double()

        zero_idx = int(torch.argmin(centers.abs()))
        order = [zero_idx] + [i for i in range(k) if i != zero_idx]
        centers = centers[order]
        counts = counts[order]
        sq_dev = result.sq_dev[order]
        # Component 0 moves to mean 0: re-measure its spread around 0.
        # sum (x - 0)^2 = sum (x - c)^2 + n c^2.
        sq_dev[0] = sq_dev[0] + counts[0] * centers[0]**2
        centers[0] = 0.0

        spread = float(flat.std()) if flat.numel() > 1 else 0.0
        floor = max(0.01 * spread, self.min_std)
        stds = torch.sqrt(sq_dev / counts.clamp(min=1.0)).clamp(min=floor)
        pis = (counts + 0.5) / (counts.sum() + 0.5 * k)

        dtype, device = self.means.dtype, self.means.device
        self.means.copy_(centers[1:].to(dtype=dtype, device=device))
        self.log_stds.copy_(stds.log().to(dtype=dtype, device=device))
        self.mix_logits.copy_(pis.log().to(dtype=dtype, device=device))
        self.init_components.fill_(k)
        return dict(iterations=result.iterations,
                    sparsity=float(counts[0] / counts.sum()))

    def extra_repr(self) -> str:
        return (f'bits={self.bits}, components={self.num_components}, '
                f'learn_temperature={self.learn_temperature}')
