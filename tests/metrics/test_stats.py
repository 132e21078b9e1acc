"""Spearman rank correlation against SciPy; bits/dim against closed forms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from gen_jax.errors import ShapeError
from gen_jax.metrics.stats import average_ranks, bits_per_dim_from_nats, spearman


def test_average_ranks_match_scipy_rankdata_with_ties():
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0])
    np.testing.assert_allclose(average_ranks(jnp.asarray(x)), scipy.stats.rankdata(x, method="average"))


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_matches_scipy(ties):
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.6 * x + rng.normal(size=200)
    if ties:  # many tied values on both sides
        x, y = np.round(x), np.round(2 * y) / 2
    expected = scipy.stats.spearmanr(x, y).statistic
    np.testing.assert_allclose(float(spearman(x, y)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(jax.jit(spearman)(x, y)), expected, rtol=1e-5, atol=1e-6)


def test_spearman_is_one_for_monotone_maps_and_vmaps():
    x = np.linspace(-2, 2, 30)
    assert float(spearman(x, np.exp(3 * x))) == pytest.approx(1.0)
    assert float(spearman(x, -x ** 3)) == pytest.approx(-1.0)
    batch = jax.vmap(spearman)(jnp.stack([x, x]), jnp.stack([x, -x]))
    np.testing.assert_allclose(batch, [1.0, -1.0], rtol=1e-6)


def test_spearman_rejects_mismatched_shapes():
    with pytest.raises(ShapeError, match="equal length"):
        spearman(np.zeros(3), np.zeros(4))


def test_bits_per_dim_of_uniform_bytes_is_eight():
    d = 28 * 28
    assert float(bits_per_dim_from_nats(d * math.log(256.0), d)) == pytest.approx(8.0, rel=1e-6)
    np.testing.assert_allclose(bits_per_dim_from_nats(np.array([0.0, 3072 * math.log(2)]), 3072), [0.0, 1.0],
                               rtol=1e-6)
    with pytest.raises(ShapeError):
        bits_per_dim_from_nats(1.0, 0)
