"""Hubness priors for GAN latent sampling (Liang, Su, Zhang et al., "Hubness Priors for Improving GAN
Image Synthesis" / "Exploring and Exploiting Hubness Priors for High-Quality GAN Latent Sampling",
ICML 2022, arXiv 2206.06014).

k-occurrence (Radovanovic et al. 2010; the paper's definition of N_k, sec. 3): for points x_1..x_N,

    N_k(x_i) = #{ j : x_i is among the k nearest neighbours of x_j }   (j != i unless include_self)

Hubs are points with N_k >= t (the paper: k = 5, t = 50, batches of N = 10^4 latents z ~ N(0, I), counted in
StyleGAN2's W space in the authors' notebook). The sampler draws batches, keeps the hubs, and generates
from them without truncation.

Exactness and cost: every query's k nearest neighbours are found exactly by brute force, in blocks of
`block_size` queries against blocks of `key_block_size` candidates with a running top-k merge, so peak
memory is O(block_size * key_block_size) distances (never N x N). Squared distances use
|k|^2 - 2 q.k (|q|^2 is constant per query and does not change its ranking) with matmuls at HIGHEST
precision (no TF32/bf16 passes), so the result is exact up to float32 rounding of the distances. With a
`mesh`, query blocks are split over all its devices and the per-device counts are summed (psum).

Ties: candidates at equal distance are ranked by lower index (`lax.top_k` keeps the earlier position and
the running merge keeps earlier blocks first), so the result is deterministic; permuting the input
permutes the counts exactly when no query has a tie at its k-th distance (almost surely for continuous
data). Self: excluded by index (not by distance, so duplicates of a point still count); with
`include_self=True` the point itself is always its own first neighbour and takes one of its k slots, as
sklearn's `NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)` does.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from gen_jax.errors import ConfigError, ShapeError

__all__ = ["k_occurrence", "hub_mask", "sample_hub_latents"]

_METRICS = ("l2", "cosine")


_GROUP = 128  # candidates per group in the two-stage selection of `_smallest_k`


def _smallest_k(d_bxB: jax.Array, kidx_B: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k smallest entries of each row and their indices (all of them when a row is shorter), ties to the
    lower index.

    lax.top_k over a whole row of a key block costs several times the distance matmul on CPU. When the row
    splits into groups of _GROUP, the k smallest entries lie in the k groups with the smallest minima (a group
    outside them has k group minima below its own minimum, i.e. k entries below each of its entries), so we take
    the group minima (one vectorized pass), top_k over them, and top_k over those k groups only. The chosen
    groups are put back in index order so that top_k's "earlier position wins" still means "lower index wins"."""
    b, width = d_bxB.shape
    num_groups = width // _GROUP
    if width <= k:  # nothing to select: all of them are candidates
        return d_bxB, jnp.broadcast_to(kidx_B, (b, width))
    if width % _GROUP or num_groups <= k:
        neg_d, pos = jax.lax.top_k(-d_bxB, k)
        return -neg_d, jnp.take_along_axis(jnp.broadcast_to(kidx_B, (b, width)), pos, axis=1)
    d_bxGxg = d_bxB.reshape(b, num_groups, _GROUP)
    _, groups_bxk = jax.lax.top_k(-jnp.min(d_bxGxg, axis=-1), k)
    groups_bxk = jnp.sort(groups_bxk, axis=1)
    sub_d = jnp.take_along_axis(d_bxGxg, groups_bxk[:, :, None], axis=1).reshape(b, k * _GROUP)
    sub_pos = (groups_bxk[:, :, None] * _GROUP + jnp.arange(_GROUP, dtype=jnp.int32)).reshape(b, k * _GROUP)
    neg_d, pos = jax.lax.top_k(-sub_d, k)
    return -neg_d, kidx_B[jnp.take_along_axis(sub_pos, pos, axis=1)]


def _block_neighbours(q_bxD: jax.Array, qidx_b: jax.Array, keys_KbxBkxD: jax.Array, ksq_KbxBk: jax.Array,
                      n: int, k: int, include_self: bool) -> jax.Array:
    """Indices [b, k] of each query's k nearest valid keys, ties to the lower index."""
    b = q_bxD.shape[0]
    key_block = keys_KbxBkxD.shape[1]

    def merge(carry, xs):
        best_d_bxk, best_i_bxk = carry
        keys_BkxD, ksq_Bk, start = xs
        kidx_Bk = start + jnp.arange(key_block, dtype=jnp.int32)
        d_bxBk = ksq_Bk[None, :] - 2.0 * jnp.einsum("bd,kd->bk", q_bxD, keys_BkxD,
                                                    precision=jax.lax.Precision.HIGHEST)
        d_bxBk = jnp.where(kidx_Bk[None, :] >= n, jnp.inf, d_bxBk)  # padding
        is_self = kidx_Bk[None, :] == qidx_b[:, None]
        d_bxBk = jnp.where(is_self, -jnp.inf if include_self else jnp.inf, d_bxBk)
        new_d_bxk, new_i_bxk = _smallest_k(d_bxBk, kidx_Bk, k)
        # earlier key blocks hold lower indices, so listing the running best first keeps ties to the lower index
        cand_d = jnp.concatenate([best_d_bxk, new_d_bxk], axis=1)
        cand_i = jnp.concatenate([best_i_bxk, new_i_bxk], axis=1)
        neg_d, pos = jax.lax.top_k(-cand_d, k)
        return (-neg_d, jnp.take_along_axis(cand_i, pos, axis=1)), None

    starts = jnp.arange(keys_KbxBkxD.shape[0], dtype=jnp.int32) * key_block
    init = (jnp.full((b, k), jnp.inf, q_bxD.dtype), jnp.zeros((b, k), jnp.int32))
    (_, idx_bxk), _ = jax.lax.scan(merge, init, (keys_KbxBkxD, ksq_KbxBk, starts))
    return idx_bxk


def _count(q_QbxBxD: jax.Array, qidx_QbxB: jax.Array, keys_KbxBkxD: jax.Array, ksq_KbxBk: jax.Array,
           n: int, k: int, include_self: bool) -> jax.Array:
    """k-occurrence contributions [n] of the given query blocks (padded queries have index >= n)."""

    def body(counts_N, xs):
        q_bxD, qidx_b = xs
        idx_bxk = _block_neighbours(q_bxD, qidx_b, keys_KbxBkxD, ksq_KbxBk, n, k, include_self)
        weight_bxk = jnp.broadcast_to((qidx_b < n)[:, None], idx_bxk.shape).astype(jnp.int32)
        return counts_N.at[idx_bxk.reshape(-1)].add(weight_bxk.reshape(-1)), None

    counts_N, _ = jax.lax.scan(body, jnp.zeros((n,), jnp.int32), (q_QbxBxD, qidx_QbxB))
    return counts_N


@functools.partial(jax.jit, static_argnames=("k", "include_self", "block_size", "key_block_size",
                                             "metric", "mesh"))
def _k_occurrence(points_NxD: jax.Array, *, k: int, include_self: bool, block_size: int,
                  key_block_size: int, metric: str, mesh: Mesh | None) -> jax.Array:
    n, d = points_NxD.shape
    x = points_NxD.astype(jnp.float32)
    if metric == "cosine":
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    # candidates: padded to whole key blocks
    num_kb = math.ceil(n / key_block_size)
    keys = jnp.pad(x, ((0, num_kb * key_block_size - n), (0, 0)))
    keys_KbxBkxD = keys.reshape(num_kb, key_block_size, d)
    ksq_KbxBk = jnp.sum(jnp.square(keys_KbxBkxD), axis=-1)
    # queries: padded to whole blocks, a multiple of the device count
    devices = 1 if mesh is None else mesh.size
    num_qb = math.ceil(n / (block_size * devices)) * devices
    q_QbxBxD = jnp.pad(x, ((0, num_qb * block_size - n), (0, 0))).reshape(num_qb, block_size, d)
    qidx_QbxB = jnp.arange(num_qb * block_size, dtype=jnp.int32).reshape(num_qb, block_size)
    count = functools.partial(_count, n=n, k=k, include_self=include_self)
    if mesh is None:
        return count(q_QbxBxD, qidx_QbxB, keys_KbxBkxD, ksq_KbxBk)
    axes = tuple(mesh.axis_names)

    def per_device(q, qi, kk, ks):
        return jax.lax.psum(count(q, qi, kk, ks), axes)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()),
                         out_specs=P(), check_vma=False)(q_QbxBxD, qidx_QbxB, keys_KbxBkxD, ksq_KbxBk)


def k_occurrence(points_NxD: jax.Array, k: int = 5, *, include_self: bool = False, block_size: int = 1024,
                 key_block_size: int | None = 16384, metric: str = "l2", mesh: Mesh | None = None
                 ) -> jax.Array:
    """N_k of every point, int32 [N]; sums to N k. Exact brute-force k-NN in blocks (see module doc).

    Args:
      points_NxD: the points (e.g. latents z or mapped latents w).
      k: neighbours per point.
      include_self: count each point as its own first neighbour (sklearn kneighbors(X) convention).
      block_size: queries per block; key_block_size: candidates per block (None: all N at once). Peak
        memory is about block_size * key_block_size * 4 bytes per device (plus the points).
      metric: "l2" (Euclidean) or "cosine" (Euclidean on L2-normalized points).
      mesh: split the query blocks over all devices of this mesh and sum the counts.
    """
    if points_NxD.ndim != 2:
        raise ShapeError(f"k_occurrence expects points of shape [N, D], got {points_NxD.shape}; "
                         "flatten each point to a vector first")
    n = points_NxD.shape[0]
    max_k = n if include_self else n - 1
    if not 1 <= k <= max_k:
        raise ConfigError(f"k = {k} needs 1 <= k <= {max_k} for N = {n} points "
                          f"({'including' if include_self else 'excluding'} self)")
    if metric not in _METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use one of {_METRICS}")
    if block_size < 1 or (key_block_size is not None and key_block_size < 1):
        raise ConfigError(f"block sizes must be positive, got {block_size} and {key_block_size}")
    devices = 1 if mesh is None else mesh.size
    block = min(block_size, math.ceil(n / devices))
    key_block = n if key_block_size is None else min(key_block_size, n)
    if key_block > _GROUP * k:  # whole groups for `_smallest_k` (padding keys are never chosen)
        key_block = math.ceil(key_block / _GROUP) * _GROUP
    return _k_occurrence(jnp.asarray(points_NxD), k=k, include_self=include_self, block_size=block,
                         key_block_size=key_block, metric=metric, mesh=mesh)


def hub_mask(counts_N: jax.Array, threshold: int = 50, *, strict: bool = False) -> jax.Array:
    """Boolean [N]: N_k >= threshold (the paper), or N_k > threshold with strict=True (Su's code)."""
    return counts_N > threshold if strict else counts_N >= threshold


def sample_hub_latents(rng: jax.Array, num: int, *, dim: int, k: int = 5, threshold: int = 50,
                       batch_size: int = 10_000, strict: bool = False,
                       map_fn: Callable[[jax.Array], jax.Array] | None = None, include_self: bool = False,
                       block_size: int = 1024, key_block_size: int | None = 16384, metric: str = "l2",
                       mesh: Mesh | None = None, max_batches: int = 100_000) -> jax.Array:
    """Exactly `num` hub latents z ~ N(0, I_dim), float32 [num, dim].

    Each round draws `batch_size` latents, computes N_k in z space or, with `map_fn`, in map_fn(z) space
    (e.g. a mapping network: pass a jax-traceable closure over its params), and keeps those with
    N_k >= threshold (> with strict=True). Rounds repeat until `num` are collected (about 1.4% of Gaussian
    latents are hubs at k=5, t=50, N=10^4); one compiled function per call does a round's work, the host
    only gathers the kept latents. Returns z (apply map_fn again for the mapped latents).
    """
    if num < 0 or dim < 1 or batch_size < 2:
        raise ConfigError(f"need num >= 0, dim >= 1, batch_size >= 2 (got {num}, {dim}, {batch_size})")

    @jax.jit
    def round_(key):
        z_NxD = jax.random.normal(key, (batch_size, dim), jnp.float32)
        feats = z_NxD if map_fn is None else map_fn(z_NxD)
        feats = feats.reshape(batch_size, -1)
        counts = k_occurrence(feats, k, include_self=include_self, block_size=block_size,
                              key_block_size=key_block_size, metric=metric, mesh=mesh)
        return z_NxD, hub_mask(counts, threshold, strict=strict)

    kept, total = [], 0
    for _ in range(max_batches):
        if total >= num:
            break
        rng, key = jax.random.split(rng)
        z_NxD, mask_N = jax.device_get(round_(key))
        kept.append(z_NxD[mask_N])
        total += int(mask_N.sum())
    if total < num:
        raise ConfigError(f"found only {total} of {num} hub latents in {max_batches} batches of "
                          f"{batch_size}; lower threshold={threshold}, raise batch_size, or raise max_batches")
    out = np.concatenate(kept, axis=0)[:num] if kept else np.zeros((0, dim), np.float32)
    return jnp.asarray(out)
