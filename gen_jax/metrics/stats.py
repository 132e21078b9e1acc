"""Small statistics used by several papers: Spearman rank correlation and bits/dim.

Both are plain functions of arrays that work under `jax.jit` and `jax.vmap`.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import Array

from gen_jax.errors import ShapeError


def average_ranks(x_N: Array) -> Array:
    """1-based ranks of `x_N`, tied values sharing the mean of the ranks they span (scipy's 'average')."""
    sorted_N = jnp.sort(x_N)
    # Values equal to x occupy sorted positions [left, right); their ranks are left+1 .. right.
    left = jnp.searchsorted(sorted_N, x_N, side="left")
    right = jnp.searchsorted(sorted_N, x_N, side="right")
    return (left + right + 1).astype(jnp.result_type(float)) / 2.0


def spearman(x: Array, y: Array) -> Array:
    """Spearman's rank correlation: Pearson correlation of the average ranks of `x` and `y`.

    Ties get average ranks, as in `scipy.stats.spearmanr`. A constant input has no defined correlation
    and gives NaN (as SciPy does).
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim != 1 or x.shape != y.shape:
        raise ShapeError(f"spearman needs two 1-D arrays of equal length; got shapes {x.shape} and {y.shape} "
                         "(flatten them or vmap over the leading axis)")
    if x.shape[0] < 2:
        raise ShapeError(f"spearman needs at least 2 pairs; got {x.shape[0]}")
    rx = average_ranks(x)
    ry = average_ranks(y)
    rx = rx - rx.mean()
    ry = ry - ry.mean()
    return jnp.sum(rx * ry) / jnp.sqrt(jnp.sum(rx * rx) * jnp.sum(ry * ry))


def bits_per_dim_from_nats(nll_nats: Array | float, num_dims: int) -> Array:
    """Negative log-likelihood of one example in nats -> bits per dimension: nll / (num_dims * ln 2).

    `num_dims` is the number of data dimensions of one example (H * W * C for an image). For models of
    images scaled to [-1, 1] the nll must already be that of the discrete 0..255 data (or of dequantized
    data in [0, 256)), not a density on the rescaled values.
    """
    if int(num_dims) <= 0:
        raise ShapeError(f"num_dims={num_dims} must be the positive number of dimensions per example")
    return jnp.asarray(nll_nats) / (int(num_dims) * math.log(2.0))
