"""Improved precision/recall (k-NN manifolds) against a brute-force NumPy computation."""
import numpy as np
import pytest

from gen_jax.errors import ShapeError
from gen_jax.metrics.precision_recall import improved_precision_recall, knn_radii, manifold_membership


def _brute_radii(x, k):
    d = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _brute_membership(query, ref, k):
    d = np.linalg.norm(query[:, None, :] - ref[None, :, :], axis=-1)
    return np.any(d <= _brute_radii(ref, k)[None, :], axis=1)


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(61, 5)).astype(np.float32) + 3.0  # offset: distances must not depend on it
    fake = (1.3 * rng.normal(size=(47, 5)) + 0.4).astype(np.float32) + 3.0
    return real.astype(np.float64), fake.astype(np.float64)


@pytest.mark.parametrize("block_size", [7, 1024])  # several ragged blocks; one block
def test_knn_radii_match_brute_force_for_any_block_size(sets, block_size):
    real, _ = sets
    np.testing.assert_allclose(knn_radii(real, 3, block_size=block_size), _brute_radii(real, 3), rtol=1e-5)


@pytest.mark.parametrize("block_size", [7, 1024])
def test_precision_recall_match_brute_force_for_any_block_size(sets, block_size):
    real, fake = sets
    precision, recall = improved_precision_recall(real, fake, k=3, block_size=block_size)
    expected_p = _brute_membership(fake, real, 3).mean()
    expected_r = _brute_membership(real, fake, 3).mean()
    assert 0 < expected_p < 1 and 0 < expected_r < 1  # a case that actually discriminates
    assert float(precision) == pytest.approx(expected_p, abs=1e-7)
    assert float(recall) == pytest.approx(expected_r, abs=1e-7)
    np.testing.assert_array_equal(manifold_membership(fake, real, 3, block_size=block_size),
                                  _brute_membership(fake, real, 3))


def test_identical_sets_have_precision_and_recall_one(sets):
    real, _ = sets
    p, r = improved_precision_recall(real, real, k=3, block_size=16)
    assert float(p) == pytest.approx(1.0, abs=1e-6) and float(r) == pytest.approx(1.0, abs=1e-6)


def test_mode_collapse_keeps_precision_and_loses_recall():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 2))
    fake = real[real[:, 0] > 0.8][:40] + 0.01 * rng.normal(size=(40, 2))  # one corner of the real data
    p, r = improved_precision_recall(real, fake, k=3, block_size=64)
    assert float(p) > 0.9 and float(r) < 0.3
    far_p, far_r = improved_precision_recall(real, fake + 100.0, k=3, block_size=64)
    assert float(far_p) == 0.0 and float(far_r) == 0.0


def test_too_few_points_for_k_raise_shape_error():
    with pytest.raises(ShapeError, match="k=3"):
        improved_precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
