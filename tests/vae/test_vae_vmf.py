"""von Mises-Fisher: Bessel functions, density, entropy, KL and samplers against SciPy and closed forms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
import scipy.stats as st

from gen_jax.errors import ConfigError
from gen_jax.vae import vmf

ORDERS = np.array([0.0, 0.5, 1.0, 1.5, 3.0, 9.5, 49.5, 100.0, 511.0])
KAPPAS = np.concatenate([[1e-4, 1e-2], np.geomspace(0.1, 1e4, 40)])


def _unit(d, seed=0, n=None):
    g = np.random.RandomState(seed).randn(*((d,) if n is None else (n, d)))
    return g / np.linalg.norm(g, axis=-1, keepdims=True)


def test_log_bessel_ive_matches_scipy_on_dense_grid_float32():
    v_VxK, k_VxK = np.meshgrid(ORDERS, KAPPAS, indexing="ij")
    got = np.asarray(jax.jit(vmf.log_bessel_ive)(v_VxK.astype(np.float32), k_VxK.astype(np.float32)),
                     np.float64)
    with np.errstate(divide="ignore"):
        ref = np.log(sp.ive(v_VxK, k_VxK))
    ok = np.isfinite(ref)  # scipy underflows for high orders at small kappa
    assert ok.sum() > 0.8 * ok.size
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-4, atol=2e-5)
    assert np.all(np.isfinite(got[KAPPAS[None, :].repeat(len(ORDERS), 0) > 0]))


def test_log_bessel_ive_float64_accuracy_and_kappa_zero_limits():
    with jax.enable_x64(True):
        v_VxK, k_VxK = np.meshgrid(ORDERS, KAPPAS, indexing="ij")
        fn = jax.jit(vmf.log_bessel_ive)
        got = np.asarray(fn(v_VxK, k_VxK))
        with np.errstate(divide="ignore"):
            ref = np.log(sp.ive(v_VxK, k_VxK))
        ok = np.isfinite(ref)
        np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-8, atol=1e-9)
        # where scipy underflows, the small-kappa series' leading term (v log(k/2) - lgamma(v+1) - k) is exact
        # to O(k^2 / v): I_v(k) = (k/2)^v / Gamma(v+1) (1 + k^2 / (4 (v+1)) + ...)
        lead = v_VxK * np.log(k_VxK / 2) - sp.gammaln(v_VxK + 1) - k_VxK + np.log1p(
            k_VxK ** 2 / (4 * (v_VxK + 1)))
        small = ~ok & (k_VxK ** 4 / (32 * (v_VxK + 1) * (v_VxK + 2)) < 1e-10)
        assert small.sum() >= 5
        np.testing.assert_allclose(got[small], lead[small], rtol=1e-10)
        zero = np.asarray(fn(np.array([0.0, 0.5, 3.0]), np.zeros(3)))
        assert abs(zero[0]) < 1e-9 and np.all(zero[1:] == -np.inf)  # I_0(0) = 1, I_v(0) = 0


def _stats_fn(d):
    @jax.jit
    def stats(x, mu, kappas):
        grad_log_c = jax.vmap(jax.grad(lambda k: vmf.log_normalizer(d, k)))(kappas)
        return (vmf.log_prob(x, mu, kappas), vmf.entropy(d, kappas), vmf.kl_to_uniform(d, kappas),
                vmf.mean_resultant_length(d, kappas), grad_log_c, vmf.log_normalizer(d, jnp.zeros(())),
                vmf.kl_to_uniform(d, jnp.zeros(())))
    return stats


@pytest.mark.parametrize("d", [2, 3, 8, 1024])
def test_log_prob_entropy_kl_and_mean_length_match_scipy(d):
    mu = _unit(d, seed=d)
    kappas = np.array([1e-3, 0.5, 1.0, 20.0, 500.0, 1e4])
    dist = [st.vonmises_fisher(mu, k) for k in kappas]
    x = _unit(d, seed=d + 1, n=len(kappas)) + 3 * mu  # unit vectors at various angles to mu
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(all="ignore"):
        ref_lp = np.array([dd.logpdf(xi) for dd, xi in zip(dist, x)])
        ref_h = np.array([dd.entropy() for dd in dist])
        ref_a = sp.ive(d / 2, kappas) / sp.ive(d / 2 - 1, kappas)
    lp, h, kl, a, grad_log_c, log_c0, kl0 = map(np.asarray, _stats_fn(d)(
        jnp.asarray(x, jnp.float32), jnp.asarray(mu, jnp.float32), jnp.asarray(kappas, jnp.float32)))
    ok = np.isfinite(ref_h)  # scipy's entropy is nan for d = 1024 at small kappa (its ive underflows)
    np.testing.assert_allclose(h[ok], ref_h[ok], rtol=2e-5, atol=1e-4)
    ok = np.isfinite(ref_lp)
    np.testing.assert_allclose(lp[ok], ref_lp[ok], rtol=2e-5, atol=1e-3)
    log_area = math.log(2) + d / 2 * math.log(math.pi) - math.lgamma(d / 2)
    ok = np.isfinite(ref_h)
    np.testing.assert_allclose(kl[ok], log_area - ref_h[ok], rtol=1e-4, atol=2e-4)
    ok = np.isfinite(ref_a)
    np.testing.assert_allclose(a[ok], ref_a[ok], rtol=2e-5)
    # C_d normalizes exp(kappa <mu, x>), so d log C_d / d kappa = -E<mu, x> = -A_d
    assert np.all(np.isfinite(grad_log_c))
    np.testing.assert_allclose(-grad_log_c, a, rtol=1e-4, atol=1e-6)
    # kappa = 0 is the uniform distribution: log C = -log|S^{d-1}|, KL = 0
    assert float(log_c0) == pytest.approx(-log_area, rel=1e-5, abs=1e-4)
    assert float(kl0) == pytest.approx(0.0, abs=2e-4)


def test_kl_is_nonnegative_increasing_and_vanishes_as_kappa_goes_to_zero():
    kappas = jnp.asarray(np.concatenate([[0.0], np.geomspace(1e-3, 1e4, 60)]), jnp.float32)
    for d in (2, 5, 64):
        kl = np.asarray(vmf.kl_to_uniform(d, kappas))
        assert np.all(kl >= 0)
        assert np.all(np.diff(kl) >= -1e-4)
        assert kl[0] < 1e-4 and kl[1] < 1e-4  # KL = O(kappa^2): 1e-3 -> ~1e-7
        assert kl[-1] > 1.0


def test_su_kl_constant_d8_kappa20_agrees_with_scipy_entropy():
    ref = vmf.log_sphere_area(8) - st.vonmises_fisher(_unit(8), 20.0).entropy()
    got = float(vmf.kl_to_uniform(8, 20.0))
    assert got == pytest.approx(ref, abs=1e-4)
    assert got == pytest.approx(4.486, abs=5e-4)  # the number quoted in the notes (post 8404)


def _cdf_w_d3(w, kappa):
    # d = 3: p(w) = kappa e^{kappa w} / (2 sinh kappa), so F(w) = (e^{kappa (w - 1)} - e^{-2 kappa}) / (1 - e^{-2 kappa})
    return (np.exp(kappa * (w - 1)) - np.exp(-2 * kappa)) / -np.expm1(-2 * kappa)


_KS = np.array([0.0, 1.0, 20.0, 500.0], np.float32)


@pytest.fixture(scope="module")
def wood_samples_d3():
    mu = jnp.asarray(np.tile(_unit(3, 1), (len(_KS), 1)), jnp.float32)
    z = jax.jit(lambda key: vmf.sample(key, mu, jnp.asarray(_KS), 3000))(jax.random.key(0))
    return np.asarray(z, np.float64), np.asarray(mu, np.float64)


def test_wood_sampler_d3_matches_exact_marginal_by_ks_test(wood_samples_d3):
    z, mu = wood_samples_d3
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
    w = np.einsum("nbd,bd->nb", z, mu)
    for j, kappa in enumerate(_KS):
        cdf = (lambda t: (t + 1) / 2) if kappa == 0 else (lambda t, k=float(kappa): _cdf_w_d3(np.clip(t, -1, 1), k))
        assert st.kstest(w[:, j], cdf).pvalue > 1e-3, kappa
    # the tangent part is uniform around mu: its mean vanishes
    t = z - w[..., None] * mu
    assert np.abs(t.mean(0)).max() < 0.1


@pytest.mark.slow
def test_wood_and_table_samplers_match_scipy_rvs_d10():
    d, kappa, n = 10, 20.0, 2000
    mu = jnp.asarray(_unit(d, 3)[None], jnp.float32)
    ref = st.vonmises_fisher(np.asarray(mu[0], np.float64), kappa).rvs(n, random_state=0) @ np.asarray(mu[0])
    table = vmf.make_inverse_cdf_table(d, kappa, size=1 << 12, grid=1 << 16)
    z_wood = vmf.sample(jax.random.key(1), mu, jnp.array([kappa]), n)
    z_tab = vmf.sample(jax.random.key(2), mu, jnp.array([kappa]), n, table=table)
    for z in (z_wood, z_tab):
        w = np.asarray(z[:, 0] @ mu[0])
        assert st.ks_2samp(w, ref).pvalue > 1e-3
        assert abs(w.mean() - float(vmf.mean_resultant_length(d, kappa))) < 4 * w.std() / math.sqrt(n)


def test_table_quantiles_match_closed_form_cdf_d3():
    kappa = 5.0
    theta = vmf.make_inverse_cdf_table(3, kappa, size=64, grid=1 << 16)
    u = np.linspace(0, 1, 65)
    # P(theta <= t) = P(w >= cos t) = 1 - F(cos t)
    np.testing.assert_allclose(1 - _cdf_w_d3(np.cos(theta), kappa), u, atol=1e-6)


def test_gradients_are_finite_near_w_equal_one_and_for_large_kappa():
    mu0 = jnp.asarray(_unit(3, 5)[None].repeat(3, 0), jnp.float32)
    kappas = jnp.array([1e4, 1e3, 1.0], jnp.float32)
    c = jnp.asarray(_unit(3, 6), jnp.float32)
    # the table sampler at huge kappa puts theta within ~1e-2 of 0 (w = 1 - O(1e-4))
    table = vmf.make_inverse_cdf_table(3, 1e4, size=256, grid=1 << 16)

    @jax.jit
    @jax.grad
    def grads(params, key):
        m, k = params
        mu = m / jnp.linalg.norm(m, axis=-1, keepdims=True)
        z = vmf.sample(key, mu, k, 64)
        z_tab = vmf.sample(key, mu[:1], k[:1], 64, table=table)
        return jnp.sum(z @ c) + jnp.sum(z_tab @ c)

    gm, gk = grads((mu0, kappas), jax.random.key(0))
    assert np.all(np.isfinite(gm)) and np.all(np.isfinite(gk))


@pytest.mark.slow
def test_reparameterized_mu_gradient_matches_closed_form():
    # E[z] = A_d(kappa) mu, so for mu = m / |m|: grad_m E<c, z> = A (c - <c, mu> mu) / |m|
    d, kappa, n = 5, 4.0, 20000
    m = jnp.asarray(1.7 * _unit(d, 7), jnp.float32)
    c = jnp.asarray(_unit(d, 8), jnp.float32)
    g = jax.grad(lambda m: jnp.mean(vmf.sample(jax.random.key(3), (m / jnp.linalg.norm(m))[None],
                                               jnp.array([kappa]), n)[:, 0] @ c))(m)
    mu = m / jnp.linalg.norm(m)
    ref = vmf.mean_resultant_length(d, kappa) * (c - (c @ mu) * mu) / jnp.linalg.norm(m)
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=0.02)


def test_bad_dimension_raises():
    with pytest.raises(ConfigError, match="d must be"):
        vmf.entropy(1, 1.0)
    with pytest.raises(ConfigError, match="kappa"):
        vmf.make_inverse_cdf_table(3, -1.0)
