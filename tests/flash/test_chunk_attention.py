"""Mixed chunk attention (FLASH eq. 6-8) against a dense T x T oracle and a per-row NumPy loop."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.flash import NORMALIZERS, dense_reference, mixed_chunk_attention, quadratic_attention

B, T, S, E, C = 2, 11, 8, 6, 4  # T not a multiple of C: the last chunk is padded internally


def _inputs(seed=0, T=T):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    qq, kq, ql, kl = (jax.random.normal(k, (B, T, S)) for k in ks[:4])
    v = jax.random.normal(ks[4], (B, T, E))
    return qq, kq, ql, kl, v


# row 0: no padding; row 1: right padding over a chunk boundary and a hole in the middle
MASK = jnp.array([[True] * T, [True] * 3 + [False] + [True] * 3 + [False] * 4])


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("causal", [True, False])
def test_chunked_equals_dense_reference(normalizer, causal):
    args = _inputs()
    kw = dict(chunk_size=C, causal=causal, mask=MASK, normalizer=normalizer, norm_const=3.0)
    out = mixed_chunk_attention(*args, **kw)
    ref = dense_reference(*args, **kw)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    assert float(jnp.abs(ref).max()) > 0.1  # not trivially zero
    np.testing.assert_array_equal(out[~MASK], 0.0)  # padded queries output nothing


@pytest.mark.parametrize("normalizer", ["relu2_n", "softmax_plus"])
def test_causal_one_or_two_chunks_equal_dense_reference(normalizer):
    for length in (3, 4, 8):  # one chunk (no linear part at all), one full chunk, two chunks
        args = _inputs(seed=5, T=length)
        kw = dict(chunk_size=C, causal=True, normalizer=normalizer)
        np.testing.assert_allclose(mixed_chunk_attention(*args, **kw), dense_reference(*args, **kw), atol=2e-5,
                                   rtol=1e-5, err_msg=f"T = {length}")


@pytest.mark.parametrize("normalizer, chunk_size", [("relu2_n", 8), ("softmax_plus", 8), ("relu2_const", 8),
                                                    ("relu2_n", 7)])  # 7: not divisible into blocks: one
def test_causal_row_blocks_skip_only_masked_products(monkeypatch, normalizer, chunk_size):
    """Output and gradients are the same for 1, 2 and 4 row blocks per causal chunk, and equal the dense oracle."""
    from gen_jax.flash import chunk_attention

    args = _inputs(seed=3, T=19)
    mask = jnp.arange(19)[None, :] < jnp.array([[19], [13]])
    kw = dict(chunk_size=chunk_size, causal=True, mask=mask, normalizer=normalizer, norm_const=3.0)
    weights = jax.random.normal(jax.random.PRNGKey(9), (B, 19, E))
    loss = lambda *a: jnp.sum(mixed_chunk_attention(*a, **kw) * weights)
    results = {}
    for blocks in (1, 2, 4):
        monkeypatch.setattr(chunk_attention, "CAUSAL_ROW_BLOCKS", blocks)
        results[blocks] = (mixed_chunk_attention(*args, **kw), jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args))
    ref_out = dense_reference(*args, **kw)
    ref_grads = jax.grad(lambda *a: jnp.sum(dense_reference(*a, **kw) * weights), argnums=(0, 1, 2, 3, 4))(*args)
    for blocks, (out, grads) in results.items():
        np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5, err_msg=f"{blocks} blocks")
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-4, err_msg=f"{blocks} blocks")
    assert float(jnp.abs(ref_grads[0]).max()) > 0.01


def _numpy_full_attention(q, k, v, mask, causal, normalizer, c):
    """Row by row: visible keys, their weights, weighted sum of values."""
    out = np.zeros(v.shape[:2] + (v.shape[-1],))
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            if not mask[b, i]:
                continue
            vis = [j for j in range(q.shape[1]) if mask[b, j] and (j <= i or not causal)]
            s = np.array([q[b, i] @ k[b, j] for j in vis]) / math.sqrt(q.shape[-1])
            if normalizer == "relu2_n":
                w = np.maximum(s, 0) ** 2 / len(vis)
            elif normalizer == "relu2_const":
                w = np.maximum(s, 0) ** 2 / c
            else:
                z = s * math.log(len(vis)) / math.log(512)
                w = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            out[b, i] = w @ v[b, vis]
    return out


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("causal", [True, False])
def test_quadratic_attention_matches_row_loop(normalizer, causal):
    q, k, _, _, v = _inputs(1)
    out = quadratic_attention(q, k, v, causal=causal, mask=MASK, normalizer=normalizer, norm_const=3.0)
    ref = _numpy_full_attention(*map(np.asarray, (q, k, v, MASK)), causal, normalizer, 3.0)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_one_chunk_is_full_attention(normalizer):
    """With C >= T there is no global part, and causal FLASH is exactly FLASH-Quad."""
    qq, kq, ql, kl, v = _inputs(2)
    out = mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=16, causal=True, mask=MASK,
                                normalizer=normalizer, norm_const=3.0)
    ref = quadratic_attention(qq, kq, v, causal=True, mask=MASK, normalizer=normalizer, norm_const=3.0)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_padding_never_leaks(causal):
    """Replacing everything at padded positions (even with huge values) changes no output."""
    args = _inputs(3)
    noise = _inputs(4)
    pad = ~MASK[..., None]
    changed = [jnp.where(pad, 1e3 * n, a) for a, n in zip(args, noise)]
    for normalizer in NORMALIZERS:
        kw = dict(chunk_size=C, causal=causal, mask=MASK, normalizer=normalizer, norm_const=3.0)
        np.testing.assert_allclose(mixed_chunk_attention(*args, **kw), mixed_chunk_attention(*changed, **kw),
                                   atol=1e-6)
    # Without the mask the same change is visible: the test can fail.
    kw = dict(chunk_size=C, causal=causal, normalizer="relu2_n")
    assert float(jnp.abs(mixed_chunk_attention(*args, **kw) - mixed_chunk_attention(*changed, **kw)).max()) > 1.0


def test_padding_equals_truncation():
    """A right-padded sequence gives the same outputs as the unpadded prefix alone (ragged lengths)."""
    args = _inputs(5)
    L = 7
    mask = jnp.arange(T)[None] < L
    mask = jnp.broadcast_to(mask, (B, T))
    for causal in (True, False):
        full = mixed_chunk_attention(*args, chunk_size=C, causal=causal, mask=mask)
        short = mixed_chunk_attention(*(a[:, :L] for a in args), chunk_size=C, causal=causal)
        np.testing.assert_allclose(full[:, :L], short, atol=1e-6)


def test_causality():
    """Changing q/k/v after position i leaves outputs at <= i unchanged; outputs after i do change."""
    args = _inputs(6)
    noise = _inputs(7)
    i = 5
    later = (jnp.arange(T) > i)[None, :, None]
    changed = [jnp.where(later, n, a) for a, n in zip(args, noise)]
    for normalizer in NORMALIZERS:
        kw = dict(chunk_size=C, causal=True, normalizer=normalizer, norm_const=3.0)
        a, b = mixed_chunk_attention(*args, **kw), mixed_chunk_attention(*changed, **kw)
        np.testing.assert_allclose(a[:, :i + 1], b[:, :i + 1], atol=1e-6)
        assert float(jnp.abs(a[:, i + 1:] - b[:, i + 1:]).max()) > 1e-2


def test_global_part_is_exclusive_prefix_over_chunks():
    """Causal: the first chunk sees no other chunk, so its output ignores q_lin entirely."""
    qq, kq, ql, kl, v = _inputs(8)
    a = mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=C, causal=True)
    b = mixed_chunk_attention(qq, kq, 10 * ql + 1, kl, v, chunk_size=C, causal=True)
    np.testing.assert_allclose(a[:, :C], b[:, :C], atol=1e-6)
    assert float(jnp.abs(a[:, C:] - b[:, C:]).max()) > 1e-2


def test_jit_and_bfloat16():
    args = _inputs(9)
    f = jax.jit(lambda *a: mixed_chunk_attention(*a, chunk_size=C, causal=True, mask=MASK))
    out32 = f(*args)
    out16 = f(*(a.astype(jnp.bfloat16) for a in args))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=0.05, rtol=0.05)


def test_bad_inputs_raise():
    qq, kq, ql, kl, v = _inputs()
    with pytest.raises(ConfigError, match="normalizer"):
        mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=C, causal=True, normalizer="relu")
    with pytest.raises(ConfigError, match="norm_const"):
        mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=C, causal=True, normalizer="relu2_const")
    with pytest.raises(ShapeError, match="q_lin"):
        mixed_chunk_attention(qq, kq, ql[:, :5], kl, v, chunk_size=C, causal=True)
    with pytest.raises(ShapeError, match="mask"):
        mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=C, causal=True, mask=MASK[:, :5])


@pytest.mark.parametrize("normalizer", ["relu2_n", "softmax_plus"])
def test_gradients_finite_with_padding(normalizer):
    """Padded rows (internal chunk padding, masked tokens, a fully masked left-padded row) give finite
    gradients: no 0/0 hides behind the output mask."""
    args = _inputs(10)
    mask = MASK.at[1, :2].set(False)  # left padding too: causal rows with no visible key

    def total(*a):
        out = 0.0
        for causal in (True, False):
            kw = dict(causal=causal, mask=mask, normalizer=normalizer)
            out += jnp.sum(mixed_chunk_attention(*a, chunk_size=C, **kw) ** 2)
            out += jnp.sum(quadratic_attention(a[0], a[1], a[4], **kw) ** 2)
        return out

    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3, 4)))(*args)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    assert all(float(jnp.abs(g).max()) > 0 for g in grads)
