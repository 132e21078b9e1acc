"""Attention of FLASH (Hua, Dai, Liu, Le, "Transformer Quality in Linear Time", ICML 2022) as pure
functions of arrays.

Notation (paper sec. 2-3): T tokens, key size S (s = 128 in the paper), value size E (e = 2d), chunks of C
tokens, G = ceil(T / C) chunks. Every function takes a padding mask `mask_BxT` (True = real token) and
works for any T (sequences are padded to G * C internally).

Quadratic attention (GAU, eq. 5; FLASH-Quad):  out_i = sum_j A_ij v_j.
Mixed chunk attention (FLASH, eq. 6-8), for a query i in chunk g:
    out_i = sum_{j in chunk g, visible} A^quad_ij v_j  +  (q^lin_i . sum_{h in H(g)} sum_{j in chunk h} k^lin_j v_j^T) / N_i
with H(g) = all chunks other than g (bidirectional) or the chunks before g (causal: an exclusive prefix sum
over chunks, computed with a cumsum). Padded keys are zeroed before any sum, so they never reach the
global state K^lin^T V nor any normalizer count.

Normalizers (`normalizer=`); n_i = number of real keys query i sees in total (causal: real tokens at
positions <= i; bidirectional: real tokens in the sequence), independent of how the sequence is chunked:
- "relu2_n": A^quad_ij = relu(q_i.k_j / sqrt(S))^2 / n_i and the linear part is divided by n_i too
  (paper sec. 2, "(1/n) relu^2(QK^T/sqrt(s))"). Causal rows divide by their own prefix count (i + 1
  without padding), not by the sequence length T as the paper's appendix code and flash-pytorch do; that
  is what lets cached decoding reproduce the parallel pass.
- "relu2_const": relu(q_i.k_j / sqrt(S))^2 / c and linear part / c, with a length-independent constant c
  (`norm_const`; the GAU defaults it to the chunk size C, the paper's 1/C for the local part).
- "softmax_plus" (Su, kexue.fm posts 8823/9019/9052): the local/full part is a softmax over the visible
  keys with logits log(m_i)/log(512) * q_i.k_j / sqrt(S), where m_i is the number of keys that softmax sees
  (FLASH: real keys of the chunk visible to i; FLASH-Quad: n_i); the linear part is divided by n_i.
All three allow exact cached decoding in causal mode: every normalizer depends only on the query's own
prefix (n_i = i + 1, m_i = i mod C + 1) or on a constant. The paper's code normalizer 1/T (same T for
every causal row) does not, which is why it is not offered.

The linear part carries no 1/sqrt(S) (paper eq. 7). Scores and the global sums are accumulated in float32
whatever the input dtype; outputs come back in v's dtype. Outputs at padded query positions are zero.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.nn import cpu_blas

NORMALIZERS = ("relu2_n", "relu2_const", "softmax_plus")
# Which normalizers give a causal model whose token-by-token decoding equals its parallel forward pass.
EXACT_DECODING = {"relu2_n": True, "relu2_const": True, "softmax_plus": True}
SOFTMAX_PLUS_BASE = 512.0  # Su's training length: log(n)/log(512) is 1 at n = 512
_NEG = -1e30
# Causal chunks computed as this many row blocks (block r sees keys up to its last row): 2 blocks skip a
# quarter of the local products; on XLA:CPU the local part's fwd+bwd measured 1.1-1.2x faster than one
# block (C = 256), 4 blocks no faster than 2.
CAUSAL_ROW_BLOCKS = 2


def _bgemm(spec: str, a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """The batched product `einsum(spec, a, b)` with float32 accumulation; a BLAS call on CPU where
    `gen_jax.nn.cpu_blas` is enabled (`trans_a` / `trans_b` say which operand the spec contracts on its
    row axis / column axis)."""
    if cpu_blas.enabled(a, b):  # FLASH d256 T512 train step 1264 -> 1218 ms on one Xeon core
        return cpu_blas.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _check_normalizer(normalizer: str, norm_const: float | None) -> float:
    """Validate the normalizer; returns the constant c of "relu2_const" (1.0, unused, for the others)."""
    if normalizer not in NORMALIZERS:
        raise ConfigError(f"unknown attention normalizer {normalizer!r}; choose one of {NORMALIZERS}")
    if normalizer == "relu2_const" and (norm_const is None or norm_const <= 0):
        raise ConfigError(f"normalizer 'relu2_const' needs a positive norm_const (got {norm_const!r}); "
                          "pass e.g. norm_const=chunk_size")
    return float(norm_const) if normalizer == "relu2_const" and norm_const is not None else 1.0


def _check_shapes(qs: dict, v_BxTxE: jax.Array, mask_BxT: jax.Array | None) -> None:
    if v_BxTxE.ndim != 3:
        raise ShapeError(f"v must be [B, T, E], got shape {v_BxTxE.shape}")
    B, T, _ = v_BxTxE.shape
    shape = None
    for name, x in qs.items():
        if x.ndim != 3 or x.shape[:2] != (B, T):
            raise ShapeError(f"{name} must be [B, T, S] with B, T = {(B, T)} of v, got shape {x.shape}")
        if shape is not None and x.shape != shape:
            raise ShapeError(f"{name} has shape {x.shape} but the other queries/keys have {shape}; "
                             "all of q_quad, k_quad, q_lin, k_lin must share [B, T, S]")
        shape = x.shape
    if mask_BxT is not None and mask_BxT.shape != (B, T):
        raise ShapeError(f"mask must be [B, T] = {(B, T)} (True = real token), got shape {mask_BxT.shape}")


def relu2_weights(scores: jax.Array, visible: jax.Array, denom: jax.Array | float) -> jax.Array:
    """relu(scores)^2 / denom on visible entries, 0 elsewhere (float32)."""
    return jnp.where(visible, jnp.square(jax.nn.relu(scores)), 0.0) / denom


def softmax_plus_weights(scores: jax.Array, visible: jax.Array, count: jax.Array) -> jax.Array:
    """Softmax over the visible keys of logits log(count)/log(512) * scores (scores already / sqrt(S)).

    `count` (broadcast over the key axis) is the number of visible keys; rows with none give zeros.
    """
    scale = jnp.log(jnp.maximum(count, 1.0)) / math.log(SOFTMAX_PLUS_BASE)
    logits = jnp.where(visible, scores * scale, _NEG)
    w = jax.nn.softmax(logits, axis=-1)
    return jnp.where(visible, w, 0.0)


def visible_counts(mask_BxT: jax.Array, causal: bool) -> jax.Array:
    """n_i [B, T] float32: how many real keys query i sees in total (at least 1, to divide safely)."""
    m = mask_BxT.astype(jnp.float32)
    n = jnp.cumsum(m, axis=1) if causal else jnp.broadcast_to(m.sum(1, keepdims=True), m.shape)
    return jnp.maximum(n, 1.0)


def quadratic_attention(q_BxTxS: jax.Array, k_BxTxS: jax.Array, v_BxTxE: jax.Array, *, causal: bool,
                        mask: jax.Array | None = None, normalizer: str = "relu2_n",
                        norm_const: float | None = None) -> jax.Array:
    """Full T x T attention of a GAU (FLASH-Quad), [B, T, E]. See the module docstring for normalizers."""
    const = _check_normalizer(normalizer, norm_const)
    _check_shapes({"q": q_BxTxS, "k": k_BxTxS}, v_BxTxE, mask)
    B, T, S = q_BxTxS.shape
    mask_BxT = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
    visible_BxTxT = mask_BxT[:, None, :]
    if causal:
        visible_BxTxT = visible_BxTxT & jnp.tril(jnp.ones((T, T), bool))[None]
    scores = jnp.einsum("bis,bjs->bij", q_BxTxS, k_BxTxS, preferred_element_type=jnp.float32) / math.sqrt(S)
    n_BxTx1 = visible_counts(mask_BxT, causal)[..., None]
    if normalizer == "relu2_n":
        w = relu2_weights(scores, visible_BxTxT, n_BxTx1)
    elif normalizer == "relu2_const":
        w = relu2_weights(scores, visible_BxTxT, const)
    else:
        w = softmax_plus_weights(scores, visible_BxTxT, n_BxTx1)
    out = jnp.einsum("bij,bje->bie", w.astype(v_BxTxE.dtype), v_BxTxE, preferred_element_type=jnp.float32)
    return jnp.where(mask_BxT[..., None], out, 0.0).astype(v_BxTxE.dtype)


def mixed_chunk_attention(q_quad: jax.Array, k_quad: jax.Array, q_lin: jax.Array, k_lin: jax.Array,
                          v: jax.Array, *, chunk_size: int, causal: bool, mask: jax.Array | None = None,
                          normalizer: str = "relu2_n", norm_const: float | None = None) -> jax.Array:
    """FLASH mixed chunk attention (paper eq. 6-8), [B, T, E], in O(T C (S + E) + T S E) time.

    q_quad, k_quad, q_lin, k_lin: [B, T, S]; v: [B, T, E]; mask: [B, T] bool (True = real token) or None.
    Quadratic attention inside each chunk of `chunk_size` tokens (einsums over [B, G, C, C]) plus linear
    attention across chunks through the per-chunk states K^lin_g^T V_g [B, G, S, E] (bidirectional: their
    sum over the other chunks; causal: their exclusive prefix sum).
    """
    const = _check_normalizer(normalizer, norm_const)
    _check_shapes({"q_quad": q_quad, "k_quad": k_quad, "q_lin": q_lin, "k_lin": k_lin}, v, mask)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    B, T, S = q_quad.shape
    E = v.shape[-1]
    C = chunk_size
    G = -(-T // C)
    pad = G * C - T
    mask_BxT = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
    if pad:
        padT = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        q_quad, k_quad, q_lin, k_lin, v, mask_BxT = map(padT, (q_quad, k_quad, q_lin, k_lin, v, mask_BxT))
    n_BxT = visible_counts(mask_BxT, causal)  # >= 1 on padded rows too, so no 0/0 even in gradients
    chunk = lambda x: x.reshape(B, G, C, *x.shape[2:])
    valid_BxGxC = chunk(mask_BxT)
    # Zero padded keys/values: they then add nothing to the local scores' AV nor to K^lin^T V.
    k_quad = jnp.where(mask_BxT[..., None], k_quad, 0)
    k_lin = jnp.where(mask_BxT[..., None], k_lin, 0)
    v = jnp.where(mask_BxT[..., None], v, 0)
    qq, kq, ql, kl, vv = map(chunk, (q_quad, k_quad, q_lin, k_lin, v))
    n_BxGxCx1 = chunk(n_BxT)[..., None]

    # Local (quadratic) part inside each chunk. Causal: the chunk's rows in CAUSAL_ROW_BLOCKS blocks, each
    # against the keys up to its last row only, so the all-masked upper-right blocks are never computed
    # (3/4 of the products for 2 blocks; the same numbers).
    visible_BxGxCxC = valid_BxGxC[:, :, None, :]
    if causal:
        visible_BxGxCxC = visible_BxGxCxC & jnp.tril(jnp.ones((C, C), bool))
    blocks = CAUSAL_ROW_BLOCKS if causal and C % CAUSAL_ROW_BLOCKS == 0 else 1
    rows = C // blocks
    parts = []
    for r in range(blocks):
        if blocks == 1:  # (non-causal visibility is [B, G, 1, C]: no rows to slice)
            q_r, keys, vis_r, n_r = qq, C, visible_BxGxCxC, n_BxGxCx1
        else:
            row, keys = slice(r * rows, (r + 1) * rows), (r + 1) * rows
            q_r, vis_r, n_r = qq[:, :, row], visible_BxGxCxC[:, :, row, :keys], n_BxGxCx1[:, :, row]
        scores = _bgemm("bgis,bgjs->bgij", q_r, kq[:, :, :keys], trans_b=True) / math.sqrt(S)
        if normalizer == "relu2_n":
            w = relu2_weights(scores, vis_r, n_r)
        elif normalizer == "relu2_const":
            w = relu2_weights(scores, vis_r, const)
        else:  # causal: the keys cut off are invisible to these rows, so the count is unchanged
            w = softmax_plus_weights(scores, vis_r, vis_r.sum(-1, keepdims=True).astype(jnp.float32))
        parts.append(_bgemm("bgij,bgje->bgie", w.astype(vv.dtype), vv[:, :, :keys]))
    local = parts[0] if blocks == 1 else jnp.concatenate(parts, axis=2)

    # Global (linear) part across chunks.
    if causal:
        # Chunk g reads the states of chunks h < g: the last chunk's state is never read and the first chunk
        # reads none, so neither product is computed (at G = 2 that halves the linear part).
        kv_BxGxSxE = _bgemm("bgjs,bgje->bgse", kl[:, :-1], vv[:, :-1], trans_a=True)
        ctx_BxGxSxE = jnp.cumsum(kv_BxGxSxE, axis=1)  # for chunks 1 .. G-1
        lin = _bgemm("bgis,bgse->bgie", ql[:, 1:].astype(jnp.float32), ctx_BxGxSxE)
        lin = jnp.concatenate([jnp.zeros((B, 1, C, E), lin.dtype), lin], axis=1)
    else:
        kv_BxGxSxE = _bgemm("bgjs,bgje->bgse", kl, vv, trans_a=True)
        ctx_BxGxSxE = kv_BxGxSxE.sum(1, keepdims=True) - kv_BxGxSxE  # chunks h != g
        lin = _bgemm("bgis,bgse->bgie", ql.astype(jnp.float32), ctx_BxGxSxE)
    lin = lin / (const if normalizer == "relu2_const" else n_BxGxCx1)

    out = (local + lin).reshape(B, G * C, E)[:, :T]
    return jnp.where(mask_BxT[:, :T, None], out, 0.0).astype(v.dtype)


def dense_reference(q_quad: jax.Array, k_quad: jax.Array, q_lin: jax.Array, k_lin: jax.Array, v: jax.Array,
                    *, chunk_size: int, causal: bool, mask: jax.Array | None = None,
                    normalizer: str = "relu2_n", norm_const: float | None = None) -> jax.Array:
    """The same math as `mixed_chunk_attention`, written as one dense T x T masked attention (for tests).

    A_ij = A^quad_ij [same chunk, visible] + (q^lin_i . k^lin_j) / N_i [other chunk, visible], out = A v.
    No chunk reshapes, padding or prefix sums: it only uses chunk ids i // C.
    """
    const = _check_normalizer(normalizer, norm_const)
    _check_shapes({"q_quad": q_quad, "k_quad": k_quad, "q_lin": q_lin, "k_lin": k_lin}, v, mask)
    B, T, S = q_quad.shape
    mask_BxT = jnp.ones((B, T), bool) if mask is None else mask.astype(bool)
    pos = jnp.arange(T)
    chunk_id = pos // chunk_size
    key_ok_BxTxT = jnp.broadcast_to(mask_BxT[:, None, :], (B, T, T))
    if causal:
        key_ok_BxTxT = key_ok_BxTxT & (pos[None, :] <= pos[:, None])
    same = chunk_id[:, None] == chunk_id[None, :]
    local_vis = key_ok_BxTxT & same
    global_vis = key_ok_BxTxT & ~same
    f32 = lambda x: x.astype(jnp.float32)
    scores = jnp.einsum("bis,bjs->bij", f32(q_quad), f32(k_quad)) / math.sqrt(S)
    n = visible_counts(mask_BxT, causal)[..., None]
    lin_den: jax.Array | float = n
    if normalizer == "relu2_n":
        a_local = relu2_weights(scores, local_vis, n)
    elif normalizer == "relu2_const":
        a_local, lin_den = relu2_weights(scores, local_vis, const), const
    else:
        a_local = softmax_plus_weights(scores, local_vis, local_vis.sum(-1, keepdims=True))
    a_global = jnp.where(global_vis, jnp.einsum("bis,bjs->bij", f32(q_lin), f32(k_lin)), 0.0) / lin_den
    out = jnp.einsum("bij,bje->bie", a_local + a_global, f32(v))
    return jnp.where(mask_BxT[..., None], out, 0.0).astype(v.dtype)
