"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models", Sec. 2, eqs. 1-3).

Each set of feature vectors estimates its manifold as the union of balls around its samples, each ball's
radius the distance to the sample's k-th nearest neighbour in the same set (self excluded; k = 3):

    f(phi, Phi) = 1  if  ||phi - phi'|| <= ||phi' - NN_k(phi', Phi)||  for some phi' in Phi, else 0,
    precision = mean_{phi_g in Phi_g} f(phi_g, Phi_r),     recall = mean_{phi_r in Phi_r} f(phi_r, Phi_g).

Everything runs in blocks inside XLA (`lax.map` over query blocks, `lax.scan` over reference blocks, a
running top-(k+1) for the radii), so memory is O(block_size^2) and no N x N matrix is ever formed.
Distances are compared squared, in float32 with full-precision matmuls, after centring on the real mean
to limit cancellation in ||a||^2 + ||b||^2 - 2 a.b.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from gen_jax.errors import ShapeError


def _blocks(x_NxD: Array, block: int) -> Array:
    """Pad N up to a multiple of `block` and reshape to (num_blocks, block, D)."""
    n, d = x_NxD.shape
    nb = -(-n // block)
    x = jnp.pad(x_NxD, ((0, nb * block - n), (0, 0)))
    return x.reshape(nb, block, d)


def _pad_to(v_N: Array, nb: int, block: int, value: float) -> Array:
    return jnp.pad(v_N, (0, nb * block - v_N.shape[0]), constant_values=value).reshape(nb, block)


def _sq_dists(a_AxD: Array, b_BxD: Array) -> Array:
    ab = jnp.einsum("ad,bd->ab", a_AxD, b_BxD, precision=lax.Precision.HIGHEST)
    d2 = jnp.sum(a_AxD * a_AxD, -1)[:, None] + jnp.sum(b_BxD * b_BxD, -1)[None, :] - 2.0 * ab
    return jnp.maximum(d2, 0.0)


def _check(features: Array, name: str, k: int | None = None) -> Array:
    features = jnp.asarray(features)
    if features.ndim != 2:
        raise ShapeError(f"{name} has shape {features.shape}; expected N x D feature vectors")
    if k is not None and features.shape[0] <= k:
        raise ShapeError(f"{name} has {features.shape[0]} vectors; the k={k} nearest-neighbour radius needs "
                         f"more than k (use many more, thousands in practice)")
    return features.astype(jnp.float32)


def _block_size(block_size: int, n: int) -> int:
    if block_size < 1:
        raise ShapeError(f"block_size={block_size} must be >= 1")
    return min(int(block_size), n)


def _knn_sq_radii(x_NxD: Array, k: int, block: int) -> Array:
    """Squared distance of each row to its k-th nearest other row, via a running smallest-(k+1) merge."""
    n = x_NxD.shape[0]
    block = _block_size(block, n)
    xb = _blocks(x_NxD, block)
    valid = _pad_to(jnp.ones((n,), bool), xb.shape[0], block, False)

    def per_query_block(q_BxD):
        def step(best_BxK1, ref):
            r_BxD, r_valid_B = ref
            d2 = jnp.where(r_valid_B[None, :], _sq_dists(q_BxD, r_BxD), jnp.inf)
            merged = jnp.concatenate([best_BxK1, d2], axis=1)
            return -lax.top_k(-merged, k + 1)[0], None

        init = jnp.full((q_BxD.shape[0], k + 1), jnp.inf, q_BxD.dtype)
        best, _ = lax.scan(step, init, (xb, valid))
        # The row itself is among the (k+1) smallest at distance 0, so the (k+1)-th is the k-th neighbour.
        return best[:, k]

    return lax.map(per_query_block, xb).reshape(-1)[:n]


def _coverage(query_MxD: Array, ref_NxD: Array, ref_sq_radii_N: Array, block: int) -> Array:
    """For each query row: is it inside at least one reference ball (d^2 <= r^2)?"""
    m = query_MxD.shape[0]
    qb = _blocks(query_MxD, _block_size(block, m))
    rb_block = _block_size(block, ref_NxD.shape[0])
    rb = _blocks(ref_NxD, rb_block)
    radii = _pad_to(ref_sq_radii_N, rb.shape[0], rb_block, -jnp.inf)  # padded balls cover nothing

    def per_query_block(q_BxD):
        def step(inside_B, ref):
            r_BxD, r2_B = ref
            hit = jnp.any(_sq_dists(q_BxD, r_BxD) <= r2_B[None, :], axis=1)
            return inside_B | hit, None

        inside, _ = lax.scan(step, jnp.zeros((q_BxD.shape[0],), bool), (rb, radii))
        return inside

    return lax.map(per_query_block, qb).reshape(-1)[:m]


@partial(jax.jit, static_argnames=("k", "block_size"))
def knn_radii(features_NxD: Array, k: int = 3, *, block_size: int = 1024) -> Array:
    """Distance from each feature vector to its k-th nearest neighbour in the same set (self excluded)."""
    x = _check(features_NxD, "features_NxD", k)
    return jnp.sqrt(_knn_sq_radii(x - x.mean(0), k, block_size))


@partial(jax.jit, static_argnames=("k", "block_size"))
def manifold_membership(query_MxD: Array, reference_NxD: Array, k: int = 3, *, block_size: int = 1024) -> Array:
    """bool[M]: whether each query lies in the k-NN manifold estimate of the reference set (eq. 1)."""
    ref = _check(reference_NxD, "reference_NxD", k)
    query = _check(query_MxD, "query_MxD")
    if query.shape[1] != ref.shape[1]:
        raise ShapeError(f"feature dimensions differ: {query.shape[1]} vs {ref.shape[1]}")
    center = ref.mean(0)
    ref, query = ref - center, query - center
    return _coverage(query, ref, _knn_sq_radii(ref, k, block_size), block_size)


@partial(jax.jit, static_argnames=("k", "block_size"))
def improved_precision_recall(real_NxD: Array, fake_MxD: Array, k: int = 3, *, block_size: int = 1024
                              ) -> tuple[Array, Array]:
    """(precision, recall) of generated features `fake_MxD` against real features `real_NxD` (eqs. 2-3)."""
    real = _check(real_NxD, "real_NxD", k)
    fake = _check(fake_MxD, "fake_MxD", k)
    if real.shape[1] != fake.shape[1]:
        raise ShapeError(f"feature dimensions differ: real {real.shape[1]} vs fake {fake.shape[1]}; use the same "
                         "feature extractor for both")
    n, m = real.shape[0], fake.shape[0]
    center = real.mean(0)
    real, fake = real - center, fake - center
    # Exact integer counts; the division is float32 (XLA may use a reciprocal: 1 - 6e-8 for all-True).
    precision = _coverage(fake, real, _knn_sq_radii(real, k, block_size), block_size).sum(dtype=jnp.int32) / m
    recall = _coverage(real, fake, _knn_sq_radii(fake, k, block_size), block_size).sum(dtype=jnp.int32) / n
    return precision, recall


def mnist_precision_recall(real_uint8: np.ndarray, fake_uint8: np.ndarray, k: int = 3, *,
                           block_size: int = 1024, cache_dir: str | None = None) -> tuple[float, float]:
    """Improved precision and recall of uint8 MNIST-shaped images on the project classifier's features."""
    from gen_jax.metrics.classifier import get_mnist_feature_extractor  # trains/loads on first use only
    features_fn, _ = get_mnist_feature_extractor(cache_dir)
    p, r = improved_precision_recall(features_fn(real_uint8), features_fn(fake_uint8), k=k, block_size=block_size)
    return float(p), float(r)
