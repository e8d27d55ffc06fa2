"""Gaussian-mixture soft and hard weights, computed in bounded memory.

Notation (per quantized layer, K components, component 0 is the pruning
component with mean 0):

    l_k(w) = log pi_k - log sigma_k - (w - mu_k)^2 / (2 sigma_k^2)
    g_k(w) = softmax_k(l_k(w))            mixture responsibility
    r_k(w) = softmax_k(g_k(w) / tau)      differentiable indicator
    w_soft = sum_k r_k(w) mu_k
    w_hard = mu_{argmax_k l_k(w)}

The constant -log(2 pi) / 2 of the Gaussian log-density cancels in the
softmax and is left out. ``g`` is the normalised responsibility of the
published method, so ``r = softmax(g / tau)`` is the published indicator.
Here ``g`` is a max-shifted softmax of log-densities instead of a ratio of
densities ``pi_k N(w | mu_k, sigma_k)``. Both give the same values wherever
the density form is finite. The log form also stays finite where densities
underflow to 0 (a weight far from every component) or overflow (a collapsed
standard deviation).

A plain autograd implementation keeps several K x N intermediates per layer
for the backward pass. Two memory-bounded implementations keep no K x N
tensor between forward and backward and recompute the responsibilities in
the backward pass, where the gradients have closed forms (derived in
:meth:`SoftWeight.backward`):

- :class:`FusedSoftWeight` (CPU) calls the compiled kernels of
  ``csrc/soft_weight.cpp``, which compute everything per block of 256
  weights in one vectorised loop nest;
- :class:`SoftWeight` (any device) walks the weights in chunks with torch
  operations.
"""
import torch
from torch import Tensor

# Soft weights of weights deep inside the zero component come out as
# sum_k r_k mu_k with r_k ~ exp(-1/tau): subnormal floats, which slow x86
# convolution kernels down several times. Values below the smallest normal
# float32 are set to exactly 0, a change of less than 1.2e-38 per weight.
SMALLEST_NORMAL = torch.finfo(torch.float32).tiny

# Elements (weights x components) processed per chunk: about 4 MiB of float32
# per K x chunk temporary, small enough to stay in a CPU's cache.
CHUNK_ELEMENTS = 1 << 20


# Softmax entries more than this far below their row maximum are set to
# exactly 0 instead of exp(x - max) < 9.4e-14. That changes no probability by
# more than K * 9.4e-14, far below float32 rounding (6e-8), and it keeps the
# products of probabilities in the backward pass far from the subnormal
# range (below 1.2e-38).
SOFTMAX_FLOOR = -30.0

# The floor for float64, where exp(-30) would be the largest error: with
# tau = 1e-4 the dropped terms, amplified by 1 / tau and 1 / sigma^2, moved
# the temperature gradient by 2e-4 relative. exp(-80) = 1.8e-35, and
# products of up to eight such terms stay normal float64 (above 2.2e-308).
SOFTMAX_FLOOR_FLOAT64 = -80.0


def softmax_floor(dtype: torch.dtype) -> float:
    """Return the softmax floor used for ``dtype``."""
    return SOFTMAX_FLOOR_FLOAT64 if dtype == torch.float64 else SOFTMAX_FLOOR


def _chunk_length(num_components: int) -> int:
    return max(1, CHUNK_ELEMENTS // num_components)


def softmax_rows(x: Tensor) -> Tensor:
    """Softmax over dim 1 whose entries are 0 or at least
    exp(softmax_floor(x.dtype)).

    Subnormal operands take a slow microcode path on x86 CPUs, and a
    tempered softmax with tau = 0.01 produces them, or products of them,
    for most weights. ``x`` is overwritten.
    """
    x = x.sub_(x.max(dim=1, keepdim=True).values)
    floor = softmax_floor(x.dtype)
    x = x.masked_fill_(x < floor, float('-inf')).exp_()
    return x.div_(x.sum(dim=1, keepdim=True))


def component_logits(w: Tensor, means: Tensor, log_coef: Tensor,
                     inv_two_var: Tensor) -> Tensor:
    """Return l_k(w) for a 1-D chunk ``w``: shape (len(w), K).

    Args:
        w (Tensor): weights, shape (C,).
        means (Tensor): component means mu_k, shape (K,).
        log_coef (Tensor): log pi_k - log sigma_k, shape (K,).
        inv_two_var (Tensor): 1 / (2 sigma_k^2), shape (K,).
    """
    diff = w[:, None] - means[None, :]
    return log_coef[None, :] - inv_two_var[None, :] * diff * diff


class SoftWeight(torch.autograd.Function):
    """w_soft = sum_k softmax_k(g_k(w) / tau) mu_k with chunked recompute.

    Inputs are the flattened latent weights and the per-component tensors
    that :func:`mixture_terms` derives from the mixture parameters, so
    autograd chains the gradients on to the parameters themselves.
    """

    @staticmethod
    def forward(ctx, w: Tensor, means: Tensor, log_coef: Tensor,
                inv_two_var: Tensor, temperature: Tensor) -> Tensor:
        out = torch.empty_like(w)
        step = _chunk_length(means.numel())
        inv_tau = 1.0 / temperature

        for start in range(0, w.numel(), step):
            chunk = w[start:start + step]
            resp = softmax_rows(
                component_logits(chunk, means, log_coef, inv_two_var))
            indicator = softmax_rows(resp * inv_tau)
            out[start:start + step] = indicator @ means

        out.masked_fill_(out.abs() < SMALLEST_NORMAL, 0.0)
        ctx.save_for_backward(w, means, log_coef, inv_two_var, temperature)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # With y = sum_k r_k mu_k, z = g / tau, r = softmax(z), g = softmax(l):
        #   dL/dz_k  = dy r_k (mu_k - y)
        #   dL/dg_k  = dL/dz_k / tau,       dL/dtau = -sum_k dL/dz_k g_k / tau^2
        #   dL/dl_k  = g_k (dL/dg_k - sum_j g_j dL/dg_j)
        #   l_k = c_k - a_k (w - mu_k)^2 with c = log pi - log sigma and
        #   a = 1 / (2 sigma^2), so
        #   dL/dc_k  = dL/dl_k
        #   dL/da_k  = -dL/dl_k (w - mu_k)^2
        #   dL/dmu_k = dL/dl_k 2 a_k (w - mu_k) + dy r_k
        #   dL/dw    = -sum_k dL/dl_k 2 a_k (w - mu_k)
        w, means, log_coef, inv_two_var, temperature = ctx.saved_tensors
        step = _chunk_length(means.numel())
        inv_tau = 1.0 / temperature
        two_a = 2.0 * inv_two_var
        need_w = ctx.needs_input_grad[0]

        # The loop accumulates G = tau * dL/dl, which saves one K x chunk
        # multiplication per chunk; the K-sized sums are scaled at the end.
        grad_w = torch.empty_like(w) if need_w else None
        direct_means = torch.zeros_like(means)  # sum dy r_k
        sum_g = torch.zeros_like(log_coef)  # sum G_k
        sum_g_sq = torch.zeros_like(inv_two_var)  # sum G_k (w - mu_k)^2
        sum_g_diff = torch.zeros_like(means)  # sum G_k (w - mu_k)
        grad_inv_tau = torch.zeros_like(temperature)

        for start in range(0, w.numel(), step):
            chunk = w[start:start + step]
            dy = grad_out[start:start + step, None]
            diff = chunk[:, None] - means[None, :]
            sq = diff * diff
            resp = softmax_rows(log_coef - inv_two_var * sq)
            indicator = softmax_rows(resp * inv_tau)
            soft = indicator @ means

            direct_means += dy[:, 0] @ indicator
            grad_z = indicator.mul_(dy).mul_(means[None, :] - soft[:, None])
            row_dot = (resp * grad_z).sum(dim=1, keepdim=True)
            grad_inv_tau += row_dot.sum()
            g_scaled = grad_z.sub_(row_dot).mul_(resp)

            sum_g += g_scaled.sum(dim=0)
            sum_g_sq += (g_scaled * sq).sum(dim=0)
            g_diff = diff.mul_(g_scaled)
            sum_g_diff += g_diff.sum(dim=0)
            if need_w:
                grad_w[start:start + step] = (g_diff @ two_a).mul_(-inv_tau)

        grad_log_coef = sum_g * inv_tau
        grad_inv_two_var = -sum_g_sq * inv_tau
        grad_means = sum_g_diff * two_a * inv_tau + direct_means
        # tau enters only through 1 / tau: dL/dtau = -dL/d(1/tau) / tau^2.
        grad_temperature = -grad_inv_tau * inv_tau * inv_tau
        return (grad_w, grad_means, grad_log_coef, grad_inv_two_var,
                grad_temperature)


def load_fused_kernels():
    """Return the compiled module ``mmdgms.quant._fused``.

    Raises:
        RuntimeError: when the extension was not built, with the command
            that builds it.
    """
    try:
        from . import _fused
    except ImportError as error:
        raise RuntimeError(
            'the fused DGMS kernels (mmdgms.quant._fused) are not built or '
            f'failed to load: {error}. Build them with `pip install '
            '--no-build-isolation -e .` (tools/setup_env.sh does this) or '
            '`python setup.py build_ext --inplace` in the repository root, '
            "or set the mixture's implementation to 'chunked' (several "
            'times slower)') from error
    return _fused


def mixture_gradients(sums: Tensor, means: Tensor, inv_two_var: Tensor,
                      inv_tau: float):
    """Turn the per-component sums of the fused backward into gradients.

    ``sums`` contains, over all weights, sum G_k, sum G_k (w - mu_k)^2,
    sum G_k (w - mu_k), sum dy r_k (K each) and sum_w row_dot (1), where
    G = tau dL/dl and row_dot = sum_k g_k dL/dz_k (see
    :meth:`SoftWeight.backward` for the formulas).

    Returns:
        tuple: gradients of (means, log_coef, inv_two_var, temperature).
    """
    k = means.numel()
    sums = sums.to(means.dtype)
    sum_g, sum_g_sq, sum_g_diff, direct_means = sums[:4 * k].view(4, k)
    grad_log_coef = sum_g * inv_tau
    grad_inv_two_var = -sum_g_sq * inv_tau
    grad_means = sum_g_diff * (2.0 * inv_two_var) * inv_tau + direct_means
    grad_temperature = -sums[4 * k] * inv_tau * inv_tau
    return grad_means, grad_log_coef, grad_inv_two_var, grad_temperature


class FusedSoftWeight(torch.autograd.Function):
    """The values and gradients of :class:`SoftWeight`, from CPU kernels.

    Takes the same inputs as :class:`SoftWeight`, and optionally ``isa``:
    the instruction set of the float32 kernels ('avx512', 'avx2',
    'baseline'; '' picks the best one this CPU has, and float64 always uses
    'baseline'). The forward pass keeps only its inputs for the backward
    pass, no N-sized or K x N tensor, so the backward pass recomputes the
    responsibilities block by block.
    """

    @staticmethod
    def forward(ctx, w: Tensor, means: Tensor, log_coef: Tensor,
                inv_two_var: Tensor, temperature: Tensor,
                isa: str = '') -> Tensor:
        kernels = load_fused_kernels()
        inv_tau = 1.0 / float(temperature)
        terms = [t.detach().contiguous() for t in (means, log_coef,
                                                     inv_two_var)]
        w = w.detach().contiguous()
        ctx.save_for_backward(w, *terms)
        ctx.inv_tau = inv_tau
        ctx.isa = isa
        # Named ranges, so torch.profiler (and tools/benchmark_dgms.py
        # --profile) can tell the quantizer's time apart.
        with torch.profiler.record_function('dgms_soft_weight_forward'):
            return kernels.soft_weight_forward(w, *terms, inv_tau,
                                               softmax_floor(w.dtype), isa)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        w, means, log_coef, inv_two_var = ctx.saved_tensors
        need_w = ctx.needs_input_grad[0]
        with torch.profiler.record_function('dgms_soft_weight_backward'):
            grad_w, sums = load_fused_kernels().soft_weight_backward(
                w, grad_out.contiguous(), means, log_coef, inv_two_var,
                ctx.inv_tau, softmax_floor(w.dtype), need_w, ctx.isa)
        grads = mixture_gradients(sums, means, inv_two_var, ctx.inv_tau)
        return (grad_w if need_w else None, ) + grads + (None, )


def plain_soft_weights(w: Tensor, means: Tensor, log_coef: Tensor,
                       inv_two_var: Tensor, temperature: Tensor) -> Tensor:
    """Return the same values as :class:`SoftWeight` with plain autograd.

    Autograd keeps the K x N intermediates of every step for the backward
    pass, which costs several times the memory and time of the chunked
    function. Kept as the reference for benchmarks and tests.
    """
    logits = component_logits(w, means, log_coef, inv_two_var)
    resp = torch.softmax(logits, dim=1)
    indicator = torch.softmax(resp / temperature, dim=1)
    return indicator @ means


@torch.no_grad()
def hard_indices(w: Tensor, means: Tensor, log_coef: Tensor,
                 inv_two_var: Tensor) -> Tensor:
    """Return argmax_k l_k(w) for flattened weights, as int64 of shape (N,).

    The argmax of l equals the argmax of g and of r for any temperature, so
    the hard assignment does not depend on tau. CPU tensors go through the
    fused kernel, other devices through chunked torch operations; both
    resolve ties to the lowest index.
    """
    if w.device.type == 'cpu':
        return load_fused_kernels().hard_indices(
            w.contiguous(), means.contiguous(), log_coef.contiguous(),
            inv_two_var.contiguous())
    out = torch.empty(w.numel(), dtype=torch.long, device=w.device)
    step = _chunk_length(means.numel())
    for start in range(0, w.numel(), step):
        logits = component_logits(w[start:start + step], means, log_coef,
                                  inv_two_var)
        out[start:start + step] = logits.argmax(dim=1)
    return out
