"""Cached decoding (constant state per layer) reproduces the parallel forward pass of a causal FLASH LM."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gen_jax.errors import ConfigError
from gen_jax.flash import (FlashConfig, build, generate, init_cache, make_decode_step, prefill,
                           sample_logits)

CFG = FlashConfig(vocab_size=40, d_model=32, num_layers=2, key_size=16, chunk_size=4, init_std=0.3)
T = 19  # crosses four chunk boundaries, ends inside a chunk


def _setup(cfg):
    model = build(cfg, seed=1)
    graphdef, params = nnx.split(model, nnx.Param)
    forward = jax.jit(lambda p, tok: nnx.merge(graphdef, p)(tok))
    return graphdef, params, forward


@pytest.fixture(scope="module")
def default_model():
    """CFG's model with its compiled forward pass and decode step, shared by the tests below."""
    graphdef, params, forward = _setup(CFG)
    return graphdef, params, forward, make_decode_step(graphdef)


def _decode_all(graphdef, params, cfg, tokens_BxT, step=None):
    step = step or make_decode_step(graphdef)
    cache = init_cache(cfg, tokens_BxT.shape[0])
    out = []
    for t in range(tokens_BxT.shape[1]):
        logits, cache = step(params, cache, tokens_BxT[:, t])
        out.append(logits)
    return jnp.stack(out, 1), cache


@pytest.mark.parametrize("normalizer", [
    "relu2_n", pytest.param("softmax_plus", marks=pytest.mark.slow),
    pytest.param("relu2_const", marks=pytest.mark.slow)])
def test_decode_matches_parallel_forward(normalizer, default_model):
    cfg = dataclasses.replace(CFG, normalizer=normalizer)
    if normalizer == CFG.normalizer:
        graphdef, params, forward, step = default_model
    else:
        (graphdef, params, forward), step = _setup(cfg), None
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, T), 0, cfg.vocab_size)
    parallel = forward(params, tokens)
    cached, cache = _decode_all(graphdef, params, cfg, tokens, step)
    np.testing.assert_allclose(cached, parallel, atol=1e-4, rtol=1e-4)
    assert int(cache["pos"]) == T
    # context matters (else the comparison would be vacuous): same last token, other history
    other = parallel - forward(params, tokens.at[:, :5].set((tokens[:, :5] + 1) % cfg.vocab_size))
    assert float(jnp.abs(other[:, -1]).max()) > 1e-3


def test_state_size_is_independent_of_position(default_model):
    """The cache holds O(S E + C (S + E)) numbers per layer and row, whatever the position; a step at
    position 100,000 works the same way (no table or buffer sized by T)."""
    graphdef, params, _, step = default_model
    cache = init_cache(CFG, 2)
    shapes = jax.tree.map(jnp.shape, cache)
    L, C, S, E = CFG.num_layers, CFG.chunk_size, CFG.key_size, CFG.expansion_size
    assert shapes == {"kv_sum": (L, 2, S, E), "kv_chunk": (L, 2, S, E), "k_quad": (L, 2, C, S),
                      "v": (L, 2, C, E), "pos": ()}
    far = dict(cache, pos=jnp.asarray(100_000, jnp.int32))
    logits, new = step(params, far, jnp.array([1, 2]))
    assert jax.tree.map(jnp.shape, new) == shapes and int(new["pos"]) == 100_001
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("prompt_len", [pytest.param(8, marks=pytest.mark.slow), 10])  # ends on / in a chunk
def test_prefill_then_decode_matches_forward(prompt_len, default_model):
    graphdef, params, forward, step = default_model
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, T), 0, CFG.vocab_size)
    parallel = forward(params, tokens)
    model = nnx.merge(graphdef, params)
    logits, cache = jax.jit(prefill)(model, tokens[:, :prompt_len])
    np.testing.assert_allclose(logits, parallel[:, prompt_len - 1], atol=1e-4, rtol=1e-4)
    for t in range(prompt_len, T):
        logits, cache = step(params, cache, tokens[:, t])
        np.testing.assert_allclose(logits, parallel[:, t], atol=1e-4, rtol=1e-4)


def test_greedy_generate_matches_argmax_rollout(default_model):
    """generate(temperature=0) equals feeding argmax tokens back through the parallel forward pass."""
    graphdef, params, forward, _ = default_model
    prompt = jax.random.randint(jax.random.PRNGKey(3), (2, 6), 0, CFG.vocab_size)
    n = 9
    out = generate(graphdef, params, prompt, num_tokens=n, rng=jax.random.PRNGKey(0), temperature=0.0)
    assert out.shape == (2, n)
    buf = jnp.concatenate([prompt, jnp.zeros((2, n), prompt.dtype)], 1)  # causal: later slots don't matter
    for t in range(n):
        nxt = jnp.argmax(forward(params, buf)[:, 5 + t], -1)
        buf = buf.at[:, 6 + t].set(nxt)
    np.testing.assert_array_equal(out, buf[:, 6:])


def test_sample_logits_temperature_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draw = lambda t, p: jax.vmap(lambda k: sample_logits(k, logits, t, p)[0])(keys)
    plain, nucleus, cold = jax.jit(lambda: (draw(1.0, 1.0), draw(1.0, 0.7), draw(0.5, 1.0)))()
    freq = lambda toks: np.bincount(np.asarray(toks), minlength=4) / len(toks)
    np.testing.assert_allclose(freq(plain), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top_p = 0.7: the nucleus is {0.5, 0.3}, renormalised to 5/8, 3/8
    np.testing.assert_allclose(freq(nucleus), [5 / 8, 3 / 8, 0, 0], atol=0.03)
    # temperature 0.5 squares the probabilities before renormalising
    p2 = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(freq(cold), p2 / p2.sum(), atol=0.03)
    assert int(sample_logits(keys[0], logits, 0.0)[0]) == 0


def test_undecodable_models_raise():
    with pytest.raises(ConfigError, match="kind='flash'"):
        init_cache(dataclasses.replace(CFG, kind="flash_quad"), 1)
    with pytest.raises(ConfigError, match="causal"):
        init_cache(dataclasses.replace(CFG, task="mlm"), 1)
