"""The fast vMF sampling paths: d = 3 inverse CDF, pooled/compacted Wood redraws with the Marsaglia-Tsang
proposal, Householder tangent, Box-Muller and 64-bit-per-block random numbers, chunking; all against SciPy
or closed forms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
import scipy.stats as st

from gen_jax.vae import vmf


def _unit(d, seed):
    g = np.random.RandomState(seed).randn(d)
    return g / np.linalg.norm(g)


def _cdf_w_d3(w, kappa):
    return (np.exp(kappa * (np.clip(w, -1, 1) - 1)) - np.exp(-2 * kappa)) / -np.expm1(-2 * kappa)


def _mean_w(d, kappa):
    return sp.ive(d / 2, kappa) / sp.ive(d / 2 - 1, kappa)


# ------------------------------------------------------------------------------------- random-number helpers
def test_box_muller_normals_uniforms_and_circle_are_correctly_distributed():
    z = np.asarray(jax.jit(lambda k: vmf._normal(k, (100_001,), jnp.float32))(jax.random.key(0)), np.float64)
    assert z.shape == (100_001,)
    assert st.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 4 / math.sqrt(z.size) and abs(z.var() - 1) < 6 * math.sqrt(2 / z.size)
    u = np.asarray(vmf._uniform(jax.random.key(1), (50_000,), jnp.float32), np.float64)
    assert u.min() >= 0 and u.max() < 1 and st.kstest(u, "uniform").pvalue > 1e-3
    a, b = vmf._word_pairs(jax.random.key(2), 50_000)
    c, s = map(np.asarray, vmf._unit_circle_from_words(b))
    np.testing.assert_allclose(c.astype(np.float64) ** 2 + s.astype(np.float64) ** 2, 1.0, atol=3e-7)
    theta = (np.arctan2(s, c) / (2 * np.pi)) % 1.0
    assert st.kstest(theta, "uniform").pvalue > 1e-3
    # the two words of a block are independent
    assert abs(np.corrcoef(np.asarray(a, np.float64), np.asarray(b, np.float64))[0, 1]) < 4 / math.sqrt(50_000)


def test_materialize_returns_every_bit_pattern_unchanged():
    # the one-loop, two-output trick (an OR-reduce over two copies) must be the identity, NaNs and -0 included
    bits = np.random.RandomState(0).randint(0, 2 ** 32, 4099, dtype=np.uint64).astype(np.uint32)
    bits[:6] = [0x7FC00000, 0xFFC00001, 0x80000000, 0x00000001, 0x7F800000, 0xFFFFFFFF]
    floats = bits.view(np.float32)
    ints = bits[::-1].copy().view(np.int32)
    got = jax.jit(lambda a, b, c: vmf._materialize(a, b, c))(jnp.asarray(bits), jnp.asarray(floats),
                                                              jnp.asarray(ints))
    for g, want in zip(got, (bits, floats, ints)):
        assert g.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(g).view(np.uint32), want.view(np.uint32))


def test_non_threefry_keys_and_raw_keys_sample_correctly():
    # rbg keys seed the same threefry hash with two words drawn from the key: deterministic, key-dependent
    k1, k2 = jax.random.key(0, impl="rbg"), jax.random.key(1, impl="rbg")
    a1, _ = vmf._word_pairs(k1, 50_000)
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(vmf._word_pairs(k1, 50_000)[0]))
    assert np.mean(np.asarray(a1) == np.asarray(vmf._word_pairs(k2, 50_000)[0])) < 1e-3
    assert st.kstest(np.asarray(a1, np.float64) / 2 ** 32, "uniform").pvalue > 1e-3
    mu = jnp.asarray(_unit(10, 0)[None], jnp.float32)
    for key in (jax.random.key(0, impl="rbg"), jax.random.PRNGKey(3)):
        z = np.asarray(vmf.sample(key, mu, jnp.array([20.0]), 4000), np.float64)
        w = z[:, 0] @ np.asarray(mu[0], np.float64)
        ref = st.vonmises_fisher(np.asarray(mu[0], np.float64), 20.0).rvs(4000, random_state=1) @ np.asarray(mu[0])
        assert st.ks_2samp(w, ref).pvalue > 1e-3


def test_prefix_count_and_compact_match_numpy():
    rs = np.random.RandomState(0)
    for n in (1, 31, 32, 33, 1000, 40_000):
        mask = rs.rand(n) < 0.3
        np.testing.assert_array_equal(np.asarray(vmf._prefix_count(jnp.asarray(mask))), np.cumsum(mask))
        size = max(1, int(0.25 * n))
        idx = np.asarray(vmf._compact(jnp.asarray(mask), size))
        want = np.nonzero(mask)[0][:size]
        np.testing.assert_array_equal(idx[:len(want)], want)
        assert np.all(idx[len(want):] == n)
    rows = rs.rand(3, 1000) < 0.4  # per-row counts (the pooled redraw's ranks)
    np.testing.assert_array_equal(np.asarray(vmf._row_prefix_count(jnp.asarray(rows))), np.cumsum(rows, axis=1))


# ------------------------------------------------------------------------------------------- d = 3 closed form
@pytest.mark.parametrize("kappa", [0.0, 1e-6, 1.0, 20.0, 500.0, 1e4])
def test_d3_inverse_cdf_matches_exact_marginal_by_ks_test(kappa):
    w, s = jax.jit(lambda k: vmf.sample_w_d3(k, jnp.float32(kappa), (20_000,)))(jax.random.key(7))
    w, s = np.asarray(w, np.float64), np.asarray(s, np.float64)
    cdf = (lambda t: (np.clip(t, -1, 1) + 1) / 2) if kappa < 1e-3 else (lambda t: _cdf_w_d3(t, kappa))
    assert st.kstest(w, cdf).pvalue > 1e-3
    # s = sqrt(1 - w^2) is computed from 1 - w without cancellation, so compare w^2 + s^2 with 1 (sqrt(1 - w^2) of
    # the float32 w itself loses everything near w = 1)
    np.testing.assert_allclose(w * w + s * s, 1.0, atol=5e-7)
    assert abs(w.mean() - (_mean_w(3, kappa) if kappa > 0 else 0)) < 5 * max(w.std(), 1e-12) / math.sqrt(w.size)


def test_d3_sample_against_scipy_rvs_with_mu_in_both_hemispheres():
    mus = np.stack([_unit(3, 1), -np.abs(_unit(3, 2)), np.array([1.0, 0, 0]), np.array([-1.0, 0, 0])])
    kappa = 5.0
    z = np.asarray(jax.jit(lambda k: vmf.sample(k, jnp.asarray(mus, jnp.float32), jnp.full((4,), kappa), 20_000))(
        jax.random.key(3)), np.float64)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-6)
    for j, mu in enumerate(mus):
        ref = st.vonmises_fisher(mu, kappa).rvs(20_000, random_state=j)
        # the marginal along mu and along a fixed direction orthogonal to mu (tests the tangent part)
        c = np.cross(mu, _unit(3, 10 + j))
        c /= np.linalg.norm(c)
        for v in (mu, c):
            assert st.ks_2samp(z[:, j] @ v, ref @ v).pvalue > 1e-3, (j, v)


def test_d3_kappa_derivative_is_the_implicit_reparameterization_derivative():
    q = jnp.asarray(np.linspace(0.01, 0.99, 41), jnp.float32)
    for kappa in (1e-3, 0.5, 2.0, 50.0, 1e3):
        k = jnp.full(q.shape, kappa, jnp.float32)
        (w, _), (dw, _) = jax.jvp(lambda kk: vmf._w_d3(kk, q), (k,), (jnp.ones_like(k),))
        # w_kappa_derivative is evaluated at the float32 w, whose rounding near w = 1 limits it to ~5e-4 there
        np.testing.assert_allclose(dw, vmf.w_kappa_derivative(3, k, w), rtol=1e-3, atol=1e-9)
        # and the float64 derivative of the closed form at fixed q, including the tails
        qq = np.asarray(q, np.float64)
        w64 = lambda kap: 1 + np.log1p(qq * np.expm1(-2 * kap)) / kap  # noqa: E731
        h = 1e-4 * kappa
        np.testing.assert_allclose(dw, (w64(kappa + h) - w64(kappa - h)) / (2 * h), rtol=1e-4)
    # sample_w_d3 is the same function of its uniform: its jvp is the same derivative per draw
    k = jnp.full((512,), 2.0)
    (w, _), (dw, _) = jax.jvp(lambda kk: vmf.sample_w_d3(jax.random.key(1), kk, (512,)), (k,), (jnp.ones_like(k),))
    ok = (w > -0.999) & (w < 0.999)
    np.testing.assert_allclose(dw[ok], vmf.w_kappa_derivative(3, k, w)[ok], rtol=2e-4, atol=1e-8)
    # E[dw/dkappa] = A_3'(kappa)
    k = jnp.full((100_000,), 2.0)
    _, (dw, _) = jax.jvp(lambda kk: vmf.sample_w_d3(jax.random.key(2), kk, (100_000,)), (k,), (jnp.ones_like(k),))
    exact = jax.grad(lambda kk: vmf.mean_resultant_length(3, kk))(jnp.float32(2.0))
    assert abs(float(dw.mean()) / float(exact) - 1) < 0.02


@pytest.mark.parametrize("kappa", [1e-6, 1e4])
def test_gradients_finite_at_extreme_kappa_and_at_w_equal_one(kappa):
    c = jnp.asarray(_unit(3, 6), jnp.float32)
    # q = 0 gives w = 1 exactly, s = 0
    (w, s), (dw, ds) = jax.jvp(lambda kk: vmf._w_d3(kk, jnp.zeros(4)), (jnp.full((4,), kappa),), (jnp.ones(4),))
    assert np.all(np.asarray(w) == 1) and np.all(np.isfinite(dw)) and np.all(np.isfinite(ds))

    def loss(params, key):
        m, k = params
        mu = m / jnp.linalg.norm(m, axis=-1, keepdims=True)
        return jnp.sum(vmf.sample(key, mu, k, 256) @ c)

    for d in (3, 5, 12):
        cd = jnp.asarray(_unit(d, d), jnp.float32)
        m0 = jnp.asarray(np.stack([_unit(d, 1), -_unit(d, 1)]), jnp.float32)
        g_m, g_k = jax.jit(jax.grad(lambda p, key: jnp.sum(vmf.sample(
            key, p[0] / jnp.linalg.norm(p[0], axis=-1, keepdims=True), p[1], 256) @ cd)))(
            (m0, jnp.full((2,), kappa, jnp.float32)), jax.random.key(d))
        assert np.all(np.isfinite(g_m)) and np.all(np.isfinite(g_k)), d
    del loss


# --------------------------------------------------------------------------------------- Wood, pooled redraws
@pytest.mark.parametrize("d,kappa", [(3, 500.0), (4, 2.0), (5, 50.0), (10, 500.0), (100, 20.0), (100, 1e4)])
def test_wood_w_marginal_matches_scipy(d, kappa):
    n = 20_000
    w, s = jax.jit(lambda k: vmf.sample_w_wood(k, d, jnp.float32(kappa), (n,)))(jax.random.key(d))
    w = np.asarray(w, np.float64)
    if d == 3:
        assert st.kstest(w, lambda t: _cdf_w_d3(t, kappa)).pvalue > 1e-3
    else:
        ref = st.vonmises_fisher(np.eye(d)[0], kappa).rvs(n, random_state=d)[:, 0]
        assert st.ks_2samp(w, ref).pvalue > 1e-3
    assert abs(w.mean() - _mean_w(d, kappa)) < 5 * w.std() / math.sqrt(n)
    np.testing.assert_allclose(np.asarray(s, np.float64), np.sqrt(np.maximum(1 - w * w, 0)), atol=2e-3)


@pytest.mark.parametrize("d,kappa", [(10, 500.0), (100, 50.0)])
def test_wood_sample_moments_and_tangent_isotropy(d, kappa):
    n = 20_000
    mu = -np.abs(_unit(d, 4))  # mu_1 < 0: the other branch of the reflection
    z = np.asarray(jax.jit(lambda k: vmf.sample(k, jnp.asarray(mu[None], jnp.float32), jnp.array([kappa]), n))(
        jax.random.key(5))[:, 0], np.float64)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
    w = z @ mu
    ref = st.vonmises_fisher(mu, kappa).rvs(n, random_state=0) @ mu
    assert st.ks_2samp(w, ref).pvalue > 1e-3
    # tangent part: mean zero, covariance (1 - E w^2) / (d - 1) (I - mu mu^T)
    t = z - w[:, None] * mu
    var = (1 - np.mean(w * w)) / (d - 1)
    assert np.abs(t.mean(0)).max() < 6 * math.sqrt(var / n)
    basis = np.linalg.qr(np.column_stack([mu, np.random.RandomState(0).randn(d, 5)]))[0][:, 1:]
    proj = t @ basis
    np.testing.assert_allclose(proj.var(0), var, rtol=8 * math.sqrt(2 / n))
    c = np.corrcoef(proj.T)[np.triu_indices(5, 1)]
    assert np.abs(c).max() < 6 / math.sqrt(n)


def test_wood_redraw_levels_overflow_and_small_buffers_stay_exact(monkeypatch):
    # a too-small rejection bound makes every buffer overflow: the extra while_loop rounds must fix it
    # (a kappa per entry takes the compacted-buffer path, `_wood_redraw`, not the per-row pool). d = 3 has
    # Wood's envelope only: ~35% of proposals rejected, so the second level (sized for 5% of a 5000-slot buffer,
    # 361 slots) gets ~800 entries and must overflow
    monkeypatch.setattr(vmf, "_REJECT_BOUND", 0.05)
    d, kappa, n = 3, 500.0, 20_000
    w, _ = jax.jit(lambda k: vmf.sample_w_wood(k, d, jnp.full((n,), kappa), (n,)))(jax.random.key(11))
    ref = st.vonmises_fisher(np.eye(d)[0], kappa).rvs(n, random_state=2)[:, 0]
    assert st.ks_2samp(np.asarray(w, np.float64), ref).pvalue > 1e-3
    monkeypatch.undo()
    # tiny batches (no levels: one buffer of 16 proposals per entry per round)
    w, _ = jax.jit(lambda k: vmf.sample_w_wood(k, d, jnp.full((7, 3), kappa), (50, 7, 3)))(jax.random.key(12))
    assert st.ks_2samp(np.asarray(w, np.float64).ravel(), ref).pvalue > 1e-3


@pytest.mark.parametrize("rejected", [0.01, 0.05, 0.2, 0.35])
def test_redraw_replaces_exactly_the_rejected_entries_with_draws_of_the_w_marginal(rejected):
    # the rejected count picks the branch at run time: a buffer of n/64, n/16 or n/4 slots, or (above n/4) one
    # in-place proposal per rejected entry first; each must redraw exactly the rejected entries, exactly
    d, kappa, n = 10, 20.0, 40_000
    done = np.random.RandomState(1).rand(n) >= rejected
    sentinel = np.float32(0.123)
    consts = tuple(jnp.broadcast_to(c, (n,)) for c in vmf._envelope_consts(d, jnp.float32(kappa)))
    eps = jax.jit(lambda k: vmf._wood_redraw(k, d, consts, jnp.full((n,), sentinel), jnp.asarray(done), 1000))(
        jax.random.key(3))
    eps = np.asarray(eps)
    np.testing.assert_array_equal(eps[done], sentinel)  # accepted entries are kept bit for bit
    w = np.asarray(vmf._wood_w(consts[0][0], jnp.asarray(eps[~done]))[0], np.float64)
    assert w.size == (~done).sum() and np.all(np.abs(w) <= 1)
    ref = st.vonmises_fisher(np.eye(d)[0], kappa).rvs(20_000, random_state=4)[:, 0]
    assert st.ks_2samp(w, ref).pvalue > 1e-3


def test_redraw_levels_shrink_and_cover_the_worst_rejection_rate():
    assert vmf._redraw_levels(100) == []
    for n in (300, 2_000, 5_000, 20_000, 10 ** 6):
        levels = vmf._redraw_levels(n)
        assert levels[0][0] >= 0.39 * n and levels[0][1] == 1
        assert all(a[0] > b[0] for a, b in zip(levels, levels[1:]))
        size, k = levels[-1]
        assert size * vmf._REJECT_BOUND ** k < 1e-3  # one while_loop round is almost always enough
        if n >= 20_000:  # proposals drawn per entry (the fixed margins dominate for small n)
            assert sum(s * k for s, k in levels) < n
        # a buffer whose entries are all rejected (the run-time sized buffers of _wood_redraw)
        levels = vmf._redraw_levels(n, rate=1.0)
        assert levels[0] == (n, 1) and all(a[0] > b[0] for a, b in zip(levels, levels[1:]))
        size, k = levels[-1]
        assert size * vmf._REJECT_BOUND ** k < 1e-3
    # Wood's worst acceptance (kappa -> inf) times Marsaglia-Tsang's (a = 1) stays above 1 - _REJECT_BOUND
    d, n = 3, 200_000
    consts = vmf._envelope_consts(d, jnp.float32(1e4))
    _, ok = vmf._test_proposals(d, consts, *vmf._beta_proposals(jax.random.key(0), d, n, jnp.float32))
    assert float(jnp.mean(ok)) > 1 - vmf._REJECT_BOUND + 0.02


# ------------------------------------------------------------------------------- the gamma envelope (d >= 4)
def _acceptance_by_quadrature(d, kappa):
    """(Wood's, the gamma envelope's) acceptance probability by numerical integration in float64: the expected
    acceptance ratio under each proposal density, written from the definitions (not from the closed forms)."""
    from scipy import integrate
    a = (d - 1) / 2
    b = (d - 1) / (2 * kappa + math.sqrt(4 * kappa ** 2 + (d - 1) ** 2))
    x0 = (1 - b) / (1 + b)
    c = kappa * x0 + (d - 1) * math.log(1 - x0 * x0)

    def wood(e):  # e ~ Beta(a, a), accept with exp(kappa w + (d-1) log(1 - x0 w) - c)
        w = (1 - (1 + b) * e) / (1 - (1 - b) * e)
        return st.beta(a, a).pdf(e) * math.exp(kappa * w + (d - 1) * math.log(1 - x0 * w) - c)

    lam = 2 * kappa + a - 1

    def gamma(s):  # s ~ Gamma(a, rate lam), accept with ((1 - s) e^s)^(a-1) for s < 1
        return st.gamma(a, scale=1 / lam).pdf(s) * math.exp((a - 1) * (math.log1p(-s) + s))

    peak = min(0.5, a / lam)
    return (integrate.quad(wood, 0, 1, limit=400, points=[0.5])[0],
            integrate.quad(gamma, 0, 1, limit=400, points=[peak])[0])


@pytest.mark.parametrize("d,kappa", [(4, 1.0), (4, 5.0), (10, 5.0), (10, 20.0), (10, 500.0), (20, 20.0),
                                     (100, 100.0), (100, 500.0)])
def test_envelope_choice_is_the_one_that_accepts_more(d, kappa):
    wood, gamma = _acceptance_by_quadrature(d, kappa)
    # _use_gamma's closed form is the log ratio of the two acceptance probabilities; check its sign, and that
    # the acceptance the sampler's own test gives exact chi-square proposals is the quadrature's
    assert bool(vmf._use_gamma(d, jnp.float32(kappa))) == (gamma > wood), (wood, gamma)
    consts = vmf._envelope_consts(d, jnp.float32(kappa))
    n = 200_000
    rs = np.random.RandomState(d)
    q = jnp.asarray(rs.chisquare(d - 1, n), jnp.float32)
    z = jnp.asarray(rs.randn(n), jnp.float32)
    log_u = jnp.asarray(np.log(rs.rand(n)), jnp.float32)
    _, ok = vmf._test_proposals(d, consts, vmf._eps_from_normal_ratio(z, q), q, log_u)
    rate = float(jnp.mean(ok))
    want = max(wood, gamma)
    assert abs(rate - want) < 5 * math.sqrt(want * (1 - want) / n) + 1e-4, (rate, wood, gamma)


def test_gamma_envelope_takes_over_from_wood_where_wood_accepts_least():
    # Wood's acceptance falls to ~0.7 as kappa grows; the gamma envelope's tends to 1
    for d, kappa in ((5, 20.0), (10, 500.0), (100, 1e4)):
        assert bool(vmf._use_gamma(d, jnp.float32(kappa)))
        wood, gamma = _acceptance_by_quadrature(d, kappa) if kappa < 1e4 else (None, None)
        if wood is not None:
            assert wood < 0.75 and gamma > 0.97
    for d, kappa in ((4, 0.0), (10, 1.0), (100, 20.0), (1024, 500.0)):  # Wood's accepts > 0.9 here
        assert not bool(vmf._use_gamma(d, jnp.float32(kappa)))
    assert not bool(vmf._use_gamma(3, jnp.float32(1e4)))  # needs a >= 1 (and d = 3 is sampled exactly anyway)


@pytest.mark.parametrize("d,kappa,gamma", [(10, 7.0, False), (10, 8.5, True)])  # the switch is at kappa ~ 7.8
def test_samples_match_scipy_on_both_sides_of_the_envelope_switch(d, kappa, gamma):
    assert bool(vmf._use_gamma(d, jnp.float32(kappa))) == gamma
    n = 30_000
    mu = _unit(d, 3)
    w, _ = jax.jit(lambda k: vmf.sample_w_wood(k, d, jnp.float32(kappa), (n,)))(jax.random.key(d))
    z = jax.jit(lambda k: vmf.sample(k, jnp.asarray(mu[None], jnp.float32), jnp.array([kappa]), n))(
        jax.random.key(d + 1))
    ref = st.vonmises_fisher(mu, kappa).rvs(n, random_state=d)
    assert st.ks_2samp(np.asarray(w, np.float64), ref @ mu).pvalue > 1e-3
    assert st.ks_2samp(np.asarray(z[:, 0], np.float64) @ mu, ref @ mu).pvalue > 1e-3


def test_pooled_redraw_replaces_exactly_the_rejected_entries_per_row():
    # rows with their own kappa (one under Wood's envelope, two under the gamma one); each row's rejected entries
    # get the row's accepted pool proposals, accepted entries are kept bit for bit
    d, m = 10, 20_000
    kappas = np.array([1.0, 20.0, 500.0], np.float32)
    rejected = np.array([0.3, 0.05, 0.2])
    done = np.random.RandomState(2).rand(3, m) >= rejected[:, None]
    sentinel = np.float32(0.123)
    consts = vmf._envelope_consts(d, jnp.asarray(kappas))
    eps = np.asarray(jax.jit(lambda k: vmf._pool_redraw(k, d, consts, jnp.full((3, m), sentinel), jnp.asarray(done),
                                                        1000))(jax.random.key(4)))
    np.testing.assert_array_equal(eps[done], sentinel)
    for row, kappa in enumerate(kappas):
        w = np.asarray(vmf._wood_w(consts[0][row], jnp.asarray(eps[row][~done[row]]))[0], np.float64)
        ref = st.vonmises_fisher(np.eye(d)[0], float(kappa)).rvs(20_000, random_state=row)[:, 0]
        assert w.size == (~done[row]).sum() and st.ks_2samp(w, ref).pvalue > 1e-3, row


def test_pooled_redraw_rounds_cover_pool_shortfalls(monkeypatch):
    # one pool size of 96 proposals (20000 / 256, rounded up to 32) for ~1700 rejected entries: ~20 rounds, each
    # filling as many rejected entries as its pool accepted; the rest wait for later rounds
    monkeypatch.setattr(vmf, "_POOL_FRACTIONS", (1 / 256,))
    d, kappa, n = 10, 5.0, 20_000  # Wood's envelope, ~8% rejected
    w, _ = jax.jit(lambda k: vmf.sample_w_wood(k, d, jnp.float32(kappa), (n,)))(jax.random.key(13))
    ref = st.vonmises_fisher(np.eye(d)[0], kappa).rvs(n, random_state=5)[:, 0]
    assert st.ks_2samp(np.asarray(w, np.float64), ref).pvalue > 1e-3


def test_chunked_sampling_matches_scipy_and_differentiates(monkeypatch):
    monkeypatch.setattr(vmf, "_CHUNK_FLOATS", 1 << 10)
    d, kappa, n = 5, 8.0, 6001  # rows = 1024 per chunk: 6 chunks, the last one padded
    mu = jnp.asarray(_unit(d, 9)[None], jnp.float32)
    z = vmf.sample(jax.random.key(0), mu, jnp.array([kappa]), n)
    assert z.shape == (n, 1, d)
    w = np.asarray(z[:, 0] @ mu[0], np.float64)
    ref = st.vonmises_fisher(np.asarray(mu[0], np.float64), kappa).rvs(n, random_state=3) @ np.asarray(mu[0])
    assert st.ks_2samp(w, ref).pvalue > 1e-3
    c = jnp.asarray(_unit(d, 10), jnp.float32)
    g_mu, g_k = jax.grad(lambda m, k: jnp.mean(vmf.sample(jax.random.key(1), m, k, n) @ c), argnums=(0, 1))(
        mu, jnp.array([kappa]))
    assert np.all(np.isfinite(g_mu)) and np.all(np.isfinite(g_k))
    # d/dkappa E<c, z> = A_d'(kappa) <c, mu>
    exact = float(jax.grad(lambda k: vmf.mean_resultant_length(d, k))(jnp.float32(kappa)) * (c @ mu[0]))
    assert abs(float(g_k[0]) - exact) < 0.05 * abs(exact) + 2e-3


@pytest.mark.slow
def test_float64_sampling_uses_jax_random_and_is_correct():
    with jax.enable_x64(True):
        for d in (3, 6):
            mu = jnp.asarray(_unit(d, 2)[None], jnp.float64)
            z = vmf.sample(jax.random.key(0), mu, jnp.array([3.0], jnp.float64), 4000)
            assert z.dtype == jnp.float64
            np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=-1), 1.0, atol=1e-12)
            w = np.asarray(z[:, 0] @ mu[0])
            ref = st.vonmises_fisher(np.asarray(mu[0]), 3.0).rvs(4000, random_state=0) @ np.asarray(mu[0])
            assert st.ks_2samp(w, ref).pvalue > 1e-3


@pytest.mark.parametrize("m", [1, 7, 1000, 4097])
def test_unrolled_threefry_words_are_jaxs_threefry2x32_bit_for_bit(m):
    from jax.extend.random import threefry2x32_p

    from gen_jax.vae.vmf import _threefry_words
    key = jax.random.key_data(jax.random.key(1234))
    count = jax.lax.iota(jnp.uint32, m)
    want = threefry2x32_p.bind(key[0], key[1], count, jnp.zeros_like(count))
    got = jax.jit(_threefry_words, static_argnums=2)(key[0], key[1], m)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
