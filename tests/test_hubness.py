"""k-occurrence against brute force and scikit-learn; blocking, order, sharding; the hub-latent sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.hubness import hub_mask, k_occurrence, sample_hub_latents
from gen_jax.train.mesh import make_mesh


def _brute_force(x, k, include_self=False, cosine=False):
    """Full float64 distance matrix, stable sort: ties go to the lower index (the documented rule)."""
    x = np.asarray(x, np.float64)
    if cosine:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, -np.inf if include_self else np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.bincount(idx.ravel(), minlength=len(x))


@pytest.fixture(scope="module")
def points():
    return np.random.RandomState(0).randn(300, 24).astype(np.float32)


def test_equals_brute_force_and_sklearn(points):
    counts = np.asarray(k_occurrence(points, 5, block_size=64, key_block_size=100))
    np.testing.assert_array_equal(counts, _brute_force(points, 5))
    _, idx = NearestNeighbors(n_neighbors=6).fit(points).kneighbors(points)  # first column is self
    np.testing.assert_array_equal(counts, np.bincount(idx[:, 1:].ravel(), minlength=len(points)))
    assert counts.sum() == len(points) * 5 and counts.dtype == np.int32


def test_include_self_matches_sklearn_kneighbors_of_the_fitted_set(points):
    counts = np.asarray(k_occurrence(points, 5, include_self=True))
    _, idx = NearestNeighbors(n_neighbors=5).fit(points).kneighbors(points)
    np.testing.assert_array_equal(counts, np.bincount(idx.ravel(), minlength=len(points)))
    assert np.all(counts >= 1)


def test_independent_of_block_sizes(points):
    ref = np.asarray(k_occurrence(points, 7, block_size=1024, key_block_size=None))
    for block, key_block in ((1, 300), (17, 33), (300, 7), (128, 1)):
        np.testing.assert_array_equal(k_occurrence(points, 7, block_size=block, key_block_size=key_block), ref)


def test_permutation_equivariant(points):
    perm = np.random.RandomState(1).permutation(len(points))
    counts = np.asarray(k_occurrence(points, 5, block_size=50))
    np.testing.assert_array_equal(np.asarray(k_occurrence(points[perm], 5, block_size=50)), counts[perm])


def test_ties_go_to_the_lower_index():
    grid = np.array([[i, j] for i in range(6) for j in range(5)], np.float32)  # many equal distances
    for key_block in (None, 4):
        np.testing.assert_array_equal(k_occurrence(grid, 3, block_size=7, key_block_size=key_block),
                                      _brute_force(grid, 3))


def test_grouped_selection_of_large_key_blocks_keeps_exactness_and_ties():
    # key blocks of >= 128 (k + 1) candidates take the two-stage (group minima, then k groups) selection
    lattice = np.array([[i, j] for i in range(40) for j in range(36)], np.float32)  # 1,440 points, many ties
    lattice = lattice[np.random.RandomState(2).permutation(len(lattice))]
    expected = _brute_force(lattice, 5)
    for block, key_block in ((256, 1024), (1000, None), (64, 700)):
        np.testing.assert_array_equal(
            k_occurrence(lattice, 5, block_size=block, key_block_size=key_block), expected)
    np.testing.assert_array_equal(k_occurrence(lattice, 4, include_self=True, key_block_size=768),
                                  _brute_force(lattice, 4, include_self=True))


def test_smallest_k_equals_a_full_top_k_with_ties_to_the_lower_index():
    from gen_jax.hubness import _smallest_k
    rows = jax.random.randint(jax.random.key(0), (64, 2048), 0, 50).astype(jnp.float32)  # heavy ties
    rows = rows.at[:, 100:300].set(jnp.inf)
    idx = 5000 + jnp.arange(2048, dtype=jnp.int32)
    d, i = _smallest_k(rows, idx, 6)
    neg, pos = jax.lax.top_k(-rows, 6)
    np.testing.assert_array_equal(d, -neg)
    np.testing.assert_array_equal(i, idx[pos])


def test_cosine_metric(points):
    np.testing.assert_array_equal(k_occurrence(points, 4, metric="cosine", block_size=100),
                                  _brute_force(points, 4, cosine=True))


def test_sharded_over_eight_devices_equals_unsharded(points):
    mesh = make_mesh()
    assert mesh.size == 8
    for n in (300, 203):  # 203: the query blocks do not divide evenly over the devices
        np.testing.assert_array_equal(k_occurrence(points[:n], 5, block_size=16, mesh=mesh),
                                      k_occurrence(points[:n], 5, block_size=1024))


def test_hub_mask_threshold_semantics():
    counts = jnp.array([49, 50, 51, 0])
    np.testing.assert_array_equal(hub_mask(counts, 50), [False, True, True, False])
    np.testing.assert_array_equal(hub_mask(counts, 50, strict=True), [False, False, True, False])


def test_bad_inputs_raise_named_errors(points):
    with pytest.raises(ShapeError, match=r"\[N, D\]"):
        k_occurrence(points[:, :, None])
    with pytest.raises(ConfigError, match="k = 300"):
        k_occurrence(points, 300)
    assert k_occurrence(points, 300, include_self=True).sum() == 300 * 300
    with pytest.raises(ConfigError, match="metric"):
        k_occurrence(points, 5, metric="l1")


def test_hub_latents_are_exactly_num_and_closer_to_the_centre():
    z = sample_hub_latents(jax.random.key(0), 70, dim=32, k=5, threshold=15, batch_size=1500)
    assert z.shape == (70, 32) and z.dtype == jnp.float32
    assert len(np.unique(np.asarray(z), axis=0)) == 70
    random_norm = np.linalg.norm(np.random.RandomState(0).randn(5000, 32), axis=1).mean()
    assert np.linalg.norm(np.asarray(z), axis=1).mean() < 0.9 * random_norm


def test_hubs_are_found_in_the_mapped_space():
    """With map_fn keeping 8 of 16 coordinates, hubs sit near the centre of those eight only."""
    z = np.asarray(sample_hub_latents(jax.random.key(1), 60, dim=16, k=5, threshold=12, batch_size=1000,
                                      map_fn=lambda z: z[:, :8]))
    assert z.shape == (60, 16)
    mapped_norm, rest_norm = np.linalg.norm(z[:, :8], axis=1).mean(), np.linalg.norm(z[:, 8:], axis=1).mean()
    ref = np.random.RandomState(2).randn(20000, 16)
    assert mapped_norm < 0.8 * np.linalg.norm(ref[:, :8], axis=1).mean()
    np.testing.assert_allclose(rest_norm, np.linalg.norm(ref[:, 8:], axis=1).mean(), rtol=0.1)


def test_sampler_reports_an_unreachable_threshold():
    with pytest.raises(ConfigError, match="lower threshold"):
        sample_hub_latents(jax.random.key(0), 1, dim=4, threshold=1000, batch_size=50, max_batches=2)
