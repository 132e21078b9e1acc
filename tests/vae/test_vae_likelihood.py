"""Importance-sampled log p(x) on probabilistic PCA, whose marginal likelihood is closed form."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st

from gen_jax.errors import ConfigError
from gen_jax.vae import DiagGaussian, elbo, log_likelihood, standard_normal_log_prob

D, L, SIGMA = 6, 2, 0.5


@pytest.fixture(scope="module")
def ppca():
    """z ~ N(0, I_L), x | z ~ N(W z + b, sigma^2 I_D); data x drawn from the model."""
    rs = np.random.RandomState(0)
    W = rs.randn(D, L).astype(np.float32)
    b = rs.randn(D).astype(np.float32)
    x = (rs.randn(40, L) @ W.T + b + SIGMA * rs.randn(40, D)).astype(np.float32)
    log_px = st.multivariate_normal(b, W @ W.T + SIGMA ** 2 * np.eye(D)).logpdf(x)
    M = W.T @ W + SIGMA ** 2 * np.eye(L)
    post_mean = (np.linalg.solve(M, W.T @ (x - b).T)).T
    post_cov = SIGMA ** 2 * np.linalg.inv(M)
    return dict(W=jnp.asarray(W), b=jnp.asarray(b), x=jnp.asarray(x), log_px=log_px,
                post_mean=post_mean.astype(np.float32), post_cov=post_cov)


def _decode_log_prob(p):
    def f(z, x):
        mean = z @ p["W"].T + p["b"]
        return -0.5 * jnp.sum(jnp.square(x - mean) / SIGMA ** 2 + math.log(2 * math.pi * SIGMA ** 2), axis=-1)
    return f


def _encoder(p, scale=1.0, shift=0.0):
    """Exact posterior (the covariance is not diagonal, so rotate to its eigenbasis) or a wider, shifted one."""
    evals, evecs = np.linalg.eigh(p["post_cov"])
    R = jnp.asarray(evecs, jnp.float32)
    log_var = jnp.asarray(np.log(evals * scale ** 2), jnp.float32)

    class Rotated:  # posterior in the eigenbasis u = R^T z, where it is diagonal
        def __init__(self, x):
            mean_u = (jnp.asarray(p["post_mean"]) + shift) @ R
            self.q = DiagGaussian(mean_u, jnp.broadcast_to(log_var, mean_u.shape))

        def sample(self, rng, n):
            return self.q.sample(rng, n) @ R.T

        def log_prob(self, z):
            return self.q.log_prob(z @ R)  # rotation: |det R| = 1

    return Rotated


def _ll(enc, dec, K, chunk=None):
    """Jitted per-example estimate (eager mode would dispatch the scan and the vmapped sampler op by op)."""
    return jax.jit(lambda key, x: log_likelihood(key, x, enc, dec, standard_normal_log_prob, num_samples=K,
                                                 chunk_size=chunk))


def test_exact_posterior_gives_exact_log_likelihood_at_any_K(ppca):
    enc, dec = _encoder(ppca), _decode_log_prob(ppca)
    for K, chunk in ((1, None), (8, 2)):
        est = _ll(enc, dec, K, chunk)(jax.random.key(K), ppca["x"])
        np.testing.assert_allclose(np.asarray(est), ppca["log_px"], rtol=1e-5, atol=1e-3)
    # the ELBO with the exact posterior is also exact (the gap is KL(q || p(z|x)) = 0)
    e, _ = jax.jit(lambda k, x: elbo(k, x, enc, dec, standard_normal_log_prob, num_samples=3))(
        jax.random.key(0), ppca["x"])
    np.testing.assert_allclose(np.asarray(e), ppca["log_px"], rtol=1e-5, atol=1e-3)


def test_wider_proposal_is_biased_low_and_the_gap_shrinks_monotonically_with_K(ppca):
    x = jnp.tile(ppca["x"], (25, 1))  # 1000 rows: 25 independent estimates per example
    enc, dec = _encoder(dict(ppca, post_mean=np.tile(ppca["post_mean"], (25, 1))), scale=2.0, shift=0.3), \
        _decode_log_prob(ppca)
    ref = np.tile(ppca["log_px"], 25)
    gaps = []
    for K in (1, 10, 100):
        est = _ll(enc, dec, K, min(K, 20))(jax.random.key(K), x)
        gaps.append(float(np.mean(np.asarray(est) - ref)))
    assert gaps[0] < gaps[1] < gaps[2] < 0, gaps
    assert abs(gaps[2]) < 0.5 * abs(gaps[1])  # bias ~ -Var(w) / (2 K w-bar^2) once K is large


def test_chunked_equals_unchunked(ppca):
    enc, dec = _encoder(ppca, scale=1.5, shift=0.2), _decode_log_prob(ppca)
    f = lambda c: np.asarray(_ll(enc, dec, 12, c)(jax.random.key(7), ppca["x"]))
    np.testing.assert_allclose(f(3), f(None), rtol=1e-6, atol=1e-5)
    with pytest.raises(ConfigError, match="multiple of chunk_size"):
        f(5)


def test_iwae_bound_is_differentiable_and_analytic_kl_matches_monte_carlo(ppca):
    dec = _decode_log_prob(ppca)

    def loss(mean):
        enc = lambda x: DiagGaussian(mean, jnp.zeros_like(mean))
        return -jnp.mean(log_likelihood(jax.random.key(0), ppca["x"], enc, dec, standard_normal_log_prob,
                                        num_samples=5))

    g = jax.jit(jax.grad(loss))(jnp.zeros((40, L)))
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    q = lambda x: DiagGaussian(jnp.asarray(ppca["post_mean"]), jnp.full((40, L), -1.0))
    e_an, p_an = jax.jit(lambda k, x: elbo(k, x, q, dec, standard_normal_log_prob, num_samples=4000,
                                           analytic_kl=True))(jax.random.key(1), ppca["x"])
    e_mc, p_mc = jax.jit(lambda k, x: elbo(k, x, q, dec, standard_normal_log_prob, num_samples=4000))(
        jax.random.key(1), ppca["x"])
    np.testing.assert_allclose(np.asarray(p_an["kl"]), np.asarray(p_mc["kl"]), atol=0.08)
    # closed form KL(N(m, e^-1 I) || N(0, I)) = 0.5 sum(e^-1 + m^2 - 1 + 1)
    ref = 0.5 * np.sum(np.exp(-1.0) + ppca["post_mean"] ** 2 - 1.0 + 1.0, axis=-1)
    np.testing.assert_allclose(np.asarray(p_an["kl"]), ref, rtol=1e-5)
