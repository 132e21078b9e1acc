"""Token sampling without sorting the vocabulary: nucleus (top-p) cut-offs by bisection, draws by inverse CDF.

Nucleus sampling (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", sec. 3.1) keeps the
smallest set of most likely tokens whose probability reaches p. The usual way sorts each row of logits; on
XLA:CPU a sort of [100, 12000] logits takes ~0.4 s, several times a whole decoder step. Here the cut-off is
found exactly without a sort: token i is kept iff the mass of tokens strictly more likely than i is below p,
M(l_i) < p with M(l) = sum_j p_j [l_j > l]. M is non-increasing, so the kept set is {i : l_i >= l*} with l*
the smallest logit for which M < p; l* is found by bisection over the order-preserving int32 image of float32
(32 halvings resolve any two distinct floats), each a fused compare-and-sum over the row. Ties at the cut-off
are kept together (a sort would keep the lower indices first).

The kept tokens are then drawn by inverse CDF with one uniform per row (in vocabulary order, two-level
blocked prefix sums), instead of a Gumbel/exponential per vocabulary entry as `jax.random.categorical` does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["nucleus_cutoff", "nucleus_sample", "sample_from_probs"]

_BLOCK = 128


def _order_key(x: jax.Array) -> jax.Array:
    """int32 keys with the order of the float32 values (for -inf .. +inf; NaN not expected)."""
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)


def nucleus_cutoff(logits_NxV: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """Per row, the smallest logit l* that nucleus sampling with top_p keeps (as float32, [N]): token i is kept
    iff logits[i] >= l*. The most likely token is always kept; top_p >= 1 keeps every token of nonzero
    probability."""
    logits = logits_NxV.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _order_key(logits)
    top_p = jnp.asarray(top_p, jnp.float32)

    def mass_above(k_N):  # M(k) = mass of tokens whose key is > k
        return jnp.sum(jnp.where(keys > k_N[:, None], probs, 0.0), axis=-1)

    # invariant: M(hi) < top_p (hi = the top key, M = 0), and lo < every kept key
    lo = jnp.min(keys, axis=-1) - 1  # keys never reach int32's minimum (that would be a NaN pattern)
    hi = jnp.max(keys, axis=-1)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        below = mass_above(mid) < top_p
        active = lo < hi - 1  # not hi - lo > 1: that can overflow int32
        return jnp.where(active & ~below, mid, lo), jnp.where(active & below, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    # the kept key range is [hi, max]: the smallest kept logit is the smallest logit with key >= hi; with
    # top_p >= 1 every token of nonzero probability (float32 rounding of the mass must not drop the last one);
    # tokens of zero probability (-inf logits, underflow) are never part of the nucleus
    keep = ((keys >= hi[:, None]) | (top_p >= 1.0)) & (probs > 0)
    return jnp.min(jnp.where(keep, logits, jnp.inf), axis=-1)


def sample_from_probs(rng: jax.Array, weights_NxV: jax.Array) -> jax.Array:
    """One index per row drawn with probability proportional to the (nonnegative, not necessarily normalized)
    weights, by inverse CDF: one uniform per row, block sums, then a prefix sum inside the chosen block.
    Indices of zero weight are never returned (a row must have some positive weight)."""
    n, v = weights_NxV.shape
    w = weights_NxV.astype(jnp.float32)
    nb = -(-v // _BLOCK)
    w_NxBxK = jnp.pad(w, ((0, 0), (0, nb * _BLOCK - v))).reshape(n, nb, _BLOCK)
    block_NxB = jnp.sum(w_NxBxK, axis=-1)
    cum_NxB = jnp.cumsum(block_NxB, axis=-1)
    u_N = jax.random.uniform(rng, (n,), jnp.float32) * cum_NxB[:, -1]
    # the first block whose inclusive sum exceeds u; rounding can only push it past the end: take the last
    # nonempty block then
    last_nonempty = nb - 1 - jnp.argmax((block_NxB > 0)[:, ::-1], axis=-1)
    b_N = jnp.minimum(jnp.sum(cum_NxB <= u_N[:, None], axis=-1), last_nonempty)
    inside_NxK = jnp.take_along_axis(w_NxBxK, b_N[:, None, None], axis=1)[:, 0]
    before_N = jnp.take_along_axis(cum_NxB, b_N[:, None], axis=1)[:, 0] - jnp.take_along_axis(
        block_NxB, b_N[:, None], axis=1)[:, 0]
    cum_NxK = jnp.cumsum(inside_NxK, axis=-1)
    k_N = jnp.sum(cum_NxK <= (u_N - before_N)[:, None], axis=-1)
    # never land on a zero weight (rounding at the block's end, or zeros after the crossing point): the last
    # positive entry at or before k, else the first positive one
    idx = jnp.arange(_BLOCK)
    pos = inside_NxK > 0
    at_or_before = jnp.max(jnp.where(pos & (idx <= k_N[:, None]), idx, -1), axis=-1)
    first = jnp.argmax(pos, axis=-1)
    k_N = jnp.where(at_or_before >= 0, at_or_before, first)
    return (b_N * _BLOCK + k_N).astype(jnp.int32)


def nucleus_sample(rng: jax.Array, logits_NxV: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """Token ids [N]: a draw from softmax(logits) restricted to the nucleus of mass top_p (per row)."""
    logits = logits_NxV.astype(jnp.float32)
    cutoff_N = nucleus_cutoff(logits, top_p)
    top_N = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.where(logits >= cutoff_N[:, None], jnp.exp(logits - top_N), 0.0)
    return sample_from_probs(rng, weights)
