"""Cached autoregressive decoding for causal FLASH LMs (Hua et al., ICML 2022, sec. 3.2 / 3.3).

Mixed chunk attention makes a causal token i in chunk g see (a) the earlier tokens of its own chunk through
quadratic attention and (b) every completed chunk h < g only through the state sum_h K^lin_h^T V_h
(eq. 8's exclusive prefix). So each layer keeps, per batch row:
    kv_sum   [S, E]  sum of k^lin v^T over completed chunks (float32)
    kv_chunk [S, E]  the same sum over the current, unfinished chunk (moved into kv_sum when it completes)
    k_quad   [C, S], v [C, E]  the current chunk's quadratic keys and values (slot = position mod C)
plus one shared position counter. The key axis S of kv_sum / kv_chunk / k_quad is in the GAU's RoPE half
layout (`gen_jax.nn.rope.half_layout`), the layout `GAU.project` gives both here and in `prefill`.
A step costs O(C (S + E) + S E) per layer whatever the position: the state never grows with T (the paper's
O(b (n/C) s e) training memory drops to O(b s e) when decoding).

Exactness: every normalizer of `chunk_attention` depends only on the query's prefix (n = pos + 1, local
count = pos mod C + 1) or on a constant, so `decode_step` reproduces the parallel forward pass up to float
rounding. FLASH-Quad would need a full, growing KV cache and is not supported here.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.flash.chunk_attention import mixed_chunk_attention, relu2_weights, softmax_plus_weights
from gen_jax.flash.configs import FlashConfig
from gen_jax.flash.gau import compute_dtype
from gen_jax.nn.rope import rope_tables
from gen_jax.nn.sampling import nucleus_sample
from gen_jax.flash.models import FlashLM


def _check_decodable(cfg: FlashConfig) -> None:
    if cfg.kind != "flash":
        raise ConfigError("cached decoding needs kind='flash' (mixed chunk attention); FLASH-Quad's full "
                          "attention has no constant-size state. Build the model with kind='flash'")
    if not cfg.causal:
        raise ConfigError("cached decoding needs a causal LM; build the model with task='clm'")


def init_cache(config: FlashConfig, batch_size: int, dtype=None) -> dict:
    """Empty decoding state for `batch_size` rows: per-layer arrays stacked on a leading layer axis.

    dtype: storage dtype of the chunk's k_quad / v (default: the compute dtype); the sums stay float32.
    """
    _check_decodable(config)
    L, C, S, E = config.num_layers, config.chunk_size, config.key_size, config.expansion_size
    dtype = dtype or compute_dtype(config.compute_dtype) or jnp.float32
    return {"kv_sum": jnp.zeros((L, batch_size, S, E), jnp.float32),
            "kv_chunk": jnp.zeros((L, batch_size, S, E), jnp.float32),
            "k_quad": jnp.zeros((L, batch_size, C, S), dtype),
            "v": jnp.zeros((L, batch_size, C, E), dtype),
            "pos": jnp.zeros((), jnp.int32)}


def decode_step(model: FlashLM, cache: dict, token_B: jax.Array) -> tuple[jax.Array, dict]:
    """Feed one token per row at position cache["pos"]; returns (next-token logits [B, V] float32, cache)."""
    cfg = model.config
    _check_decodable(cfg)
    if token_B.ndim != 1:
        raise ShapeError(f"decode_step wants one token per row, shape [B], got {token_B.shape}")
    C, S = cfg.chunk_size, cfg.key_size
    pos = cache["pos"]
    slot = pos % C
    n = (pos + 1).astype(jnp.float32)
    visible_1xC = (jnp.arange(C) <= slot)[None]
    done = slot == C - 1
    x = model.embed(token_B[:, None])
    rope = rope_tables(pos[None, None], S, cfg.rope_base)
    new: dict[str, list[jax.Array]] = {"kv_sum": [], "kv_chunk": [], "k_quad": [], "v": []}
    for i, layer in enumerate(model.layers):
        p = layer.project(x, rope=rope)
        q_quad, k_quad, q_lin, k_lin = (t[:, 0] for t in p.qk)
        v_BxE = p.v[:, 0]
        kq_BxCxS = jax.lax.dynamic_update_slice_in_dim(
            cache["k_quad"][i], k_quad[:, None].astype(cache["k_quad"].dtype), slot, axis=1)
        v_BxCxE = jax.lax.dynamic_update_slice_in_dim(
            cache["v"][i], v_BxE[:, None].astype(cache["v"].dtype), slot, axis=1)
        scores_BxC = jnp.einsum("bs,bcs->bc", q_quad, kq_BxCxS.astype(q_quad.dtype),
                                preferred_element_type=jnp.float32) / math.sqrt(S)
        if cfg.normalizer == "relu2_n":
            w, lin_den = relu2_weights(scores_BxC, visible_1xC, n), n
        elif cfg.normalizer == "relu2_const":
            w, lin_den = relu2_weights(scores_BxC, visible_1xC, cfg.attn_const), cfg.attn_const
        else:
            w, lin_den = softmax_plus_weights(scores_BxC, visible_1xC, (slot + 1).astype(jnp.float32)), n
        vv = v_BxCxE.astype(v_BxE.dtype)
        local = jnp.einsum("bc,bce->be", w.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
        kv_sum = cache["kv_sum"][i]
        lin = jnp.einsum("bs,bse->be", q_lin.astype(jnp.float32), kv_sum) / lin_den
        kv_chunk = cache["kv_chunk"][i] + jnp.einsum(
            "bs,be->bse", k_lin, v_BxE, preferred_element_type=jnp.float32)
        new["kv_sum"].append(jnp.where(done, kv_sum + kv_chunk, kv_sum))
        new["kv_chunk"].append(jnp.where(done, 0.0, kv_chunk))
        new["k_quad"].append(kq_BxCxS)
        new["v"].append(v_BxCxE)
        x = layer.finish(x, p.u, (local + lin).astype(v_BxE.dtype)[:, None])
    logits = model.head(x, model.embed)[:, 0]
    cache = {k: jnp.stack(vals) for k, vals in new.items()} | {"pos": pos + 1}
    return logits, cache


def prefill(model: FlashLM, prompt_BxP: jax.Array) -> tuple[jax.Array, dict]:
    """Run the prompt in parallel (one forward pass) and build the decoding state after it.

    Returns (logits [B, V] for the token after the prompt, cache with pos = P). All rows share length P.
    """
    cfg = model.config
    _check_decodable(cfg)
    if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] < 1:
        raise ShapeError(f"prompt must be [B, P] with P >= 1, got shape {prompt_BxP.shape}")
    B, P = prompt_BxP.shape
    C = cfg.chunk_size
    full = (P // C) * C  # tokens in completed chunks
    cache = init_cache(cfg, B)
    rope = rope_tables(np.arange(P)[None], cfg.key_size, cfg.rope_base)
    x = model.embed(prompt_BxP)
    new: dict[str, list[jax.Array]] = {"kv_sum": [], "kv_chunk": [], "k_quad": [], "v": []}
    for i, layer in enumerate(model.layers):
        p = layer.project(x, rope=rope)
        q_quad, k_quad, q_lin, k_lin = p.qk
        attn = mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, p.v, chunk_size=C, causal=True,
                                     normalizer=cfg.normalizer, norm_const=cfg.attn_const)
        kv = lambda a, b: jnp.einsum("bts,bte->bse", a, b, preferred_element_type=jnp.float32)
        new["kv_sum"].append(kv(k_lin[:, :full], p.v[:, :full]))
        new["kv_chunk"].append(kv(k_lin[:, full:], p.v[:, full:]))
        new["k_quad"].append(cache["k_quad"][i].at[:, :P - full].set(k_quad[:, full:].astype(cache["k_quad"].dtype)))
        new["v"].append(cache["v"][i].at[:, :P - full].set(p.v[:, full:].astype(cache["v"].dtype)))
        x = layer.finish(x, p.u, attn)
    logits = model.head(x[:, -1:], model.embed)[:, 0]
    cache = {k: jnp.stack(vals) for k, vals in new.items()} | {"pos": jnp.asarray(P, jnp.int32)}
    return logits, cache


def sample_logits(rng: jax.Array, logits_BxV: jax.Array, temperature: float = 1.0,
                  top_p: float = 1.0) -> jax.Array:
    """Sample token ids [B]: temperature 0 is greedy; top_p < 1 keeps the smallest set of most likely
    tokens whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        return nucleus_sample(rng, logits, top_p)  # sort-free (gen_jax.nn.sampling)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("num_tokens", "temperature", "top_p"))
def _generate(graphdef, params, prompt_BxP, rng, *, num_tokens: int, temperature: float, top_p: float):
    model = nnx.merge(graphdef, params)
    logits, cache = prefill(model, prompt_BxP)

    def body(carry, key):
        logits, cache = carry
        token_B = sample_logits(key, logits, temperature, top_p)
        logits, cache = decode_step(model, cache, token_B)
        return (logits, cache), token_B

    _, tokens_NxB = jax.lax.scan(body, (logits, cache), jax.random.split(rng, num_tokens))
    return tokens_NxB.T


def generate(graphdef: nnx.GraphDef, params, prompt_BxP: ArrayLike, *, num_tokens: int, rng: jax.Array,
             temperature: float = 1.0, top_p: float = 1.0) -> jax.Array:
    """Sample `num_tokens` continuation tokens [B, num_tokens] after a prompt: a parallel prefill, then one
    `lax.scan` of constant-cost `decode_step`s, all in one compiled call."""
    return _generate(graphdef, params, jnp.asarray(prompt_BxP), rng, num_tokens=num_tokens,
                     temperature=float(temperature), top_p=float(top_p))


def make_decode_step(graphdef: nnx.GraphDef):
    """A jitted `(params, cache, token_B) -> (logits_BxV, cache)` that donates the cache."""
    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(params, cache, token_B):
        return decode_step(nnx.merge(graphdef, params), cache, token_B)
    return step
