"""Rotary position embedding (Su et al., RoFormer, arXiv 2104.09864, eq. 13-15).

Pairs (2i, 2i+1) of the last axis are rotated by the angle m * theta_i with theta_i = base^(-2i/d):
    x'_{2i}   = x_{2i} cos - x_{2i+1} sin
    x'_{2i+1} = x_{2i+1} cos + x_{2i} sin
so <R_m q, R_n k> depends on positions only through m - n. `interleaved=False` rotates the two halves
(x_i, x_{i+d/2}) instead, the layout of GPT-NeoX-style code; both give the same relative property.
"""
from __future__ import annotations

import jax.numpy as jnp

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
    if interleaved:
        x_even, x_odd = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], axis=-1)
        out = out.reshape(xf.shape)
    else:
        half = dim // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
