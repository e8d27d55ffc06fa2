"""Tests for the Gaussian-mixture quantizer, its 1-D k-means and DGMSConv2d.

The soft weights are checked against a plain autograd re-derivation of the
DGMS formulas, written in this file: densities
pi_k N(w | mu_k, sigma_k), normalised into responsibilities g, the indicator
r = softmax(g / tau) and the soft weight sum_k r_k mu_k, all in float64.
Where densities underflow or overflow (collapsed components), the reference
is ``plain_soft_weights``, the log-domain formulation with plain autograd,
also in float64. The default implementation is the fused CPU kernel; its
float32 variants (one per instruction set) are checked against the float64
reference as well.
"""
import copy
import itertools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmdgms
from mmdgms.ops import DGMSConv2d, hard_weight_cache
from mmdgms.quant import (FusedSoftWeight, GaussianMixtureQuantizer,
                          SoftWeight, kmeans_1d)
from mmdgms.quant.functional import (SMALLEST_NORMAL, SOFTMAX_FLOOR,
                                     component_logits, load_fused_kernels,
                                     plain_soft_weights, softmax_floor)

ALL_BITS = list(range(1, 9))
TEMPERATURES = [1e-3, 1e-2, 1.0, 10.0]
PARAMETER_NAMES = ['means', 'log_stds', 'mix_logits', 'log_temperature']
GRAD_RTOL = 1e-4


def make_weights(num, seed, std=0.05, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(num, generator=generator, dtype=torch.float64) *
            std).to(dtype)


def fitted_mixture(bits, weights, temperature, dtype=torch.float64,
                   **kwargs):
    """Build a mixture, fit it to ``weights`` and set tau to ``temperature``."""
    mixture = GaussianMixtureQuantizer(bits=bits, **kwargs).to(dtype)
    mixture.init_from_weights(weights)
    with torch.no_grad():
        mixture.log_temperature.fill_(math.log(temperature))
    return mixture


def reference_terms(mixture):
    """Return (mu, sigma, pi, tau) computed from the raw parameters."""
    mu = mixture.codebook()
    sigma = mixture.log_stds.exp().clamp(min=mixture.min_std)
    pi = torch.softmax(mixture.mix_logits, dim=0)
    tau = mixture.log_temperature.exp().clamp(min=mixture.min_temperature)
    return mu, sigma, pi, tau


def reference_densities(weights, mixture):
    """Return pi_k N(w | mu_k, sigma_k), shape (N, K), from the density."""
    mu, sigma, pi, _ = reference_terms(mixture)
    diff = weights[:, None] - mu[None, :]
    gauss = torch.exp(-diff**2 / (2 * sigma**2)) / (sigma *
                                                      math.sqrt(2 * math.pi))
    return pi * gauss


def reference_responsibilities(weights, mixture):
    densities = reference_densities(weights, mixture)
    return densities / densities.sum(dim=1, keepdim=True)


def reference_soft_weights(weights, mixture):
    mu, _, _, tau = reference_terms(mixture)
    indicator = torch.softmax(
        reference_responsibilities(weights, mixture) / tau, dim=1)
    return indicator @ mu


def library_responsibilities(weights, mixture):
    return torch.softmax(
        component_logits(weights, *mixture.mixture_terms()), dim=1)


def relative_error(actual, expected):
    return float((actual - expected).norm() / expected.norm())


def soft_weights_and_grads(compute, weights, mixture, upstream):
    """Run ``compute`` and return (output, grads of output . upstream)."""
    weights = weights.detach().clone().requires_grad_()
    output = compute(weights, mixture)
    inputs = [weights] + [getattr(mixture, name) for name in PARAMETER_NAMES]
    grads = torch.autograd.grad((output * upstream).sum(), inputs)
    return output.detach(), dict(zip(['weights'] + PARAMETER_NAMES, grads))


def library_soft_weights(weights, mixture):
    return mixture.soft_weights(weights)


def assert_all_finite(tensor, description):
    assert torch.isfinite(tensor).all(), (
        f'{description} has NaN or inf: {tensor}')


# Soft weights against the plain re-derivation.


def clipping_bound(mixture) -> float:
    """Return the largest deviation the library allows itself on purpose.

    Its softmaxes set entries more than -floor below the row maximum to 0
    (floor = softmax_floor(dtype)), which moves each probability by at most
    K * exp(floor). Through g / tau that reaches the soft weight amplified by
    at most 1 / tau. Values below the smallest normal float32 are also
    flushed to 0.
    """
    k = mixture.num_components
    floor = softmax_floor(mixture.means.dtype)
    scale = float(mixture.codebook().detach().abs().max())
    amplification = 2.0 + 2.0 / float(mixture.temperature.detach())
    return (amplification * k * math.exp(floor) * scale + SMALLEST_NORMAL)


@pytest.mark.parametrize('temperature', TEMPERATURES)
@pytest.mark.parametrize('bits', ALL_BITS)
def test_soft_weights_match_reference_float64(bits, temperature):
    weights = make_weights(1500, seed=bits)
    mixture = fitted_mixture(bits, weights, temperature)
    upstream = make_weights(1500, seed=100 + bits, std=1.0)

    expected, expected_grads = soft_weights_and_grads(
        reference_soft_weights, weights, mixture, upstream)
    actual, actual_grads = soft_weights_and_grads(library_soft_weights,
                                                  weights, mixture, upstream)

    assert_all_finite(expected, 'reference soft weights')
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=1e-5,
                               atol=clipping_bound(mixture))
    for name, expected_grad in expected_grads.items():
        assert_all_finite(expected_grad, f'reference gradient of {name}')
        assert expected_grad.norm() > 0, f'zero reference gradient of {name}'
        error = relative_error(actual_grads[name], expected_grad)
        assert error < GRAD_RTOL, f'gradient of {name}: relative error {error}'


@pytest.mark.parametrize('temperature', TEMPERATURES)
@pytest.mark.parametrize('bits', ALL_BITS)
def test_soft_weights_float32_close_to_reference(bits, temperature):
    weights = make_weights(1500, seed=bits)
    mixture64 = fitted_mixture(bits, weights, temperature)
    mixture32 = fitted_mixture(bits, weights, temperature)
    mixture32.load_state_dict(mixture64.state_dict())
    mixture32.float()
    upstream = make_weights(1500, seed=100 + bits, std=1.0)

    expected, expected_grads = soft_weights_and_grads(
        reference_soft_weights, weights, mixture64, upstream)
    actual, actual_grads = soft_weights_and_grads(library_soft_weights,
                                                  weights.float(), mixture32,
                                                  upstream.float())

    assert actual.dtype == torch.float32
    scale = float(mixture64.codebook().detach().abs().max())
    torch.testing.assert_close(actual.double(), expected, rtol=0,
                               atol=1e-4 * scale)
    # g / tau amplifies float32 rounding of g by 1 / tau, so the gradients
    # are compared at 1e-4 only where tau >= 1.
    if temperature >= 1.0:
        for name, expected_grad in expected_grads.items():
            error = relative_error(actual_grads[name].double(), expected_grad)
            assert error < GRAD_RTOL, (
                f'gradient of {name}: relative error {error}')


@pytest.mark.parametrize('temperature', [1e-2, 1.0])
def test_soft_weights_across_chunks(temperature):
    # With K = 256 one chunk contains 4096 weights, so 9000 weights span three
    # chunks, the last one partial.
    weights = make_weights(9000, seed=7)
    mixture = fitted_mixture(8, weights, temperature)
    upstream = make_weights(9000, seed=8, std=1.0)

    expected, expected_grads = soft_weights_and_grads(
        reference_soft_weights, weights, mixture, upstream)
    actual, actual_grads = soft_weights_and_grads(library_soft_weights,
                                                  weights, mixture, upstream)

    torch.testing.assert_close(actual, expected, rtol=1e-5,
                               atol=clipping_bound(mixture))
    for name, expected_grad in expected_grads.items():
        error = relative_error(actual_grads[name], expected_grad)
        assert error < GRAD_RTOL, f'gradient of {name}: relative error {error}'


def test_soft_weight_function_gradcheck():
    generator = torch.Generator().manual_seed(3)

    def random(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64)
                * scale).requires_grad_()

    weights = random(9, scale=0.5)
    means = random(4, scale=0.5)
    log_coef = random(4)
    inv_two_var = (torch.rand(4, generator=generator, dtype=torch.float64) +
                   0.5).requires_grad_()
    temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(
        SoftWeight.apply,
        (weights, means, log_coef, inv_two_var, temperature))
    assert torch.autograd.gradcheck(
        FusedSoftWeight.apply,
        (weights, means, log_coef, inv_two_var, temperature))


# The fused kernels against the plain formulation.

FUSED_ISAS = load_fused_kernels().available_isas()
# Block tails: one weight, one short of a 256-weight block, one block, one
# over, and several parallel tasks with a partial last block.
KERNEL_SIZES = [1, 255, 256, 257, 40001]


def shifted_plain_soft_weights(w, means, log_coef, inv_two_var,
                               temperature):
    """Return plain_soft_weights as mu_top + sum_k r_k (mu_k - mu_top).

    mu_top is the mean of each weight's most responsible component, so the
    function and its exact gradients are those of plain_soft_weights.
    Written as sum_k r_k mu_k, float64 autograd loses up to 1e-3 relative
    of the gradients at tau = 1e-4 to cancellation in mu_k - y, where r is
    one-hot to within 1e-12 (and 14 % of the temperature gradient, which
    only such weights produce); test_shifted_reference_matches_mpmath
    checks this form against 50-digit arithmetic.
    """
    logits = component_logits(w, means, log_coef, inv_two_var)
    mu_top = means[logits.argmax(dim=1)]
    resp = torch.softmax(logits, dim=1)
    indicator = torch.softmax(resp / temperature, dim=1)
    offsets = means[None, :] - mu_top[:, None]
    return mu_top + (indicator * offsets).sum(dim=1)


def plain_and_fused(weights, mixture, upstream, isa=''):
    """Return (plain, fused) results of soft_weights_and_grads; plain is
    the shifted plain formulation."""

    def plain(w, m):
        return shifted_plain_soft_weights(w, *m.mixture_terms(),
                                          m.temperature)

    def fused(w, m):
        return FusedSoftWeight.apply(w, *m.mixture_terms(), m.temperature,
                                     isa)

    return (soft_weights_and_grads(plain, weights, mixture, upstream),
            soft_weights_and_grads(fused, weights, mixture, upstream))


def assert_matches_plain(plain_result, fused_result, mixture, atol=0.0):
    """Check the forward within 1e-5 relative (plus ``atol`` and the
    deliberate clipping) and every gradient within GRAD_RTOL relative."""
    (expected, expected_grads), (actual, actual_grads) = (plain_result,
                                                          fused_result)
    assert_all_finite(expected, 'plain soft weights')
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5,
                               atol=atol + clipping_bound(mixture))
    for name, expected_grad in expected_grads.items():
        assert_all_finite(expected_grad, f'plain gradient of {name}')
        error = relative_error(actual_grads[name].double(), expected_grad)
        assert error < GRAD_RTOL, (
            f'gradient of {name}: relative error {error}')


def mpmath_soft_weight(mpmath, w, means, log_coef, inv_two_var, tau):
    """Return sum_k r_k mu_k for one weight in mpmath arithmetic."""
    logits = [c - a * (w - mu)**2
              for mu, c, a in zip(means, log_coef, inv_two_var)]
    top = max(logits)
    dens = [mpmath.exp(x - top) for x in logits]
    total = sum(dens)
    exps = [mpmath.exp((d / total - 1 / total) / tau) for d in dens]
    return sum(q * mu for q, mu in zip(exps, means)) / sum(exps)


@pytest.mark.parametrize('compute', ['shifted_plain', 'fused'])
def test_shifted_reference_matches_mpmath(compute):
    # Weights from 1e-7 to 1e-3 away from every decision boundary at
    # tau = 1e-4, where r switches between components within about 1e-5:
    # the hardest case for float64. The gradients span 1e4 down to 1e-258;
    # each one is checked to 1e-9 relative unless it lies 1e30 below the
    # largest (where the softmax floor sets terms to 0). Written as
    # sum_k r_k mu_k, plain_soft_weights misses some by 3e-5 to 0.5.
    import mpmath
    mpmath.mp.dps = 50
    mixture = fitted_mixture(2, make_weights(3000, seed=22), 1e-4)
    terms = [t.detach() for t in mixture.mixture_terms()]
    grid = torch.linspace(-0.2, 0.2, 400001, dtype=torch.float64)
    top = component_logits(grid, *terms).argmax(dim=1)
    edges = grid[1:][top[1:] != top[:-1]]
    assert len(edges) >= 2
    distances = torch.logspace(-7, -3, 13, dtype=torch.float64)
    offsets = torch.cat([-distances, torch.zeros(1, dtype=torch.float64),
                         distances])
    weights = (edges[:, None] + offsets[None, :]).reshape(-1)
    upstream = make_weights(len(weights), seed=23, std=1.0)
    function = dict(shifted_plain=shifted_plain_soft_weights,
                    fused=FusedSoftWeight.apply)[compute]

    def library(w, m):
        return function(w, *m.mixture_terms(), m.temperature)

    actual, grads = soft_weights_and_grads(library, weights, mixture,
                                           upstream)

    means, log_coef, inv_two_var = [[mpmath.mpf(float(x)) for x in t]
                                    for t in terms]
    tau = mpmath.mpf(float(mixture.temperature.detach()))
    expected, expected_grad_w, expected_grad_log_tau = [], [], 0
    for w, dy in zip(weights.tolist(), upstream.tolist()):
        expected.append(float(mpmath_soft_weight(
            mpmath, mpmath.mpf(w), means, log_coef, inv_two_var, tau)))
        expected_grad_w.append(dy * float(mpmath.diff(
            lambda x: mpmath_soft_weight(mpmath, x, means, log_coef,
                                         inv_two_var, tau), mpmath.mpf(w))))
        expected_grad_log_tau += dy * tau * mpmath.diff(
            lambda t: mpmath_soft_weight(mpmath, mpmath.mpf(w), means,
                                         log_coef, inv_two_var, t), tau)

    torch.testing.assert_close(actual, torch.tensor(expected,
                                                    dtype=torch.float64),
                               rtol=1e-9, atol=1e-15)
    expected_grad_w = torch.tensor(expected_grad_w, dtype=torch.float64)
    torch.testing.assert_close(
        grads['weights'], expected_grad_w, rtol=1e-9,
        atol=1e-30 * float(expected_grad_w.abs().max()))
    expected_log_tau = float(expected_grad_log_tau)
    assert grads['log_temperature'].item() == pytest.approx(
        expected_log_tau, rel=1e-9)


@pytest.mark.parametrize('temperature', [1e-4, 1e-3, 1.0, 100.0])
@pytest.mark.parametrize('bits', ALL_BITS)
def test_fused_matches_plain_float64(bits, temperature):
    # tau = 1e-4 is the lowest temperature the mixture allows.
    weights = make_weights(3000, seed=20 + bits)
    mixture = fitted_mixture(bits, weights, temperature)
    upstream = make_weights(3000, seed=40 + bits, std=1.0)

    plain_result, fused_result = plain_and_fused(weights, mixture, upstream)

    assert fused_result[0].dtype == torch.float64
    assert_matches_plain(plain_result, fused_result, mixture)


def collapse_components(mixture, weights):
    """Give components 1 and 2 one mean and component 1 the minimum std.

    Some weights are set exactly to the shared mean, so the collapsed
    component's log-density there is about 14 above every other one.
    """
    with torch.no_grad():
        mixture.means[1] = mixture.means[0]
        mixture.log_stds[1] = math.log(mixture.min_std)
        weights[::50] = mixture.means[0]


@pytest.mark.parametrize('temperature', [1e-4, 1e-2, 1.0, 100.0])
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_fused_matches_plain_collapsed_components(bits, temperature):
    weights = make_weights(2000, seed=60 + bits)
    mixture = fitted_mixture(bits, weights, temperature)
    collapse_components(mixture, weights)
    upstream = make_weights(2000, seed=70 + bits, std=1.0)

    plain_result, fused_result = plain_and_fused(weights, mixture, upstream)

    assert_matches_plain(plain_result, fused_result, mixture)


@pytest.mark.parametrize('size', KERNEL_SIZES)
@pytest.mark.parametrize('isa', FUSED_ISAS)
def test_fused_float32_variants_match_plain_float64(isa, size):
    # The float64 reference gets the same float32-rounded inputs, so only
    # the kernel's float32 arithmetic differs. At tau = 1 its rounding
    # (6e-8 relative per operation) stays far below the tolerances; at lower
    # temperatures g / tau amplifies it by 1 / tau (see
    # test_soft_weights_float32_close_to_reference). sum_k r_k mu_k cancels
    # where weights sit between means of opposite sign, so the forward check
    # also allows 1e-6 of the largest mean in absolute terms.
    weights = make_weights(size, seed=size, dtype=torch.float32)
    upstream = make_weights(size, seed=size + 1, std=1.0,
                            dtype=torch.float32)
    mixture32 = fitted_mixture(4, make_weights(4096, seed=1), 1.0).float()
    mixture64 = copy.deepcopy(mixture32).double()

    plain_result, _ = plain_and_fused(weights.double(), mixture64,
                                      upstream.double())
    _, fused_result = plain_and_fused(weights, mixture32, upstream, isa=isa)

    assert fused_result[0].dtype == torch.float32
    scale = float(mixture64.codebook().detach().abs().max())
    assert_matches_plain(plain_result, fused_result, mixture64,
                         atol=1e-6 * scale)


@pytest.mark.parametrize('isa', FUSED_ISAS)
def test_fused_float32_variants_agree(isa):
    # Every instruction set computes the same float32 operations; only FMA
    # contraction and the order of sums differ.
    weights = make_weights(5000, seed=5, dtype=torch.float32)
    mixture = fitted_mixture(4, weights.double(), 0.01).float()
    terms = [t.detach() for t in mixture.mixture_terms()]
    kernels = load_fused_kernels()

    reference = kernels.soft_weight_forward(weights, *terms, 100.0,
                                            SOFTMAX_FLOOR, 'baseline')
    actual = kernels.soft_weight_forward(weights, *terms, 100.0,
                                         SOFTMAX_FLOOR, isa)
    hard = kernels.hard_indices(weights, *terms, isa)

    scale = float(terms[0].abs().max())
    torch.testing.assert_close(actual, reference, rtol=0, atol=1e-4 * scale)
    assert torch.equal(hard, component_logits(weights, *terms).argmax(dim=1))


def test_fused_kernel_rejects_unknown_isa():
    weights = make_weights(10, seed=0, dtype=torch.float32)
    terms = [t.detach() for t in fitted_mixture(
        2, weights.double(), 0.01).float().mixture_terms()]

    with pytest.raises(RuntimeError, match="unknown instruction set 'sse9'"):
        load_fused_kernels().soft_weight_forward(weights, *terms, 100.0,
                                                 SOFTMAX_FLOOR, 'sse9')


def test_missing_fused_build_is_reported(tmp_path):
    # A copy of the package without the compiled module, as in a fresh clone
    # before `pip install --no-build-isolation -e .`.
    package = Path(mmdgms.__file__).parent
    shutil.copytree(package, tmp_path / 'mmdgms',
                    ignore=shutil.ignore_patterns('*.so', '__pycache__'))
    script = ('import torch\n'
              'from mmdgms.quant import GaussianMixtureQuantizer\n'
              'mixture = GaussianMixtureQuantizer(bits=2)\n'
              'weights = torch.randn(100)\n'
              'mixture.init_from_weights(weights)\n'
              'mixture.soft_weights(weights)\n')
    env = dict(os.environ, PYTHONPATH=str(tmp_path))

    proc = subprocess.run([sys.executable, '-c', script], env=env,
                          cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)

    assert proc.returncode != 0
    assert 'the fused DGMS kernels (mmdgms.quant._fused) are not built' in (
        proc.stderr)
    assert 'setup.py build_ext --inplace' in proc.stderr


def test_unknown_implementation_rejected():
    weights = make_weights(10, seed=0)
    mixture = fitted_mixture(2, weights, 0.01)
    mixture.implementation = 'fast'

    with pytest.raises(ValueError, match="implementation='fast'"):
        mixture.soft_weights(weights)


# Responsibilities in the log domain.


@pytest.mark.parametrize('bits', ALL_BITS)
def test_log_domain_responsibility_matches_density(bits):
    weights = make_weights(1500, seed=bits)
    mixture = fitted_mixture(bits, weights, 1e-2)
    far_weights = torch.tensor([-40.0, 25.0, 1e3], dtype=torch.float64)
    probe = torch.cat([weights, far_weights])

    with torch.no_grad():
        expected = reference_responsibilities(probe, mixture)
        actual = library_responsibilities(probe, mixture)

    finite_rows = torch.isfinite(expected).all(dim=1)
    # The probe must contain both cases: the density form is finite on the
    # fitted weights and 0 / 0 on the far ones.
    assert finite_rows[:len(weights)].all()
    assert not finite_rows[len(weights):].any()
    torch.testing.assert_close(actual[finite_rows], expected[finite_rows],
                               rtol=1e-9, atol=1e-12)
    assert_all_finite(actual, 'log-domain responsibilities')
    torch.testing.assert_close(actual.sum(dim=1),
                               torch.ones(len(probe), dtype=torch.float64))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('bits', [1, 4, 8])
def test_far_weights_stay_finite(bits, dtype):
    weights = make_weights(500, seed=bits, dtype=dtype)
    mixture = fitted_mixture(bits, weights, 1e-2, dtype=dtype)
    probe = torch.cat(
        [weights, torch.tensor([-40.0, 25.0, 1e3], dtype=dtype)])
    with torch.no_grad():
        expected = reference_responsibilities(probe, mixture)
    # The density form divides 0 by 0 on the far weights.
    assert torch.isnan(expected[len(weights):]).all()

    output, grads = soft_weights_and_grads(library_soft_weights, probe,
                                           mixture, torch.ones_like(probe))

    assert_all_finite(output, 'soft weights')
    for name, grad in grads.items():
        assert_all_finite(grad, f'gradient of {name}')
    assert_all_finite(mixture.hard_weights(probe), 'hard weights')


@pytest.mark.parametrize('log_std', [math.log(1e-6), -40.0])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_collapsed_stds_stay_finite(dtype, log_std):
    weights = make_weights(400, seed=11, dtype=dtype)
    mixture = fitted_mixture(3, weights, 1e-2, dtype=dtype)
    with torch.no_grad():
        mixture.log_stds.fill_(log_std)
        mixture.mix_logits.zero_()
        densities = reference_densities(weights, mixture)
    # Every weight off a mean has density 0 under every component.
    assert (densities.sum(dim=1) == 0).float().mean() > 0.9

    output, grads = soft_weights_and_grads(library_soft_weights, weights,
                                           mixture, torch.ones_like(weights))

    assert_all_finite(output, 'soft weights')
    for name, grad in grads.items():
        assert_all_finite(grad, f'gradient of {name}')
    # Equal pi and equal sigma: the responsibility is one-hot on the nearest
    # mean, and r = softmax(onehot / 0.01) puts all but e^-100 on it.
    codebook = mixture.codebook().detach()
    nearest = codebook[(weights[:, None] - codebook).abs().argmin(dim=1)]
    torch.testing.assert_close(output, nearest, rtol=0, atol=1e-6)
    torch.testing.assert_close(mixture.hard_weights(weights), nearest,
                               rtol=0, atol=0)


# Hard weights.


@pytest.mark.parametrize('bits', ALL_BITS)
def test_hard_weights_use_codebook(bits):
    weights = make_weights(2000, seed=bits).view(40, 50)
    mixture = fitted_mixture(bits, weights, 1e-2)
    k = 2**bits

    indices, codebook = mixture.quantize(weights)
    hard = mixture.hard_weights(weights)

    assert indices.dtype == torch.uint8
    assert indices.shape == weights.shape
    assert int(indices.max()) < k
    assert codebook.shape == (k, )
    assert codebook[0] == 0
    torch.testing.assert_close(hard, codebook[indices.long()], rtol=0, atol=0)
    values = torch.unique(hard)
    assert len(values) <= k
    assert torch.isin(values, codebook).all()
    assert (indices == 0).any(), 'component 0 holds no weight'
    assert (values == 0).any()


@pytest.mark.parametrize('bits', ALL_BITS)
def test_hard_indices_match_reference_argmax(bits):
    weights = make_weights(2000, seed=bits)
    mixture = fitted_mixture(bits, weights, 1e-2)
    with torch.no_grad():
        expected = reference_densities(weights, mixture).argmax(dim=1)

    indices, _ = mixture.quantize(weights)

    torch.testing.assert_close(indices.long(), expected, rtol=0, atol=0)


def test_hard_indices_float32_match_reference_argmax():
    weights = make_weights(4000, seed=5)
    mixture64 = fitted_mixture(4, weights, 1e-2)
    mixture32 = fitted_mixture(4, weights, 1e-2)
    mixture32.load_state_dict(mixture64.state_dict())
    mixture32.float()
    with torch.no_grad():
        log_densities = reference_densities(weights, mixture64).log()
    top2 = log_densities.topk(2, dim=1).values
    # float32 may break near-ties the other way: skip weights whose two best
    # log-densities are closer than 1e-3.
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert clear.float().mean() > 0.99

    indices, _ = mixture32.quantize(weights.float())

    assert torch.equal(indices.long()[clear],
                       log_densities.argmax(dim=1)[clear])


def test_soft_weights_approach_hard_weights():
    weights = make_weights(4000, seed=21, dtype=torch.float32)
    mixture = fitted_mixture(4, weights, 1e-1, dtype=torch.float32)
    hard = mixture.hard_weights(weights)
    with torch.no_grad():
        top2 = reference_responsibilities(
            weights.double(),
            copy.deepcopy(mixture).double()).topk(2, dim=1)
    # Weights whose two largest responsibilities differ by less than 2e-3
    # (20 tau at tau = 1e-4) lie near a decision boundary, where r is not yet
    # one-hot. They are left out, about 0.1 % of the weights here.
    clear = (top2.values[:, 0] - top2.values[:, 1]) > 2e-3
    assert clear.float().mean() > 0.99

    max_differences = []
    for temperature in [1e-1, 1e-2, 1e-3, 1e-4]:
        with torch.no_grad():
            mixture.log_temperature.fill_(math.log(temperature))
            soft = mixture.soft_weights(weights)
        max_differences.append(float((soft - hard)[clear].abs().max()))

    for larger, smaller in zip(max_differences, max_differences[1:]):
        assert smaller < larger, max_differences
    scale = float(mixture.codebook().detach().abs().max())
    assert max_differences[-1] < 1e-6 * scale, max_differences


# DGMSConv2d.


def make_dgms_conv(bits=4, seed=0):
    torch.manual_seed(seed)
    layer = DGMSConv2d.from_conv(nn.Conv2d(3, 8, 3, padding=1), bits=bits)
    layer.mixture.init_from_weights(layer.weight)
    return layer


def test_dgms_conv_gradients_reach_every_parameter():
    layer = make_dgms_conv()
    layer.train()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(2, 3, 9, 9, generator=generator)
    target = torch.randn(2, 8, 9, 9, generator=generator)

    loss = (layer(inputs) * target).sum()
    loss.backward()

    names = dict(layer.named_parameters())
    assert set(names) == {
        'weight', 'bias', 'mixture.means', 'mixture.log_stds',
        'mixture.mix_logits', 'mixture.log_temperature'
    }
    for name, param in names.items():
        assert param.grad is not None, f'{name} received no gradient'
        assert_all_finite(param.grad, f'gradient of {name}')
        assert param.grad.norm() > 0, f'gradient of {name} is zero'


def test_dgms_conv_eval_uses_hard_weights():
    layer = make_dgms_conv()
    layer.eval()
    inputs = torch.randn(1, 3, 9, 9)

    output = layer(inputs)

    hard = layer.mixture.hard_weights(layer.weight)
    expected = F.conv2d(inputs, hard, layer.bias, padding=1)
    torch.testing.assert_close(output, expected)


def test_dgms_conv_eval_without_cache_recomputes():
    layer = make_dgms_conv()
    layer.eval()
    first = layer.quantized_weight()

    layer.weight.data.mul_(1.1)
    second = layer.quantized_weight()

    assert not layer.hard_weight_cache_enabled
    assert second is not first
    torch.testing.assert_close(second,
                               layer.mixture.hard_weights(layer.weight),
                               rtol=0, atol=0)


def test_dgms_conv_cache_reuses_hard_weights():
    layer = make_dgms_conv()
    layer.eval()
    layer.enable_hard_weight_cache()
    inputs = torch.randn(1, 3, 9, 9)

    first = layer.quantized_weight()
    layer(inputs)
    second = layer.quantized_weight()

    assert second is first
    torch.testing.assert_close(first,
                               layer.mixture.hard_weights(layer.weight),
                               rtol=0, atol=0)


def _add_to_means_no_grad(layer):
    with torch.no_grad():
        layer.mixture.means.add_(0.01)


def _scale_weight_no_grad(layer):
    with torch.no_grad():
        layer.weight.mul_(1.1)


def _shift_log_stds_no_grad(layer):
    with torch.no_grad():
        layer.mixture.log_stds.add_(0.5)


def _shift_mix_logits_no_grad(layer):
    with torch.no_grad():
        layer.mixture.mix_logits[0] += 3.0


def _optimizer_step(layer):
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    for param in layer.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()


def _load_shifted_state_dict(layer):
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state['mixture.means'] += 0.01
    layer.load_state_dict(state)


def _replace_weight_parameter(layer):
    layer.weight = nn.Parameter(layer.weight.detach() * 1.1)


def _assign_weight_data(layer):
    layer.weight.data = layer.weight.detach() * 1.1


def _replace_weight_after_free(layer):
    # The old Parameter is dropped before the new one is made, so without a
    # reference from the cache its id and storage could be reused.
    shape = layer.weight.shape
    del layer.weight
    layer.weight = nn.Parameter(torch.randn(shape))


@pytest.mark.parametrize('change', [
    _add_to_means_no_grad, _scale_weight_no_grad, _shift_log_stds_no_grad,
    _shift_mix_logits_no_grad, _optimizer_step, _load_shifted_state_dict,
    _replace_weight_parameter, _assign_weight_data, _replace_weight_after_free
])
def test_dgms_conv_cache_invalidated(change):
    layer = make_dgms_conv()
    layer.eval()
    layer.enable_hard_weight_cache()
    cached = layer.quantized_weight().clone()

    change(layer)
    fresh = layer.quantized_weight()

    assert not torch.equal(fresh, cached)
    torch.testing.assert_close(fresh,
                               layer.mixture.hard_weights(layer.weight),
                               rtol=0, atol=0)


def test_dgms_conv_cache_cleared_after_data_edit():
    # In-place edits through .data bypass the version counter, so the cache
    # contract requires clear_hard_weight_cache() after them.
    layer = make_dgms_conv()
    layer.eval()
    layer.enable_hard_weight_cache()
    layer.quantized_weight()

    layer.weight.data.mul_(1.1)
    layer.clear_hard_weight_cache()

    torch.testing.assert_close(layer.quantized_weight(),
                               layer.mixture.hard_weights(layer.weight),
                               rtol=0, atol=0)


def test_dgms_conv_train_disables_cache():
    layer = make_dgms_conv()
    layer.eval()
    layer.enable_hard_weight_cache()
    layer.quantized_weight()

    layer.train()
    layer.eval()

    assert not layer.hard_weight_cache_enabled
    assert layer._hard_cache is None


def test_dgms_conv_cache_follows_dtype_change():
    layer = make_dgms_conv()
    layer.eval()
    layer.enable_hard_weight_cache()
    layer.quantized_weight()

    layer.double()
    output = layer(torch.randn(1, 3, 9, 9, dtype=torch.float64))

    assert layer.quantized_weight().dtype == torch.float64
    assert output.dtype == torch.float64


def test_hard_weight_cache_context():
    model = nn.Sequential(make_dgms_conv(seed=0), nn.ReLU(),
                          DGMSConv2d.from_conv(nn.Conv2d(8, 4, 1), bits=2))
    model[2].mixture.init_from_weights(model[2].weight)
    model.eval()

    with pytest.raises(KeyError):
        with hard_weight_cache(model):
            assert model[0].hard_weight_cache_enabled
            assert model[2].hard_weight_cache_enabled
            model(torch.randn(1, 3, 9, 9))
            assert model[2]._hard_cache is not None
            raise KeyError('leave the block early')

    assert not model[0].hard_weight_cache_enabled
    assert not model[2].hard_weight_cache_enabled
    assert model[2]._hard_cache is None


def test_dgms_conv_uninitialised_forward_raises():
    layer = DGMSConv2d.from_conv(nn.Conv2d(3, 8, 3), bits=4)
    assert not layer.mixture.initialized

    with pytest.raises(RuntimeError, match='init_from_weights') as info:
        layer(torch.randn(1, 3, 9, 9))
    assert 'DGMSHook' in str(info.value)

    layer.eval()
    with pytest.raises(RuntimeError, match='init_from_weights'):
        layer(torch.randn(1, 3, 9, 9))


# Stability under extreme parameters.


def _collapse_stds(mixture):
    mixture.log_stds.fill_(-60.0)


def _clamp_temperature(mixture):
    mixture.log_temperature.fill_(-60.0)


def _empty_component(mixture):
    mixture.mix_logits[2] = -1e4


def _move_mean_far(mixture):
    mixture.means[-1] = 1e3


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('change', [
    _collapse_stds, _clamp_temperature, _empty_component, _move_mean_far
])
def test_extreme_parameters_stay_finite(change, dtype):
    weights = make_weights(600, seed=13, dtype=dtype)
    mixture = fitted_mixture(3, weights, 1e-2, dtype=dtype)
    with torch.no_grad():
        change(mixture)

    output, grads = soft_weights_and_grads(library_soft_weights, weights,
                                           mixture, torch.ones_like(weights))

    assert_all_finite(output, 'soft weights')
    for name, grad in grads.items():
        assert_all_finite(grad, f'gradient of {name}')
    assert_all_finite(mixture.hard_weights(weights), 'hard weights')
    assert_derived_values_in_range(mixture)


@pytest.mark.parametrize('change', [
    _collapse_stds, _clamp_temperature, _empty_component, _move_mean_far
])
def test_large_optimizer_step_keeps_ranges(change):
    weights = make_weights(600, seed=13).float().requires_grad_()
    mixture = fitted_mixture(3, weights, 1e-2, dtype=torch.float32)
    with torch.no_grad():
        change(mixture)
    optimizer = torch.optim.SGD(list(mixture.parameters()) + [weights],
                                lr=1e3)

    for _ in range(3):
        optimizer.zero_grad()
        (mixture.soft_weights(weights)**2).sum().backward()
        optimizer.step()

    for name, param in mixture.named_parameters():
        assert_all_finite(param, name)
    assert_derived_values_in_range(mixture)


def assert_derived_values_in_range(mixture):
    """Check sigma >= min_std, sum(pi) = 1 and tau >= min_temperature."""
    with torch.no_grad():
        _, log_coef, inv_two_var = mixture.mixture_terms()
        log_sigma = mixture.log_stds.double().clamp(
            min=math.log(mixture.min_std))
        temperature = float(mixture.temperature)
    tolerance = 1 + 1e-5
    assert torch.isfinite(log_coef).all(), log_coef
    assert torch.isfinite(inv_two_var).all(), inv_two_var
    # inv_two_var = 1 / (2 sigma^2) is at most 1 / (2 min_std^2).
    assert (inv_two_var <= 0.5 / mixture.min_std**2 * tolerance).all()
    # log_coef = log pi - log sigma, so pi is recovered from it.
    pi = torch.exp(log_coef.double() + log_sigma)
    assert (pi >= 0).all()
    torch.testing.assert_close(pi.sum(), torch.tensor(1.0,
                                                      dtype=torch.float64))
    assert temperature * tolerance >= mixture.min_temperature


# Construction.


@pytest.mark.parametrize('bits', [0, 9, 2.5, True, -1, '4'])
def test_invalid_bits_rejected(bits):
    with pytest.raises(ValueError) as info:
        GaussianMixtureQuantizer(bits=bits)
    assert str(bits) in str(info.value)


def test_fixed_temperature_is_buffer():
    mixture = GaussianMixtureQuantizer(bits=2, init_temperature=0.05,
                                       learn_temperature=False)

    parameter_names = {name for name, _ in mixture.named_parameters()}
    buffer_names = {name for name, _ in mixture.named_buffers()}
    assert 'log_temperature' in buffer_names
    assert 'log_temperature' not in parameter_names
    assert all(param is not mixture.log_temperature
               for param in mixture.parameters())
    assert not mixture.log_temperature.requires_grad
    torch.testing.assert_close(mixture.temperature, torch.tensor(0.05))

    weights = make_weights(200, seed=2, dtype=torch.float32)
    mixture.init_from_weights(weights)
    mixture.soft_weights(weights.requires_grad_()).sum().backward()
    assert mixture.log_temperature.grad is None
    assert 'log_temperature' in mixture.state_dict()


# k-means.


def partition_cost(sorted_values, bounds):
    return sum(((part - part.mean())**2).sum()
               for part in np.split(sorted_values, bounds) if len(part))


def brute_force_cost(values, k):
    """Return the optimal k-means cost by enumerating contiguous partitions."""
    sorted_values = np.sort(values)
    return min(
        partition_cost(sorted_values, list(cuts))
        for cuts in itertools.combinations(range(1, len(values)), k - 1))


def numpy_lloyd_cost(values, k, max_iters=300):
    """Return the cost of plain Lloyd's algorithm from kmeans_1d's start."""
    sorted_values = np.sort(values)
    n = len(values)
    positions = np.minimum(((np.arange(k) + 0.5) / k * n).astype(int), n - 1)
    centers = sorted_values[positions].copy()
    for _ in range(max_iters):
        labels = np.abs(sorted_values[:, None] - centers[None, :]).argmin(1)
        new_centers = centers.copy()
        for cluster in range(k):
            members = sorted_values[labels == cluster]
            if len(members):
                new_centers[cluster] = members.mean()
        if np.array_equal(new_centers, centers):
            break
        centers = new_centers
    labels = np.abs(sorted_values[:, None] - centers[None, :]).argmin(1)
    return sum(((sorted_values[labels == c] - centers[c])**2).sum()
               for c in range(k))


def check_result_consistent(values, result, k):
    """Check counts, sums and deviations against the returned centres."""
    data = np.sort(values.double().numpy().reshape(-1))
    centers = result.centers.numpy()
    counts = result.counts.numpy()
    assert result.centers.shape == (k, )
    assert result.counts.shape == (k, )
    assert result.sq_dev.shape == (k, )
    assert counts.sum() == len(data)
    assert (counts >= 0).all()
    assert (np.diff(centers) >= 0).all(), centers
    bounds = np.cumsum(counts)[:-1]
    for cluster, part in enumerate(np.split(data, bounds)):
        if len(part):
            assert centers[cluster] == pytest.approx(part.mean(), rel=1e-12,
                                                     abs=1e-15)
            expected = ((part - centers[cluster])**2).sum()
            assert float(result.sq_dev[cluster]) == pytest.approx(
                expected, rel=1e-9, abs=1e-12)


def test_kmeans_deterministic():
    values = make_weights(3000, seed=4)

    first = kmeans_1d(values, 16)
    second = kmeans_1d(values.clone(), 16)

    assert torch.equal(first.centers, second.centers)
    assert torch.equal(first.counts, second.counts)
    assert torch.equal(first.sq_dev, second.sq_dev)
    assert first.iterations == second.iterations


def test_kmeans_finds_optimum_on_clustered_data():
    rng = np.random.default_rng(0)
    for _ in range(20):
        centres = np.sort(rng.uniform(-10, 10, size=3))
        while np.diff(centres).min() < 3:
            centres = np.sort(rng.uniform(-10, 10, size=3))
        values = np.concatenate(
            [centre + rng.normal(scale=0.3, size=4) for centre in centres])
        rng.shuffle(values)

        result = kmeans_1d(torch.from_numpy(values), 3)

        assert float(result.sq_dev.sum()) == pytest.approx(
            brute_force_cost(values, 3), rel=1e-9, abs=1e-12)
        check_result_consistent(torch.from_numpy(values), result, 3)


@pytest.mark.parametrize('k', [2, 3, 4])
def test_kmeans_no_worse_than_numpy_lloyd(k):
    for seed in range(60):
        values = np.random.default_rng(seed).normal(size=12)

        result = kmeans_1d(torch.from_numpy(values), k)

        cost = float(result.sq_dev.sum())
        assert cost <= numpy_lloyd_cost(values, k) + 1e-12, seed
        assert cost >= brute_force_cost(values, k) - 1e-12, seed
        check_result_consistent(torch.from_numpy(values), result, k)


def test_kmeans_fewer_values_than_clusters():
    values = torch.tensor([0.3, -0.2, 0.7])

    result = kmeans_1d(values, 5)

    check_result_consistent(values, result, 5)
    assert int((result.counts == 0).sum()) == 2
    assert torch.isfinite(result.centers).all()
    assert float(result.sq_dev.sum()) == 0


def test_kmeans_constant_input():
    values = torch.full((7, 3), 0.25)

    result = kmeans_1d(values, 4)

    check_result_consistent(values, result, 4)
    assert torch.allclose(result.centers,
                          torch.full((4, ), 0.25, dtype=torch.float64))
    assert float(result.sq_dev.sum()) == 0


def test_kmeans_single_cluster():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])

    result = kmeans_1d(values, 1)

    assert result.centers.tolist() == [4.0]
    assert result.counts.tolist() == [4]
    assert result.sq_dev.tolist() == [50.0]


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError, match='k=0'):
        kmeans_1d(torch.ones(3), 0)
    with pytest.raises(ValueError, match='empty'):
        kmeans_1d(torch.ones(0), 2)


# Mixture initialisation.


def check_initialised(mixture):
    k = mixture.num_components
    assert mixture.initialized
    assert int(mixture.init_components) == k
    codebook = mixture.codebook()
    assert codebook.shape == (k, )
    assert codebook[0].item() == 0.0
    assert torch.isfinite(codebook).all()
    pi = torch.softmax(mixture.mix_logits.detach().double(), dim=0)
    torch.testing.assert_close(pi.sum(), torch.tensor(1.0,
                                                      dtype=torch.float64))
    assert (pi > 0).all()
    sigma = mixture.log_stds.detach().exp()
    assert (sigma > 0).all()
    assert (sigma >= mixture.min_std * (1 - 1e-6)).all()


@pytest.mark.parametrize('bits', ALL_BITS)
def test_init_from_weights(bits):
    weights = make_weights(3000, seed=bits, dtype=torch.float32)
    mixture = GaussianMixtureQuantizer(bits=bits)
    assert not mixture.initialized

    info = mixture.init_from_weights(weights)

    check_initialised(mixture)
    assert info['iterations'] >= 1
    assert 0 < info['sparsity'] < 1
    # Components 1..K-1 come from the k-means centres in ascending order.
    nonzero_means = mixture.means.detach()
    assert (nonzero_means[1:] >= nonzero_means[:-1]).all()


@pytest.mark.parametrize('weights', [
    torch.tensor([0.3, -0.2, 0.7]),
    torch.zeros(2, 3),
    torch.full((10, ), 0.4),
    torch.tensor([5.0]),
],
                         ids=['fewer-than-k', 'all-zero', 'constant',
                              'single'])
def test_init_from_degenerate_weights(weights):
    mixture = GaussianMixtureQuantizer(bits=4)

    mixture.init_from_weights(weights)

    check_initialised(mixture)
    output = mixture.soft_weights(weights.clone().requires_grad_())
    assert torch.isfinite(output).all()


def test_plain_implementation_matches_chunked():
    weights = make_weights(3000, seed=11)
    mixture = fitted_mixture(4, weights, 0.01)
    upstream = make_weights(3000, seed=12, std=1.0)

    chunked, chunked_grads = soft_weights_and_grads(library_soft_weights,
                                                    weights, mixture,
                                                    upstream)
    mixture.implementation = 'plain'
    plain, plain_grads = soft_weights_and_grads(library_soft_weights,
                                                weights, mixture, upstream)

    torch.testing.assert_close(plain, chunked, rtol=1e-5,
                               atol=clipping_bound(mixture))
    for name, grad in plain_grads.items():
        error = relative_error(chunked_grads[name], grad)
        assert error < GRAD_RTOL, f'gradient of {name}: relative error {error}'
