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
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gen_jax.errors import ShapeError
from gen_jax.flash.chunk_attention import mixed_chunk_attention, quadratic_attention
from gen_jax.flash.configs import FlashConfig
from gen_jax.nn.rope import apply_rope


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


def make_norm(kind: str, dim: int, dtype, rngs: nnx.Rngs) -> nnx.Module:
    if kind == "scalenorm":
        return ScaleNorm(dim)
    return nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def dense(din: int, dout: int, std: float, dtype, rngs: nnx.Rngs, *, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.truncated_normal(std), rngs=rngs)


class GAUProjections(NamedTuple):
    """What a GAU computes before attention, all [B, T, .] in the compute dtype.

    qk: the RoPE-rotated maps, (q_quad, k_quad, q_lin, k_lin) for FLASH or (q, k) for FLASH-Quad.
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

    def project(self, x_BxTxD: jax.Array, positions: jax.Array) -> GAUProjections:
        """U, V and the rotated Q/K maps of eq. 1-4; positions broadcastable to [B, T]."""
        cfg = self.cfg
        e = cfg.expansion_size
        h = jax.nn.silu(self.proj_in(self.norm(x_BxTxD)))
        u_BxTxE, v_BxTxE, z_BxTxS = h[..., :e], h[..., e:2 * e], h[..., 2 * e:]
        scale = self.qk_scale[...].astype(z_BxTxS.dtype)
        offset = self.qk_offset[...].astype(z_BxTxS.dtype)
        qk_HxBxTxS = z_BxTxS[None] * scale[:, None, None] + offset[:, None, None]
        qk_HxBxTxS = apply_rope(qk_HxBxTxS, positions, base=cfg.rope_base)
        return GAUProjections(u_BxTxE, v_BxTxE, tuple(qk_HxBxTxS))

    def finish(self, x_BxTxD: jax.Array, u_BxTxE: jax.Array, attn_BxTxE: jax.Array) -> jax.Array:
        """O = X + (U * AV) W_o."""
        y = self.proj_out(u_BxTxE * attn_BxTxE.astype(u_BxTxE.dtype))
        return x_BxTxD + y.astype(x_BxTxD.dtype)

    def __call__(self, x_BxTxD: jax.Array, *, mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        if x_BxTxD.ndim != 3 or x_BxTxD.shape[-1] != cfg.d_model:
            raise ShapeError(f"GAU input must be [B, T, {cfg.d_model}], got shape {x_BxTxD.shape}")
        T = x_BxTxD.shape[1]
        if positions is None:
            positions = jnp.arange(T)[None]
        p = self.project(x_BxTxD, positions)
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
