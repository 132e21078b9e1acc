"""Gated attention unit (GAU) of FLASH (Hua, Dai, Liu, Le, "Transformer Quality in Linear Time",
ICML 2022, sec. 2, eq. 1-5) in Flax NNX.

    H = norm(X)                          (pre-norm: ScaleNorm or LayerNorm)
    U = silu(H W_u), V = silu(H W_v)     [T, e], e = 2d           (eq. 1-2)
    Z = silu(H W_z)                      [T, s], s = 128          (eq. 4, one shared Z)
    Q = Z * gamma_q + beta_q, K = Z * gamma_k + beta_k, then RoPE on both
    A = normalized relu^2(Q K^T / sqrt(s)) (or softmax_plus)      (eq. 5)
    O = X + (U * (A V)) W_o
FLASH-Quad uses the full A; FLASH (sec. 3.2, eq. 6-8) makes four maps Q^quad, K^quad, Q^lin, K^lin from the
same Z and uses `mixed_chunk_attention`. Params are float32; `compute_dtype` sets the matmul dtype.
Speed on XLA:CPU: the q/k maps are produced in RoPE's half layout (W_z's output columns and the scale/offset
permuted at use, the stored params keep the interleaved layout) from cos/sin tables built once per forward
(`rope_tables`), as one elementwise pass over Z per map (`rope_maps`); q.k is unchanged.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from gen_jax.errors import ShapeError
from gen_jax.flash.chunk_attention import mixed_chunk_attention, quadratic_attention
from gen_jax.flash.configs import FlashConfig
from gen_jax.nn.dense import flat_dot, flat_dot_general
from gen_jax.nn.rope import half_layout, rope_tables


def compute_dtype(name: str):
    """float32 -> None: compute in whatever dtype the params arrive in (the training core may cast them)."""
    return None if name == "float32" else jnp.dtype(name)


class ScaleNorm(nnx.Module):
    """ScaleNorm (Nguyen & Salazar 2019): g * x / ||x||, one scalar g initialised to sqrt(d)."""

    def __init__(self, dim: int, *, eps: float = 1e-5):
        self.eps = eps
        self.scale = nnx.Param(jnp.full((), math.sqrt(dim), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        # rsqrt of a floored square sum: finite gradients even for an all-zero input
        inv_norm = jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(xf), axis=-1, keepdims=True), self.eps ** 2))
        return (xf * (self.scale[...].astype(jnp.float32) * inv_norm)).astype(x.dtype)


def rope_maps(z_BxTxS: jax.Array, scale_HxS: jax.Array, offset_HxS: jax.Array, cos: jax.Array,
              sin: jax.Array) -> tuple[jax.Array, ...]:
    """RoPE(z * scale_h + offset_h) for each map h, all in the half layout, computed in float32 and cast back
    to z's dtype (as `gen_jax.nn.rope.apply_rope`, whose interleaved result this is up to `half_layout`).

    In the half layout RoPE(x) = x * [cos, cos] + swap(x) * [-sin, sin] with swap(x1, x2) = (x2, x1), and
    swap(z * g + b) = swap(z) * swap(g) + swap(b), so map h is z * A_h + swap(z) * B_h + C_h with small
    [T, S] tables A, B, C: one elementwise pass over z per map, no concatenate of rotated halves.
    """
    swap = lambda a: jnp.concatenate([a[..., a.shape[-1] // 2:], a[..., :a.shape[-1] // 2]], axis=-1)
    cc = jnp.concatenate([cos, cos], axis=-1)[..., None, :, :]  # [..., 1, T, S]: broadcast over maps
    ss = jnp.concatenate([-sin, sin], axis=-1)[..., None, :, :]
    H, dtype = scale_HxS.shape[0], z_BxTxS.dtype
    if dtype != jnp.float32:  # round z * scale + offset to z's dtype first, as the plain formula does
        xs = [(z_BxTxS * scale_HxS[h] + offset_HxS[h]).astype(jnp.float32) for h in range(H)]
        return tuple((x * cc[..., 0, :, :] + swap(x) * ss[..., 0, :, :]).astype(dtype) for x in xs)
    g, b = scale_HxS[:, None], offset_HxS[:, None]  # [H, 1, S]
    a_tab, b_tab, c_tab = g * cc, swap(g) * ss, b * cc + swap(b) * ss  # [..., H, T, S]
    zs = swap(z_BxTxS)
    return tuple(z_BxTxS * a_tab[..., h, :, :] + zs * b_tab[..., h, :, :] + c_tab[..., h, :, :] for h in range(H))


def make_norm(kind: str, dim: int, dtype, rngs: nnx.Rngs) -> nnx.Module:
    if kind == "scalenorm":
        return ScaleNorm(dim)
    return nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def dense(din: int, dout: int, std: float, dtype, rngs: nnx.Rngs, *, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      dot_general=flat_dot_general, kernel_init=nnx.initializers.truncated_normal(std), rngs=rngs)


class GAUProjections(NamedTuple):
    """What a GAU computes before attention, all [B, T, .] in the compute dtype.

    qk: the RoPE-rotated maps, (q_quad, k_quad, q_lin, k_lin) for FLASH or (q, k) for FLASH-Quad, with their
        key axis in the half layout of `half_layout` (a permutation shared by all of them, so every q.k, the
        attention and the decoding state K^lin^T V are what the interleaved layout gives).
    """
    u: jax.Array
    v: jax.Array
    qk: tuple[jax.Array, ...]


class GAU(nnx.Module):
    """One gated attention unit with residual: `gau(x_BxTxD, mask=..., positions=...) -> x_BxTxD`."""

    def __init__(self, cfg: FlashConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, e, s = cfg.d_model, cfg.expansion_size, cfg.key_size
        dtype = compute_dtype(cfg.compute_dtype)
        self.norm = make_norm(cfg.norm, d, dtype, rngs)
        self.proj_in = dense(d, 2 * e + s, cfg.init_std, dtype, rngs)  # [W_u | W_v | W_z]
        self.proj_out = dense(e, d, cfg.init_std, dtype, rngs)
        num_maps = 4 if cfg.kind == "flash" else 2
        self.qk_scale = nnx.Param(cfg.init_std * jax.random.normal(rngs.params(), (num_maps, s), jnp.float32))
        self.qk_offset = nnx.Param(jnp.zeros((num_maps, s), jnp.float32))

    def project(self, x_BxTxD: jax.Array, positions: ArrayLike | None = None,
                rope: tuple[jax.Array, jax.Array] | None = None) -> GAUProjections:
        """U, V and the rotated Q/K maps of eq. 1-4; positions broadcastable to [B, T], or precomputed
        `rope = rope_tables(positions, key_size, base)` (one pair shared by all layers)."""
        cfg = self.cfg
        e, s = cfg.expansion_size, cfg.key_size
        if rope is None:
            if positions is None:
                raise ShapeError("GAU.project needs positions or precomputed rope tables")
            rope = rope_tables(positions, s, cfg.rope_base)
        # W_z's columns (and the per-map scale/offset) in the half layout: RoPE then slices contiguously.
        kernel, bias_param = self.proj_in.kernel[...], self.proj_in.bias
        bias = jnp.zeros(kernel.shape[-1], kernel.dtype) if bias_param is None else bias_param[...]
        kernel = jnp.concatenate([kernel[:, :2 * e], half_layout(kernel[:, 2 * e:])], axis=-1)
        bias = jnp.concatenate([bias[:2 * e], half_layout(bias[2 * e:])], axis=-1)
        h = self.norm(x_BxTxD)
        dtype = self.proj_in.dtype or jnp.result_type(h, kernel, bias)  # as nnx.Linear promotes
        h = jax.nn.silu(flat_dot(h.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype))
        u_BxTxE, v_BxTxE, z_BxTxS = h[..., :e], h[..., e:2 * e], h[..., 2 * e:]
        # the scale/offset are rounded to z's dtype first, as z * scale + offset computes in that dtype
        scale = half_layout(self.qk_scale[...]).astype(z_BxTxS.dtype)
        offset = half_layout(self.qk_offset[...]).astype(z_BxTxS.dtype)
        qk = rope_maps(z_BxTxS, scale, offset, *rope)
        return GAUProjections(u_BxTxE, v_BxTxE, qk)

    def finish(self, x_BxTxD: jax.Array, u_BxTxE: jax.Array, attn_BxTxE: jax.Array) -> jax.Array:
        """O = X + (U * AV) W_o."""
        y = self.proj_out(u_BxTxE * attn_BxTxE.astype(u_BxTxE.dtype))
        return x_BxTxD + y.astype(x_BxTxD.dtype)

    def __call__(self, x_BxTxD: jax.Array, *, mask: jax.Array | None = None,
                 positions: ArrayLike | None = None,
                 rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        cfg = self.cfg
        if x_BxTxD.ndim != 3 or x_BxTxD.shape[-1] != cfg.d_model:
            raise ShapeError(f"GAU input must be [B, T, {cfg.d_model}], got shape {x_BxTxD.shape}")
        T = x_BxTxD.shape[1]
        if positions is None and rope is None:
            positions = np.arange(T)[None]  # concrete: the RoPE tables become constants
        p = self.project(x_BxTxD, positions, rope)
        if cfg.kind == "flash":
            q_quad, k_quad, q_lin, k_lin = p.qk
            attn = mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, p.v, chunk_size=cfg.chunk_size,
                                         causal=cfg.causal, mask=mask, normalizer=cfg.normalizer,
                                         norm_const=cfg.attn_const)
        else:
            q, k = p.qk
            attn = quadratic_attention(q, k, p.v, causal=cfg.causal, mask=mask, normalizer=cfg.normalizer,
                                       norm_const=cfg.attn_const)
        return self.finish(x_BxTxD, p.u, attn)
