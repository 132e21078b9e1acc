"""BART-style whole-word corruption of the source sentence (RoFormer-Sim stage 1, kexue.fm post 8454).

Per word of the source, one uniform draw u: u < 12% -> every token of the word becomes [MASK];
12% <= u < 13.5% -> kept (selected but unchanged); 13.5% <= u < 15% -> every token becomes a random token;
otherwise unchanged. [CLS], [SEP], the target segment and padding are never touched. The original corrupts
the source of half the rows (`row_prob=0.5`); the target always stays the clean similar sentence.

`pair_rows` builds the stage-1 rows `[CLS] a [SEP] b [SEP]` and their swaps from word-segmented pairs,
with the word ids that `corrupt_words` needs.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gen_jax.errors import ConfigError, ShapeError

CLEAN, MASKED, KEPT, RANDOM = 0, 1, 2, 3


@functools.partial(jax.jit, static_argnames=("mask_id", "mask_rate", "keep_rate", "random_rate", "row_prob"))
def corrupt_words(rng: jax.Array, token_ids_BxT: jax.Array, word_ids_BxT: jax.Array, *, mask_id: int,
                  random_ids: jax.Array, mask_rate: float = 0.12, keep_rate: float = 0.015,
                  random_rate: float = 0.015, row_prob: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Whole-word corruption, jit-able.

    word_ids_BxT: word index (0 .. T-1) of each source token, -1 for tokens that must stay (specials,
    target, padding). random_ids: the ids a random replacement is drawn from (uniformly; leave out the
    specials). Each row is corrupted with probability `row_prob`.
    Returns (corrupted ids, per-token category CLEAN / MASKED / KEPT / RANDOM).
    """
    if token_ids_BxT.shape != word_ids_BxT.shape or token_ids_BxT.ndim != 2:
        raise ShapeError(f"token ids {token_ids_BxT.shape} and word ids {word_ids_BxT.shape} must both be [B, T]")
    if mask_rate + keep_rate + random_rate > 1:
        raise ConfigError("mask_rate + keep_rate + random_rate must not exceed 1")
    B, T = token_ids_BxT.shape
    k_word, k_tok, k_row = jax.random.split(rng, 3)
    u_BxW = jax.random.uniform(k_word, (B, T))  # one draw per word slot
    eligible = word_ids_BxT >= 0
    u_BxT = jnp.take_along_axis(u_BxW, jnp.clip(word_ids_BxT, 0, T - 1), axis=1)
    row_on_B = jax.random.uniform(k_row, (B,)) < row_prob
    eligible = eligible & row_on_B[:, None]
    category = jnp.select(
        [u_BxT < mask_rate, u_BxT < mask_rate + keep_rate, u_BxT < mask_rate + keep_rate + random_rate],
        [MASKED, KEPT, RANDOM], CLEAN)
    category = jnp.where(eligible, category, CLEAN).astype(jnp.int32)
    random_ids = jnp.asarray(random_ids, token_ids_BxT.dtype)
    rand_tok_BxT = random_ids[jax.random.randint(k_tok, (B, T), 0, random_ids.shape[0])]
    out = jnp.where(category == MASKED, jnp.asarray(mask_id, token_ids_BxT.dtype), token_ids_BxT)
    out = jnp.where(category == RANDOM, rand_tok_BxT, out)
    return out, category


def random_token_ids(vocab_size: int, special_ids: Sequence[int]) -> np.ndarray:
    """All ids except the specials: the pool random replacements come from."""
    return np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids))).astype(np.int32)


def encode_words(tokenizer, words: Sequence[str]) -> tuple[list[int], list[int]]:
    """Token ids of a word-segmented sentence (no specials) and the word index of each token."""
    ids, wids = [], []
    for w, word in enumerate(words):
        piece = tokenizer.encode(word)[0][1:-1]
        ids += piece
        wids += [w] * len(piece)
    return ids, wids


def pair_rows(tokenizer, pairs: Sequence[tuple[Sequence[str], Sequence[str]]], maxlen: int,
              pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Stage-1 rows from word-segmented pairs: for (a, b) the rows `[CLS] a [SEP] b [SEP]` and
    `[CLS] b [SEP] a [SEP]` (rows 2k, 2k+1), each side cut to `maxlen` tokens.
    Returns int32 `token_ids`, `segment_ids`, `word_ids` (source words, -1 elsewhere) and bool
    `padding_mask`, all [2 * len(pairs), pad_to or 2 * maxlen + 3]."""
    T = pad_to or 2 * maxlen + 3
    enc = [[encode_words(tokenizer, a), encode_words(tokenizer, b)] for a, b in pairs]
    N = 2 * len(pairs)
    ids = np.full((N, T), tokenizer.pad_id, np.int32)
    seg = np.zeros((N, T), np.int32)
    wid = np.full((N, T), -1, np.int32)
    r = 0
    for (a, aw), (b, bw) in enc:
        for (src, srcw), (tgt, _) in (((a, aw), (b, bw)), ((b, bw), (a, aw))):
            src, srcw, tgt = src[:maxlen], srcw[:maxlen], tgt[:maxlen]
            row = [tokenizer.cls_id] + src + [tokenizer.sep_id] + tgt + [tokenizer.sep_id]
            if len(row) > T:
                raise ShapeError(f"row of {len(row)} tokens does not fit pad_to={T}; raise pad_to or lower maxlen")
            ids[r, :len(row)] = row
            seg[r, len(src) + 2:len(row)] = 1
            wid[r, 1:1 + len(src)] = srcw
            r += 1
    return {"token_ids": ids, "segment_ids": seg, "word_ids": wid, "padding_mask": ids != tokenizer.pad_id}
