"""Frechet distance against closed forms and a direct scipy.linalg.sqrtm computation."""
import numpy as np
import pytest
import scipy.linalg

from gen_jax.errors import ShapeError
from gen_jax.metrics.fid import feature_statistics, fid_from_features, frechet_distance


def _random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def test_one_dimensional_gaussians_closed_form():
    # W2^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]]) == pytest.approx(9.0 + 1.5 ** 2, rel=1e-12)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_commuting_singular_covariances_closed_form():
    # Shared eigenvectors, some eigenvalues exactly zero (rank-deficient, as with N < D samples).
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a = np.array([0, 0, 1, 2, 3, 0.5, 4, 0.0])
    b = np.array([1, 0, 0, 2, 1, 0.0, 9, 0.3])
    mu = rng.normal(size=8)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu, q @ np.diag(a) @ q.T, mu, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-6)  # sqrt of round-off-level eigenvalues: ~1e-8 each


@pytest.mark.parametrize("d", [3, 32])
def test_matches_direct_scipy_sqrtm_on_random_spd_matrices(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d, scale=2.0)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-8)


def test_zero_for_identical_statistics_and_symmetric():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = _random_spd(rng, 16), _random_spd(rng, 16)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_samples_of_one_gaussian_are_close_and_a_mean_shift_adds_its_squared_norm():
    rng = np.random.default_rng(3)
    d, n = 8, 20_000
    chol = np.linalg.cholesky(_random_spd(rng, d))
    sample = lambda: rng.normal(size=(n, d)) @ chol.T
    base = fid_from_features(sample(), sample())
    assert base < 0.01  # finite-sample bias only, O(d^2 / n)
    dmu = rng.normal(size=d)
    dmu *= 1.5 / np.linalg.norm(dmu)
    shifted = fid_from_features(sample(), sample() + dmu)
    assert shifted == pytest.approx(1.5 ** 2, abs=0.03)


def test_feature_statistics_are_mean_and_unbiased_covariance():
    rng = np.random.default_rng(4)
    f = rng.normal(size=(50, 5)).astype(np.float32)
    mu, sigma = feature_statistics(f)
    assert mu.dtype == np.float64 and sigma.shape == (5, 5)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    centered = f.astype(np.float64) - mu
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-10)


def test_bad_statistics_raise_shape_errors():
    with pytest.raises(ShapeError, match="covariance"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ShapeError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ShapeError, match="N >= 2"):
        feature_statistics(np.zeros((1, 4)))
