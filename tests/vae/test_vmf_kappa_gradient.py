"""The kappa-gradient of Wood's sampler is exact (implicit reparameterization, Figurnov et al. 2018)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, optimize

from gen_jax.vae import vmf


def _cdf(w, d, kappa):
    a = (d - 3) / 2
    p = lambda t: np.exp(kappa * (t - 1)) * (1 - t * t) ** a  # noqa: E731
    return integrate.quad(p, -1, w, limit=200)[0] / integrate.quad(p, -1, 1, limit=200)[0]


@pytest.mark.parametrize("d,kappa,w", [(3, 2.0, 0.3), (2, 0.5, -0.5), (5, 10.0, 0.8), (10, 50.0, 0.9),
                                       (21, 5.0, 0.2)])
def test_w_derivative_matches_finite_differences_of_scipy_inverse_cdf(d, kappa, w):
    # hold the CDF level u = F(w; kappa) fixed and move kappa: w(kappa +- h) = F^-1(u; kappa +- h)
    u, h = _cdf(w, d, kappa), 1e-3 * max(kappa, 1.0)
    inv = lambda k: optimize.brentq(lambda x: _cdf(x, d, k) - u, -1 + 1e-12, 1 - 1e-12, xtol=1e-14)  # noqa: E731
    fd = (inv(kappa + h) - inv(kappa - h)) / (2 * h)
    ours = float(vmf.w_kappa_derivative(d, jnp.float32(kappa), jnp.float32(w)))
    np.testing.assert_allclose(ours, fd, rtol=1e-4)


def _sample_with_tangents(d, kappa, n, seed):
    """(w, s) of n draws and their per-draw kappa-derivatives (forward mode: each draw has its own kappa)."""
    k = jnp.full((n,), kappa, jnp.float32)
    f = lambda kk: vmf.sample_w_wood(jax.random.key(seed), d, kk, (n,))  # noqa: E731
    return jax.jit(lambda kk: jax.jvp(f, (kk,), (jnp.ones_like(kk),)))(k)


@pytest.mark.parametrize("d,kappa", [(3, 2.0), (11, 50.0)])
def test_mean_w_derivative_through_the_sampler_equals_derivative_of_mean_resultant_length(d, kappa):
    # d/dkappa E[w] = A_d'(kappa); the g_rep-only gradient gave 0.120 instead of 0.174 at (3, 2)
    (w, s), (dw, ds) = _sample_with_tangents(d, kappa, 100_000, seed=0)
    exact = jax.grad(lambda k: vmf.mean_resultant_length(d, k))(jnp.float32(kappa))
    assert abs(float(jnp.mean(dw)) / float(exact) - 1) < 0.02, (float(jnp.mean(dw)), float(exact))
    # each draw's derivative is the closed form, and s = sqrt(1 - w^2) moves with it: ds = -w / s dw
    np.testing.assert_allclose(dw[:256], vmf.w_kappa_derivative(d, kappa, w[:256]), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ds[:256], -(w / s * dw)[:256], rtol=1e-3, atol=1e-6)


def test_reverse_mode_gradient_equals_the_forward_derivative():
    k = jnp.full((32,), 4.0)
    (_, _), (dw, _) = _sample_with_tangents(3, 4.0, 32, seed=1)
    g = jax.grad(lambda kk: jnp.sum(vmf.sample_w_wood(jax.random.key(1), 3, kk, (32,))[0]))(k)
    np.testing.assert_allclose(g, dw, rtol=1e-5, atol=1e-8)
