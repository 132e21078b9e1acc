"""Similar-sentence generation and re-ranking with RoFormer-Sim (kexue.fm post 8454, test/generate.py of the
original).

Prompt `[CLS] text [SEP]` (segment 0); generated tokens get segment 1. Under the UniLM mask the prompt never
attends the generated tokens, so its K/V are computed once (prefill) and each new token attends the prompt
plus the tokens before it: exactly causal decoding with a KV cache, RoPE positions continuing after the
prompt. n candidates are drawn by nucleus sampling (top-p, `gen_jax.nn.sampling`: no sort of the vocabulary) in
one batch, the whole decode loop being one
compiled `lax.while_loop` that stops when every row has emitted [SEP] or after `max_new` tokens. On the host
the candidates are decoded, deduplicated, copies of the input dropped, and re-ranked by the cosine of their
sentence vectors (pooled [CLS]) to the input's.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.nn.sampling import nucleus_sample
from gen_jax.roformer.model import RoFormer
from gen_jax.roformer_sim.losses import l2_normalize, sentence_vectors


@functools.partial(jax.jit, static_argnames=("graphdef", "n", "max_new"))
def sample_candidates(graphdef: nnx.GraphDef, state, prompt_ids_T: jax.Array, rng: jax.Array, *, n: int,
                      max_new: int, top_p: float | jax.Array, sep_id: int | jax.Array, pad_id: int | jax.Array = 0,
                      banned_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """n sampled continuations of one prompt `[CLS] text [SEP]`, as one compiled program.

    Returns tokens [n, max_new] (after a row's [SEP]: pad_id) and the number of generated tokens per row
    (its [SEP] included). `banned_ids` are never sampled (e.g. [PAD] [UNK] [CLS] [MASK]).
    """
    model: RoFormer = nnx.merge(graphdef, state)
    Tp = prompt_ids_T.shape[0]
    S = Tp + max_new
    # prefill: the prompt attends itself bidirectionally (segment 0 of the UniLM mask)
    cache = model.init_cache(1, S)
    prompt_mask_1xTpxS = jnp.broadcast_to(jnp.arange(S) < Tp, (1, Tp, S))
    out = model(prompt_ids_T[None], jnp.zeros((1, Tp), jnp.int32), attention_mask_BxTxT=prompt_mask_1xTpxS,
                cache=cache, cache_index=0)
    last_1xV = model.mlm_logits(out.hidden_BxTxD[:, -1:])[:, 0]
    cache = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), out.cache)  # every leaf is batch-major
    logits_NxV = jnp.repeat(last_1xV, n, axis=0)
    ban_V = jnp.zeros(logits_NxV.shape[-1], bool)
    if banned_ids is not None:
        ban_V = ban_V.at[banned_ids].set(True)

    def cond(carry):
        step, _, _, _, done_N, _ = carry
        return (step < max_new) & ~jnp.all(done_N)

    def body(carry):
        step, cache, logits_NxV, tokens_NxM, done_N, rng = carry
        rng, k = jax.random.split(rng)
        tok_N = nucleus_sample(k, jnp.where(ban_V, -jnp.inf, logits_NxV), top_p).astype(jnp.int32)
        tok_N = jnp.where(done_N, pad_id, tok_N)
        tokens_NxM = jax.lax.dynamic_update_slice_in_dim(tokens_NxM, tok_N[:, None], step, axis=1)
        done_N = done_N | (tok_N == sep_id)
        out = model(tok_N[:, None], jnp.ones((n, 1), jnp.int32), cache=cache, cache_index=Tp + step)
        logits_NxV = model.mlm_logits(out.hidden_BxTxD)[:, 0]
        return step + 1, out.cache, logits_NxV, tokens_NxM, done_N, rng

    init = (jnp.int32(0), cache, logits_NxV, jnp.full((n, max_new), pad_id, jnp.int32), jnp.zeros(n, bool), rng)
    _, _, _, tokens_NxM, _, _ = jax.lax.while_loop(cond, body, init)
    is_sep = tokens_NxM == sep_id
    lengths_N = jnp.where(is_sep.any(axis=1), jnp.argmax(is_sep, axis=1) + 1, max_new)
    return tokens_NxM, lengths_N


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _vectors(graphdef, state, ids_BxT, mask_BxT):
    return l2_normalize(sentence_vectors(nnx.merge(graphdef, state), ids_BxT, mask_BxT))


def encode_texts(model: RoFormer, tokenizer, texts: Sequence[str], *, maxlen: int = 64,
                 batch_size: int = 64) -> np.ndarray:
    """Unit sentence vectors [N, D] of texts (`[CLS] text [SEP]`, pooled [CLS]); fixed [batch, maxlen]
    shapes so one compile serves every call. Usable as `encode_fn` of `sts.evaluate_spearman`."""
    graphdef, state = nnx.split(model)
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i:i + batch_size])
        enc = tokenizer.encode_batch(chunk + [""] * (batch_size - len(chunk)), maxlen=maxlen, pad_to=maxlen)
        v = _vectors(graphdef, state, jnp.asarray(enc["token_ids"]), jnp.asarray(enc["padding_mask"]))
        out.append(np.asarray(v)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)


def similar_sentences(model: RoFormer, tokenizer, text: str, rng: jax.Array, *, n: int = 100, k: int = 20,
                      top_p: float = 0.95, maxlen: int = 64, mask_positions: Sequence[int] = (),
                      ) -> list[tuple[str, float]]:
    """Generate n candidates similar to `text`, keep distinct ones that differ from it, and return the top k
    as (sentence, cosine to the input), best first.

    mask_positions: indices into the text's tokens (0 = first token after [CLS]) replaced by [MASK] in the
    prompt, steering the model to rephrase those parts.
    """
    if not model.config.with_mlm or not model.config.pooler:
        raise ConfigError("generation needs a RoFormer with an MLM head and a pooler (with_mlm=True, pooler='linear')")
    ids, _ = tokenizer.encode(text, maxlen=maxlen)
    ids = np.asarray(ids, np.int32)
    for p in mask_positions:
        if not 0 <= p < len(ids) - 2:
            raise ShapeError(f"mask position {p} is outside the text's {len(ids) - 2} tokens")
        ids[p + 1] = tokenizer.mask_id
    graphdef, state = nnx.split(model)
    banned = jnp.asarray([tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.mask_id], jnp.int32)
    tokens, lengths = sample_candidates(graphdef, state, jnp.asarray(ids), rng, n=n, max_new=maxlen,
                                        top_p=top_p, sep_id=tokenizer.sep_id, pad_id=tokenizer.pad_id,
                                        banned_ids=banned)
    tokens = np.asarray(tokens)
    source = tokenizer.decode(tokenizer.encode(text)[0])
    seen, cands = {source}, []
    for row in tokens:
        s = tokenizer.decode(row, stop_at_sep=True)
        if s and s not in seen:
            seen.add(s)
            cands.append(s)
    if not cands:
        return []
    vecs = encode_texts(model, tokenizer, [text] + cands, maxlen=maxlen)
    scores = vecs[1:] @ vecs[0]
    order = np.argsort(-scores)[:k]
    return [(cands[i], float(scores[i])) for i in order]
