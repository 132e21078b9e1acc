"""Rotary position embedding (Su et al., RoFormer, arXiv 2104.09864, eq. 13-15).

Pairs (2i, 2i+1) of the last axis are rotated by the angle m * theta_i with theta_i = base^(-2i/d):
    x'_{2i}   = x_{2i} cos - x_{2i+1} sin
    x'_{2i+1} = x_{2i+1} cos + x_{2i} sin
so <R_m q, R_n k> depends on positions only through m - n. `interleaved=False` rotates the two halves
(x_i, x_{i+d/2}) instead, the layout of GPT-NeoX-style code; both give the same relative property.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gen_jax.errors import ShapeError


def rope_angles(positions, dim: int, base: float = 10000.0):
    """Angles m * theta_i, shape positions.shape + (dim // 2,), in float32."""
    if dim % 2:
        raise ShapeError(f"RoPE needs an even feature size, got {dim}; use an even head/key dimension")
    inv_freq = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    return jnp.asarray(positions, jnp.float32)[..., None] * inv_freq


def apply_rope(x, positions, *, base: float = 10000.0, interleaved: bool = True):
    """Rotate features of x (..., T, D) by their positions (broadcastable to x.shape[:-1], usually (T,)).

    Computed in float32 and cast back to x.dtype, so bfloat16 inputs keep exact angles.
    """
    dim = x.shape[-1]
    angles = rope_angles(positions, dim, base)  # (..., T, D/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    out = rotate_interleaved(xf, cos, sin) if interleaved else rotate_half(xf, cos, sin)
    return out.astype(x.dtype)


def rotate_interleaved(x, cos, sin):
    """RoPE of interleaved pairs with precomputed tables: (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i+1 cos +
    x_2i sin)."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], axis=-1).reshape(x.shape)


def rotate_half(x, cos, sin):
    """RoPE in the half layout with precomputed tables: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def half_layout(w, group: int | None = None):
    """Reorder the last axis, within each group of `group` features (default: all of it), from the interleaved
    pairs (0,1),(2,3).. that `apply_rope` rotates to the halves (0,2,..|1,3,..) that `rotate_half` rotates.

    A permutation shared by queries and keys leaves every q.k unchanged; in the half layout the rotation slices
    contiguously (strided slices and the stack back cost copies on XLA:CPU).
    """
    lead, width = w.shape[:-1], w.shape[-1]
    group = width if group is None else group
    out = jnp.swapaxes(w.reshape(*lead, width // group, group // 2, 2), -1, -2)
    return out.reshape(*lead, width)


def rope_tables(positions: ArrayLike, dim: int, base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """cos and sin, positions.shape + (dim // 2,) in float32, computed once and shared by all layers.

    Concrete positions (a numpy arange) are evaluated at trace time, so a jitted step only reads two constant
    tables: XLA:CPU otherwise fuses sin/cos into every consumer (even through an optimization barrier) and
    recomputes them per element, per head and layer, forward and backward.
    """
    traced = isinstance(positions, jax.core.Tracer)
    with contextlib.nullcontext() if traced else jax.ensure_compile_time_eval():
        angles = rope_angles(positions, dim, base)
        return jnp.cos(angles), jnp.sin(angles)
