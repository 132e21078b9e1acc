"""RoFormer encoder (Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding",
arXiv 2104.09864) in Flax NNX, numerically equal to HF transformers' `RoFormerModel` /
`RoFormerForMaskedLM` and to the bert4keras models behind RoFormer-Sim.

BERT without absolute position embeddings: token + segment embeddings -> LayerNorm (-> optional projection
when embedding_size != hidden_size), then post-LN blocks whose self-attention rotates q and k (eq. 13-15:
interleaved pairs (2i, 2i+1) turned by m * theta_i, theta_i = 10000^(-2i/d)), exact-erf GELU feed-forward.
Heads: a Dense pooler on [CLS] (linear in RoFormer-Sim, tanh in plain BERT) and an MLM head
(Dense + GELU + LayerNorm, then the tied word embeddings plus a bias).

Masks: padding masks and an optional [B, T, T] mask; `unilm_mask` builds the UniLM seq2seq mask
(Dong et al. 2019) from segment ids. Incremental decoding keeps a fixed-size per-layer K/V cache (keys
stored already rotated, so every new token only needs its own RoPE position).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.nn import cpu_blas
from gen_jax.nn.dense import flat_dot, flat_dot_general
from gen_jax.nn.rope import half_layout, rope_tables, rotate_half

_NEG = -1e30  # finite, so a fully masked row gives a uniform softmax rather than NaN


@dataclasses.dataclass(frozen=True)
class RoFormerConfig:
    """Sizes and numerics of a RoFormer. Defaults: RoFormer-Sim base (chinese_roformer-sim-char)."""
    vocab_size: int = 12000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    embedding_size: int | None = None  # None: same as hidden_size (no projection)
    type_vocab_size: int = 2
    max_positions: int = 512  # only bounds the KV cache defaults; RoPE itself has no table
    layer_norm_eps: float = 1e-12  # HF: 1e-12; bert4keras checkpoints were trained with 1e-7
    rotary_value: bool = False  # HF option: also rotate the values
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    pooler: str | None = "linear"  # "linear" (RoFormer-Sim), "tanh" (BERT) or None (no pooler)
    with_mlm: bool = True
    initializer_range: float = 0.02
    compute_dtype: str = "float32"  # "bfloat16" computes in bf16; params stay float32
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}; "
                              "pick sizes with hidden_size = num_heads * head_dim")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"head_dim {self.hidden_size // self.num_heads} is odd; RoPE rotates pairs, "
                              "so hidden_size / num_heads must be even")
        if self.pooler not in ("linear", "tanh", None):
            raise ConfigError(f"pooler must be 'linear', 'tanh' or None, got {self.pooler!r}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"compute_dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def emb_size(self) -> int:
        return self.embedding_size or self.hidden_size


PRESETS: dict[str, RoFormerConfig] = {
    # chinese_roformer-sim-char(-ft)_L-12_H-768_A-12
    "base": RoFormerConfig(),
    # chinese_roformer-sim-char(-ft)_L-6_H-384_A-6
    "small": RoFormerConfig(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536),
    # for tests and CPU smoke runs
    "tiny": RoFormerConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                           max_positions=64),
}


class RoFormerOutput(NamedTuple):
    """Encoder outputs: final hidden states [B, T, D], the pooled [CLS] vector [B, D] (None without a pooler)
    and the updated key/value cache (None when no `cache` was passed)."""
    hidden_BxTxD: jax.Array
    pooled_BxD: jax.Array | None
    cache: dict | None


def unilm_mask(segment_ids_BxT: jax.Array, padding_mask_BxT: jax.Array | None = None) -> jax.Array:
    """UniLM seq2seq mask [B, T, T]: query i may attend key j iff cumsum(seg)[j] <= cumsum(seg)[i].

    Segment 0 (the source) attends itself bidirectionally and never the target; target tokens (segment 1)
    attend the whole source and the target causally. Padding keys (padding_mask False) are excluded.
    """
    if segment_ids_BxT.ndim != 2:
        raise ShapeError(f"unilm_mask wants segment ids [B, T], got shape {segment_ids_BxT.shape}")
    idx_BxT = jnp.cumsum(segment_ids_BxT, axis=1)
    mask_BxTxT = idx_BxT[:, None, :] <= idx_BxT[:, :, None]
    if padding_mask_BxT is not None:
        mask_BxTxT = mask_BxTxT & padding_mask_BxT[:, None, :].astype(bool)
    return mask_BxTxT


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class _RngStream:
    """Hands out distinct dropout keys (or None when deterministic) without module state."""

    def __init__(self, rng: jax.Array | None):
        self.rng, self.count = rng, 0

    def __call__(self) -> jax.Array | None:
        if self.rng is None:
            return None
        self.count += 1
        return jax.random.fold_in(self.rng, self.count)


def _dense(din: int, dout: int, cfg: RoFormerConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, dtype=_dtype(cfg), param_dtype=jnp.float32, dot_general=flat_dot_general,
                      kernel_init=nnx.initializers.truncated_normal(cfg.initializer_range), rngs=rngs)


def _norm(dim: int, cfg: RoFormerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=cfg.layer_norm_eps, dtype=_dtype(cfg), param_dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


def _layer_norm(norm: nnx.LayerNorm, x):
    """`norm(x)`; on one CPU device in float32, a fused custom call (cpu_blas.layer_norm: one pass forward and
    one backward, against XLA's several)."""
    scale, bias = norm.scale, norm.bias
    if (scale is not None and bias is not None and norm.dtype is None and x.shape[-1] % 16 == 0
            and cpu_blas.enabled(x, scale[...], bias[...])):
        return cpu_blas.layer_norm(x, scale[...], bias[...], norm.epsilon)
    return norm(x)


def _dtype(cfg: RoFormerConfig):
    # float32 config -> dtype None: compute in the dtype the params arrive in (the training core may cast
    # them to bf16); otherwise force the configured compute dtype.
    return None if cfg.compute_dtype == "float32" else jnp.dtype(cfg.compute_dtype)


class RoFormerLayer(nnx.Module):
    """Post-LN block: x = LN(x + Attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, cfg: RoFormerConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.cfg = cfg
        self.query = _dense(d, d, cfg, rngs)
        self.key = _dense(d, d, cfg, rngs)
        self.value = _dense(d, d, cfg, rngs)
        self.attn_out = _dense(d, d, cfg, rngs)
        self.attn_norm = _norm(d, cfg, rngs)
        self.ffn_in = _dense(d, cfg.intermediate_size, cfg, rngs)
        self.ffn_out = _dense(cfg.intermediate_size, d, cfg, rngs)
        self.ffn_norm = _norm(d, cfg, rngs)

    def __call__(self, x_BxTxD, rope, mask_BxTxS, kv_cache, cache_index, rng: _RngStream):
        cfg = self.cfg
        B, T, _ = x_BxTxD.shape
        N, H = cfg.num_heads, cfg.head_dim
        # q, k (and v with rotary_value) come out in each head's half layout (see half_layout): RoPE then
        # needs contiguous halves only, and q.k is unchanged because q and k share the permutation.
        q_BxTxNxH = _rope_half(self._project(self.query, x_BxTxD, True).reshape(B, T, N, H), *rope)
        k_BxTxNxH = _rope_half(self._project(self.key, x_BxTxD, True).reshape(B, T, N, H), *rope)
        v_BxTxNxH = self._project(self.value, x_BxTxD, cfg.rotary_value).reshape(B, T, N, H)
        if cfg.rotary_value:
            v_BxTxNxH = _rope_half(v_BxTxNxH, *rope)
        blas = kv_cache is None and cpu_blas.enabled(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH)
        if kv_cache is not None:
            # the cache is [B, N, S, H] per layer: attention reads it without a transposed copy, and the
            # decode loop updates it in place
            k_cache, v_cache = kv_cache
            k_BxNxSxH = jax.lax.dynamic_update_slice_in_dim(
                k_cache, k_BxTxNxH.transpose(0, 2, 1, 3).astype(k_cache.dtype), cache_index, axis=2)
            v_BxNxSxH = jax.lax.dynamic_update_slice_in_dim(
                v_cache, v_BxTxNxH.transpose(0, 2, 1, 3).astype(v_cache.dtype), cache_index, axis=2)
            new_cache = (k_BxNxSxH, v_BxNxSxH)
            scores_BxNxTxS = jnp.einsum("btnh,bnsh->bnts", q_BxTxNxH, k_BxNxSxH.astype(q_BxTxNxH.dtype),
                                        preferred_element_type=jnp.float32)
        else:
            v_BxNxSxH, new_cache = None, None
            if blas:
                # head-major copies, then batched BLAS products (their VJPs are BLAS products too): B32 T512
                # fwd+bwd 11.4 -> 11.0 s on one core of the AVX-512 Xeon (benchmarks/RESULTS.md)
                v_BxNxSxH = v_BxTxNxH.transpose(0, 2, 1, 3)
                scores_BxNxTxS = cpu_blas.matmul(q_BxTxNxH.transpose(0, 2, 1, 3), k_BxTxNxH.transpose(0, 2, 1, 3),
                                                 trans_b=True)
            else:
                scores_BxNxTxS = jnp.einsum("btnh,bsnh->bnts", q_BxTxNxH, k_BxTxNxH, preferred_element_type=jnp.float32)
        if blas:  # scale, mask and softmax as one pass over the scores, and one for the gradient
            probs_BxNxTxS = cpu_blas.attention_softmax(scores_BxNxTxS, 1.0 / math.sqrt(cfg.head_dim), mask_BxTxS)
        else:
            scores_BxNxTxS = scores_BxNxTxS / jnp.sqrt(cfg.head_dim)
            if mask_BxTxS is not None:  # [B, T or 1, S]
                scores_BxNxTxS = jnp.where(mask_BxTxS[:, None], scores_BxNxTxS, _NEG)
            probs_BxNxTxS = jax.nn.softmax(scores_BxNxTxS, axis=-1)
        probs_BxNxTxS = _dropout(probs_BxNxTxS, cfg.attention_dropout_rate, rng())
        if blas:
            ctx_BxTxNxH = cpu_blas.matmul(probs_BxNxTxS, v_BxNxSxH).transpose(0, 2, 1, 3)
        elif v_BxNxSxH is not None:
            ctx_BxTxNxH = jnp.einsum("bnts,bnsh->btnh", probs_BxNxTxS.astype(v_BxNxSxH.dtype), v_BxNxSxH)
        else:
            ctx_BxTxNxH = jnp.einsum("bnts,bsnh->btnh", probs_BxNxTxS.astype(v_BxTxNxH.dtype), v_BxTxNxH)
        ctx_BxTxD = ctx_BxTxNxH.reshape(B, T, cfg.hidden_size)
        if cfg.rotary_value:  # ctx is in the half layout too: permute attn_out's input rows to match
            attn_BxTxD = self._project(self.attn_out, ctx_BxTxD, True, rows=True)
        else:
            attn_BxTxD = self.attn_out(ctx_BxTxD)
        x_BxTxD = _layer_norm(self.attn_norm, x_BxTxD + _dropout(attn_BxTxD, cfg.dropout_rate, rng()))
        h_BxTxF = _gelu(self.ffn_in(x_BxTxD))
        y_BxTxD = _dropout(self.ffn_out(h_BxTxF), cfg.dropout_rate, rng())
        return _layer_norm(self.ffn_norm, x_BxTxD + y_BxTxD), new_cache

    def _project(self, lin: nnx.Linear, x, half: bool, rows: bool = False):
        """`lin(x)`, with the kernel's output columns (or input rows) in the half layout when `half`."""
        if not half:
            return lin(x)
        w, b = lin.kernel[...], lin.bias[...]
        H = self.cfg.head_dim
        if rows:
            w = half_layout(w.T, H).T
        else:
            w, b = half_layout(w, H), half_layout(b, H)
        dtype = lin.dtype or jnp.result_type(x, w, b)  # as nnx.Linear promotes
        return flat_dot(x.astype(dtype), w.astype(dtype)) + b.astype(dtype)


def _rope_tables(positions_BxT, head_dim: int):
    """cos and sin [B or 1, T, 1, H/2] of the RoPE angles, computed once for all layers."""
    cos, sin = rope_tables(positions_BxT, head_dim)
    return cos[:, :, None], sin[:, :, None]


def _rope_half(x_BxTxNxH, cos, sin):
    """RoPE in the half layout, in float32 (as apply_rope)."""
    return rotate_half(x_BxTxNxH.astype(jnp.float32), cos, sin).astype(x_BxTxNxH.dtype)


def _gelu(x):
    """Exact GELU as torch computes it, x/2 (1 + erf(x / sqrt 2)): XLA's erf is far cheaper than the erfc of
    jax.nn.gelu(approximate=False), and it matches HF to rounding."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class RoFormer(nnx.Module):
    """RoFormer encoder with optional pooler and MLM head.

    Call: `model(token_ids_BxT, segment_ids_BxT, padding_mask_BxT=..., attention_mask_BxTxT=...)` ->
    `RoFormerOutput(hidden_BxTxD, pooled_BxD, cache)`; `model.mlm_logits(hidden)` -> [B, T, V] float32.
    """

    def __init__(self, config: RoFormerConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        init = nnx.initializers.truncated_normal(cfg.initializer_range)
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.emb_size, dtype=_dtype(cfg), param_dtype=jnp.float32,
                                         embedding_init=init, rngs=rngs)
        self.segment_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.emb_size, dtype=_dtype(cfg),
                                            param_dtype=jnp.float32, embedding_init=init, rngs=rngs)
        self.embed_norm = _norm(cfg.emb_size, cfg, rngs)
        self.embed_project = (_dense(cfg.emb_size, cfg.hidden_size, cfg, rngs)
                              if cfg.emb_size != cfg.hidden_size else None)
        self.layers = nnx.List([RoFormerLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.pooler = _dense(cfg.hidden_size, cfg.hidden_size, cfg, rngs) if cfg.pooler else None
        if cfg.with_mlm:
            self.mlm_dense = _dense(cfg.hidden_size, cfg.emb_size, cfg, rngs)
            self.mlm_norm = _norm(cfg.emb_size, cfg, rngs)
            self.mlm_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))
        else:
            self.mlm_dense = self.mlm_norm = self.mlm_bias = None

    def init_cache(self, batch_size: int, max_len: int | None = None, dtype: Any = None) -> dict:
        """Empty KV cache: "k" and "v", tuples with one [B, N, S, H] array per layer (heads before slots, so
        attention reads them without a transposed copy; one array per layer, so a decode loop updates each in
        place), plus "valid" [B, S] (which slots hold real keys)."""
        cfg = self.config
        S = max_len or cfg.max_positions
        dtype = dtype or (_dtype(cfg) or jnp.float32)
        shape = (batch_size, cfg.num_heads, S, cfg.head_dim)
        return {"k": tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                "v": tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                "valid": jnp.zeros((batch_size, S), bool)}

    def __call__(self, token_ids_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None, *,
                 padding_mask_BxT: jax.Array | None = None, attention_mask_BxTxT: jax.Array | None = None,
                 positions_BxT: jax.Array | None = None, cache: dict | None = None,
                 cache_index: jax.Array | int = 0, dropout_rng: jax.Array | None = None) -> RoFormerOutput:
        """Encode tokens.

        Without a cache: attention is masked by `attention_mask_BxTxT` (True = may attend; e.g. `unilm_mask`)
        and/or `padding_mask_BxT` (False keys are ignored). Positions default to 0..T-1.
        With a cache (see `init_cache`): the T new tokens are written into slots [cache_index, cache_index+T)
        and attend every valid slot of the cache up to their own (causally among the new ones), or, when
        `attention_mask_BxTxT` is given, the [B, T, S] mask over all S cache slots. Positions then default to
        cache_index + 0..T-1 and should be passed when rows have different prompt lengths.
        `dropout_rng=None` is deterministic (evaluation).
        """
        cfg = self.config
        if token_ids_BxT.ndim != 2:
            raise ShapeError(f"token ids must be [B, T], got shape {token_ids_BxT.shape}")
        B, T = token_ids_BxT.shape
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.zeros_like(token_ids_BxT)
        if segment_ids_BxT.shape != (B, T):
            raise ShapeError(f"segment ids {segment_ids_BxT.shape} must match token ids {(B, T)}")
        rng = _RngStream(dropout_rng)

        x = self.word_embeddings(token_ids_BxT) + self.segment_embeddings(segment_ids_BxT)
        x = _dropout(_layer_norm(self.embed_norm, x), cfg.dropout_rate, rng())
        if self.embed_project is not None:
            x = self.embed_project(x)

        if cache is None:
            if positions_BxT is None:
                # concrete (numpy), so the RoPE tables are constants of the compiled step; jnp.arange would be
                # traced, and XLA:CPU then recomputes sin/cos inside every RoPE fusion, forward and backward
                positions_BxT = np.arange(T)[None]
            # no [B, T, T] mask is materialized unless one is given: a padding mask alone is [B, 1, T], and
            # without either the scores are not masked at all
            mask = None
            if attention_mask_BxTxT is not None:
                mask = attention_mask_BxTxT.astype(bool)
                if mask.shape != (B, T, T):
                    raise ShapeError(f"attention mask {mask.shape} must be [B, T, T] = {(B, T, T)}")
            if padding_mask_BxT is not None:
                if padding_mask_BxT.shape != (B, T):
                    raise ShapeError(f"padding mask {padding_mask_BxT.shape} must be [B, T] = {(B, T)}")
                pad = padding_mask_BxT[:, None, :].astype(bool)
                mask = pad if mask is None else mask & pad
        else:
            S = cache["k"][0].shape[2]
            if positions_BxT is None:
                positions_BxT = jnp.broadcast_to(cache_index + jnp.arange(T), (B, T))
            new_valid = jnp.ones((B, T), bool) if padding_mask_BxT is None else padding_mask_BxT.astype(bool)
            valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache["valid"], new_valid, cache_index, axis=1)
            if attention_mask_BxTxT is None:
                slot_S = jnp.arange(S)
                causal_TxS = slot_S[None, :] <= (cache_index + jnp.arange(T))[:, None]
                mask = causal_TxS[None] & valid_BxS[:, None, :]
            else:
                mask = attention_mask_BxTxT.astype(bool) & valid_BxS[:, None, :]
            if mask.shape != (B, T, S):
                raise ShapeError(f"attention mask {mask.shape} must be [B, T, S] = {(B, T, S)} with a cache")

        rope = _rope_tables(positions_BxT, cfg.head_dim)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache["k"][i], cache["v"][i])
            x, kv = layer(x, rope, mask, kv, cache_index, rng)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        new_cache = None if cache is None else {"k": tuple(new_k), "v": tuple(new_v), "valid": valid_BxS}
        return RoFormerOutput(x, self.pool(x) if self.pooler is not None else None, new_cache)

    def pool(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """Pooler on the [CLS] (first) token: Dense, then linear or tanh."""
        if self.pooler is None:
            raise ConfigError("this RoFormer has no pooler; build it with RoFormerConfig(pooler='linear')")
        y = self.pooler(hidden_BxTxD[:, 0])
        return jnp.tanh(y) if self.config.pooler == "tanh" else y

    def mlm_logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """MLM head: LN(gelu(Dense(h))) @ word_embeddings^T + bias, float32 logits [B, T, V]."""
        if self.mlm_dense is None:
            raise ConfigError("this RoFormer has no MLM head; build it with RoFormerConfig(with_mlm=True)")
        h = _layer_norm(self.mlm_norm, _gelu(self.mlm_dense(hidden_BxTxD)))
        emb_VxE = self.word_embeddings.embedding[...]
        logits = jnp.einsum("...e,ve->...v", h, emb_VxE.astype(h.dtype), preferred_element_type=jnp.float32)
        return logits + self.mlm_bias[...].astype(jnp.float32)


def build(config: RoFormerConfig | str = "base", seed: int = 0, **overrides) -> RoFormer:
    """A randomly initialised RoFormer from a config or preset name, with field overrides."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ConfigError(f"unknown RoFormer preset {config!r}; choose one of {sorted(PRESETS)}")
        config = PRESETS[config]
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return RoFormer(config, rngs=nnx.Rngs(seed))
