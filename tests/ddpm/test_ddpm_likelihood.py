"""The variational bound in bits/dim: the discretized decoder is a distribution over the 256 bins, the KL
terms match direct formulas/SciPy, and on point-mass data with its exact denoiser the whole bound has a
closed form that both the full T-term sum and the stratified estimate must reproduce."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from gen_jax.ddpm import (bits_per_dim, discretized_gaussian_log_likelihood, extract, linear_schedule,
                          model_to_uint8, normal_kl, prior_bpd, uint8_to_model, vlb_terms)
from gen_jax.errors import ShapeError

GRID = np.arange(256) / 127.5 - 1.0


@pytest.mark.parametrize("mean", [-1.3, -0.5, 0.0, 0.42, 1.0, 3.0])
def test_discretized_decoder_sums_to_one_over_the_256_bins(mean):
    x = jnp.asarray(GRID, jnp.float32)[:, None]
    log_scales = jnp.log(jnp.array([1e-3, 0.01, 0.3, 5.0], jnp.float32))[None, :]
    logp = discretized_gaussian_log_likelihood(jnp.broadcast_to(x, (256, 4)), jnp.full((256, 4), mean), 
                                               jnp.broadcast_to(log_scales, (256, 4)))
    np.testing.assert_allclose(np.exp(np.asarray(logp, np.float64)).sum(0), 1.0, atol=2e-5)


def test_discretized_decoder_matches_scipy_including_far_tails():
    mean, sigma = 0.1, 0.02
    x = jnp.asarray(GRID[[0, 100, 140, 141, 200, 255]], jnp.float32)
    got = discretized_gaussian_log_likelihood(x, jnp.full_like(x, mean), jnp.full_like(x, math.log(sigma)))
    xs = GRID[[0, 100, 140, 141, 200, 255]]
    hi, lo = (xs + 1 / 255 - mean) / sigma, (xs - 1 / 255 - mean) / sigma
    # float64 reference: log(Phi(hi) - Phi(lo)) on the side of the mean where it does not cancel
    log_diff = lambda a, b: a + np.log1p(-np.exp(b - a))
    with np.errstate(divide="ignore"):
        ref = np.where(xs <= mean, log_diff(special.log_ndtr(hi), special.log_ndtr(lo)),
                       log_diff(special.log_ndtr(-lo), special.log_ndtr(-hi)))
    ref[0], ref[-1] = special.log_ndtr(hi[0]), special.log_ndtr(-lo[-1])
    assert np.all(np.isfinite(np.asarray(got)))  # bins 50+ sigmas out stay finite
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_normal_kl_matches_numerical_integration():
    for m1, v1, m2, v2 in [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0), (1.0, 0.01, 0.9, 0.02)]:
        p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
        ref, _ = integrate.quad(lambda z: p.pdf(z) * (p.logpdf(z) - q.logpdf(z)), m1 - 12 * math.sqrt(v1),
                                m1 + 12 * math.sqrt(v1))
        got = normal_kl(jnp.float32(m1), jnp.log(jnp.float32(v1)), jnp.float32(m2), jnp.log(jnp.float32(v2)))
        np.testing.assert_allclose(float(got), ref, rtol=1e-4, atol=1e-7)


def test_uint8_round_trip():
    x = jnp.arange(256, dtype=jnp.uint8)
    np.testing.assert_allclose(uint8_to_model(x), GRID, atol=1e-6)
    np.testing.assert_array_equal(model_to_uint8(uint8_to_model(x)), x)
    assert model_to_uint8(jnp.array([-3.0, 3.0])).tolist() == [0, 255]


# ---- point-mass data: every term in closed form --------------------------------------------------------

T_SMALL = 100
SCH = linear_schedule(T_SMALL, beta_start=1e-4 * 10, beta_end=0.02 * 10)  # a 100-step version of the paper's
IMG = np.array([0, 1, 37, 128, 200, 254, 255, 90], np.uint8).reshape(1, 2, 4, 1)


def point_mass_eps(x_t, t):
    """Exact denoiser when the data is the single image IMG: eps = (x_t - sqrt(abar) c) / sqrt(1 - abar)."""
    c = uint8_to_model(IMG)
    abar = extract(SCH.alphas_cumprod, t, x_t.ndim)
    return (x_t - jnp.sqrt(abar) * c) / jnp.sqrt(1 - abar)


def closed_form_bound(variance: str):
    b = np.linspace(1e-3, 0.2, T_SMALL)
    abar = np.cumprod(1 - b)
    abar_prev = np.append(1.0, abar[:-1])
    post = b * (1 - abar_prev) / (1 - abar)
    c = IMG.astype(np.float64) / 127.5 - 1
    # Model mean = true posterior mean (x0_hat = c), so each KL is the variance mismatch only.
    sig2 = b if variance == "beta" else post
    kl_t = 0.5 * (np.log(sig2[1:] / post[1:]) + post[1:] / sig2[1:] - 1) / math.log(2)
    # Decoder: mean exactly c, variance b~_2 (both choices, as in the original code).
    z = (1 / 255) / math.sqrt(post[1])
    interior = np.log(special.ndtr(z) - special.ndtr(-z))
    edge = np.log(special.ndtr(z))
    logp = np.where((IMG == 0) | (IMG == 255), edge, interior)
    decoder = -logp.mean() / math.log(2)
    prior = (0.5 * (-1 - np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * c**2)).mean() / math.log(2)
    return prior, decoder, kl_t


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_full_bound_on_point_mass_data_matches_closed_form(variance):
    prior, decoder, kl_t = closed_form_bound(variance)
    x = jnp.asarray(np.repeat(IMG, 3, axis=0))
    out = jax.jit(lambda r: bits_per_dim(SCH, point_mass_eps, x, r, variance=variance))(jax.random.key(0))
    np.testing.assert_allclose(out["prior"], prior, rtol=1e-4)
    np.testing.assert_allclose(out["decoder"], decoder, rtol=1e-4)
    np.testing.assert_allclose(out["kl"], kl_t.sum(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(out["total"], prior + decoder + kl_t.sum(), rtol=1e-3)
    if variance == "beta":
        terms = vlb_terms(SCH, point_mass_eps, uint8_to_model(x), jax.random.key(1), variance=variance)
        assert terms.shape == (T_SMALL, 3)
        np.testing.assert_allclose(terms[0], decoder, rtol=1e-4)
        np.testing.assert_allclose(terms[1:, 0], kl_t, rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(float(prior_bpd(SCH, uint8_to_model(IMG))[0]), prior, rtol=1e-4)


def test_stratified_estimate_is_unbiased():
    """Each example draws its own t per stratum, so a batch of copies gives independent estimates."""
    prior, decoder, kl_t = closed_form_bound("beta")
    x = jnp.asarray(np.repeat(IMG, 512, axis=0))
    out = jax.jit(lambda r: bits_per_dim(SCH, point_mass_eps, x, r, num_timesteps_eval=7, variance="beta"))(
        jax.random.key(2))
    est = np.asarray(out["kl"], np.float64)
    assert est.std() > 0  # the strata really are sampled
    assert abs(est.mean() - kl_t.sum()) < 4 * est.std() / math.sqrt(len(est)) + 1e-4
    with pytest.raises(ShapeError):
        bits_per_dim(SCH, point_mass_eps, uint8_to_model(x), jax.random.key(0))
