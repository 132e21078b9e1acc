"""Language models of FLASH (Hua et al., ICML 2022): `FlashLM` (GAU stack, kind "flash" or "flash_quad",
causal-LM or masked-LM head) and the paper's `TransformerPP` baseline (sec. 4: RoPE + GLU FFN, softmax
attention via `jax.nn.dot_product_attention`), plus losses and a `loss_fn` for the training core.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.flash.configs import FlashConfig, TransformerConfig
from gen_jax.flash.gau import GAU, compute_dtype, dense, make_norm
from gen_jax.nn.rope import rope_tables, rotate_interleaved


def _check_tokens(tokens_BxT: jax.Array, mask: jax.Array | None) -> None:
    if tokens_BxT.ndim != 2:
        raise ShapeError(f"tokens must be [B, T] integers, got shape {tokens_BxT.shape}")
    if mask is not None and mask.shape != tokens_BxT.shape:
        raise ShapeError(f"mask {mask.shape} must match tokens {tokens_BxT.shape} (True = real token)")


class _LMHead(nnx.Module):
    """Causal-LM head (tied embeddings or an untied Dense) or BERT-style MLM head (Dense, GELU, norm, tied)."""

    def __init__(self, cfg: FlashConfig | TransformerConfig, *, rngs: nnx.Rngs):
        d, dtype = cfg.d_model, compute_dtype(cfg.compute_dtype)
        self.tied = cfg.tie_embeddings
        self.final_norm = make_norm(cfg.norm, d, dtype, rngs)
        self.out: nnx.Linear | None = None if cfg.tie_embeddings else dense(
            d, cfg.vocab_size, cfg.init_std, dtype, rngs, use_bias=False)
        self.mlm_dense: nnx.Linear | None  # the MLM head, or None for a causal LM
        self.mlm_norm: nnx.Module | None
        self.mlm_bias: nnx.Param | None
        if cfg.task == "mlm":
            self.mlm_dense = dense(d, d, cfg.init_std, dtype, rngs)
            self.mlm_norm = make_norm(cfg.norm, d, dtype, rngs)
            self.mlm_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))
        else:
            self.mlm_dense = self.mlm_norm = self.mlm_bias = None

    def __call__(self, h_BxTxD: jax.Array, embed: nnx.Embed) -> jax.Array:
        h = self.final_norm(h_BxTxD)
        if self.mlm_dense is not None and self.mlm_norm is not None:  # the MLM head (set together)
            h = self.mlm_norm(jax.nn.gelu(self.mlm_dense(h)))
        if self.out is not None:
            logits = self.out(h).astype(jnp.float32)
        else:
            emb_VxD = embed.embedding[...]
            logits = jnp.einsum("...d,vd->...v", h, emb_VxD.astype(h.dtype), preferred_element_type=jnp.float32)
        if self.mlm_bias is not None:
            logits = logits + self.mlm_bias[...].astype(jnp.float32)
        return logits


class FlashLM(nnx.Module):
    """Token embedding -> num_layers GAUs -> norm -> LM head. `model(tokens_BxT, mask=...) -> logits_BxTxV`
    (float32). kind "flash": mixed chunk attention (linear in T); "flash_quad": full attention."""

    def __init__(self, config: FlashConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=compute_dtype(cfg.compute_dtype),
                               param_dtype=jnp.float32, embedding_init=nnx.initializers.normal(cfg.init_std),
                               rngs=rngs)
        self.layers = nnx.List([GAU(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.head = _LMHead(cfg, rngs=rngs)

    def hidden(self, tokens_BxT: jax.Array, *, mask: jax.Array | None = None,
               positions: ArrayLike | None = None) -> jax.Array:
        """Final hidden states [B, T, d] before the head's norm."""
        _check_tokens(tokens_BxT, mask)
        x = self.embed(tokens_BxT)
        if positions is None:
            positions = np.arange(tokens_BxT.shape[1])[None]  # concrete: constant RoPE tables
        rope = rope_tables(positions, self.config.key_size, self.config.rope_base)  # once for all layers
        for layer in self.layers:
            if self.config.remat:
                x = nnx.remat(lambda lyr, y, m, r: lyr(y, mask=m, rope=r))(layer, x, mask, rope)
            else:
                x = layer(x, mask=mask, rope=rope)
        return x

    def __call__(self, tokens_BxT: jax.Array, *, mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return self.head(self.hidden(tokens_BxT, mask=mask, positions=positions), self.embed)


class TransformerBlock(nnx.Module):
    """Pre-norm block: x += Wo MHA(RoPE q, RoPE k, v); x += W2 (silu(x W1) * x W3) (GLU FFN, no biases)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, dtype = cfg.d_model, cfg.ffn_size, compute_dtype(cfg.compute_dtype)
        self.attn_norm = make_norm(cfg.norm, d, dtype, rngs)
        self.qkv = dense(d, 3 * d, cfg.init_std, dtype, rngs, use_bias=False)
        self.attn_out = dense(d, d, cfg.init_std, dtype, rngs, use_bias=False)
        self.ffn_norm = make_norm(cfg.norm, d, dtype, rngs)
        self.ffn_in = dense(d, 2 * f, cfg.init_std, dtype, rngs, use_bias=False)
        self.ffn_out = dense(f, d, cfg.init_std, dtype, rngs, use_bias=False)

    def __call__(self, x_BxTxD: jax.Array, *, mask: jax.Array | None = None,
                 positions: ArrayLike | None = None, rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """`rope`: the (cos, sin) tables of `rope_tables(positions[..., None], head_dim, rope_base)`, computed once
        for all blocks by `TransformerPP`; without it they are made here from `positions` (default 0..T-1)."""
        cfg = self.cfg
        B, T, d = x_BxTxD.shape
        N, H = cfg.num_heads, cfg.head_dim
        if rope is None:
            rope = _transformer_rope_tables(T, positions, cfg)
        qkv = self.qkv(self.attn_norm(x_BxTxD)).reshape(B, T, 3, N, H)
        # RoPE in float32 as apply_rope (whose interleaved result this is)
        q = rotate_interleaved(qkv[:, :, 0].astype(jnp.float32), *rope).astype(qkv.dtype)
        k = rotate_interleaved(qkv[:, :, 1].astype(jnp.float32), *rope).astype(qkv.dtype)
        v = qkv[:, :, 2]
        attn_mask = None if mask is None else mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T] keys
        ctx = jax.nn.dot_product_attention(q, k, v, mask=attn_mask, is_causal=cfg.causal,
                                           implementation=cfg.attention_impl)
        x_BxTxD = x_BxTxD + self.attn_out(ctx.reshape(B, T, d)).astype(x_BxTxD.dtype)
        gate, lin = jnp.split(self.ffn_in(self.ffn_norm(x_BxTxD)), 2, axis=-1)
        return x_BxTxD + self.ffn_out(jax.nn.silu(gate) * lin).astype(x_BxTxD.dtype)


class TransformerPP(nnx.Module):
    """Transformer++ LM with the same embedding/head as `FlashLM`: `model(tokens_BxT, mask=...) -> logits`."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=compute_dtype(cfg.compute_dtype),
                               param_dtype=jnp.float32, embedding_init=nnx.initializers.normal(cfg.init_std),
                               rngs=rngs)
        self.layers = nnx.List([TransformerBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.head = _LMHead(cfg, rngs=rngs)

    def __call__(self, tokens_BxT: jax.Array, *, mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        _check_tokens(tokens_BxT, mask)
        x = self.embed(tokens_BxT)
        rope = _transformer_rope_tables(tokens_BxT.shape[1], positions, self.config)  # once for all layers
        for layer in self.layers:
            if self.config.remat:
                x = nnx.remat(lambda lyr, y, m, r: lyr(y, mask=m, rope=r))(layer, x, mask, rope)
            else:
                x = layer(x, mask=mask, rope=rope)
        return self.head(x, self.embed)


def _transformer_rope_tables(T: int, positions: ArrayLike | None, cfg: TransformerConfig):
    """(cos, sin) [B or 1, T, 1, H/2]; default positions are concrete, so the tables are constants of the compiled
    step (traced ones make XLA:CPU recompute sin/cos inside every RoPE fusion)."""
    if positions is None:
        positions = np.arange(T)[None]
    elif not isinstance(positions, (np.ndarray, jax.Array)):
        positions = np.asarray(positions)
    return rope_tables(positions[..., None], cfg.head_dim, cfg.rope_base)  # [..., None]: over heads of [B, T, N, H]


def build(config: FlashConfig | TransformerConfig, seed: int = 0) -> FlashLM | TransformerPP:
    """A randomly initialised FlashLM or TransformerPP from its config."""
    if isinstance(config, FlashConfig):
        return FlashLM(config, rngs=nnx.Rngs(seed))
    if isinstance(config, TransformerConfig):
        return TransformerPP(config, rngs=nnx.Rngs(seed))
    raise ConfigError(f"build wants a FlashConfig or TransformerConfig, got {type(config).__name__}")


def count_params(model_or_params: Any) -> int:
    """Number of parameters of an NNX module (its nnx.Param leaves) or of a params pytree."""
    tree = nnx.state(model_or_params, nnx.Param) if isinstance(model_or_params, nnx.Module) else model_or_params
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def lm_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy in nats per counted token (mask: 1 = count). Bits per char = nats / ln 2."""
    if logits_BxTxV.shape[:-1] != targets_BxT.shape:
        raise ShapeError(f"logits {logits_BxTxV.shape} and targets {targets_BxT.shape} disagree; "
                         "logits must be targets.shape + (vocab,)")
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if mask_BxT is None:
        return nll.mean()
    m = mask_BxT.astype(jnp.float32)
    return (nll * m).sum() / jnp.maximum(m.sum(), 1.0)


def nats_to_bits(nats: jax.Array | float) -> jax.Array | float:
    """Convert a loss in nats (natural log) to bits: nats / ln 2."""
    return nats / math.log(2.0)


def mlm_corrupt(rng: jax.Array, tokens_BxT: jax.Array, *, mask_token_id: int, vocab_size: int,
                rate: float = 0.15, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """BERT corruption: pick `rate` of the real tokens; of those 80% -> [MASK], 10% random, 10% kept.

    Returns (inputs_BxT, selected_BxT bool), the loss counts the selected positions.
    """
    k_sel, k_kind, k_rand = jax.random.split(rng, 3)
    selected = jax.random.bernoulli(k_sel, rate, tokens_BxT.shape)
    if mask is not None:
        selected = selected & mask.astype(bool)
    u = jax.random.uniform(k_kind, tokens_BxT.shape)
    random_tok = jax.random.randint(k_rand, tokens_BxT.shape, 0, vocab_size, tokens_BxT.dtype)
    inputs = jnp.where(selected & (u < 0.8), mask_token_id, tokens_BxT)
    inputs = jnp.where(selected & (u >= 0.8) & (u < 0.9), random_tok, inputs)
    return inputs, selected


def make_loss_fn(graphdef: nnx.GraphDef, *, task: str = "clm", mask_token_id: int | None = None,
                 vocab_size: int | None = None, mlm_rate: float = 0.15) -> Callable:
    """`loss_fn(params, batch, rng) -> (loss, metrics)` for `gen_jax.train.make_update_fn`.

    clm: batch {"tokens": int [B, T + 1], optional "mask": [B, T + 1]}; predicts tokens[:, 1:] from
    tokens[:, :-1]. mlm: batch {"tokens": [B, T], optional "mask"}; corrupts with `mlm_corrupt`.
    Metrics: nats and bits per token.
    """
    if task not in ("clm", "mlm"):
        raise ConfigError(f"task must be 'clm' (causal LM) or 'mlm' (masked LM), got {task!r}")
    corrupt: Callable | None = None  # set for "mlm"
    if task == "mlm":
        if mask_token_id is None or vocab_size is None:
            raise ConfigError("task='mlm' needs mask_token_id and vocab_size for the corruption")
        corrupt = functools.partial(mlm_corrupt, mask_token_id=mask_token_id, vocab_size=vocab_size, rate=mlm_rate)

    def loss_fn(params, batch, rng):
        model = nnx.merge(graphdef, params)
        tokens, mask = batch["tokens"], batch.get("mask")
        if corrupt is None:  # "clm"
            in_mask = None if mask is None else mask[:, :-1]
            logits = model(tokens[:, :-1], mask=in_mask)
            loss = lm_loss(logits, tokens[:, 1:], None if mask is None else mask[:, 1:])
        else:
            inputs, selected = corrupt(rng, tokens, mask=mask)
            logits = model(inputs, mask=mask)
            loss = lm_loss(logits, tokens, selected)
        return loss, {"nats_per_token": loss, "bits_per_token": nats_to_bits(loss)}

    return loss_fn
