"""FLASH / FLASH-Quad LMs and the Transformer++ baseline: causality, masking, parameter matching, bf16,
the LM loss against PyTorch, and a sharded train step through the training core."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import log_softmax
from flax import nnx

from gen_jax.flash import (GAU, FlashConfig, build, count_params, gau_layer_params,
                           lm_loss, make_loss_fn, matched_transformer_config, mlm_corrupt,
                           transformer_layer_params)

# init_std large enough that attention visibly mixes tokens (so causality checks can fail)
TINY = FlashConfig(vocab_size=50, d_model=32, num_layers=2, key_size=16, chunk_size=4, init_std=0.3)
T = 13


def _logits_fn(model):
    graphdef, params = nnx.split(model, nnx.Param)
    return jax.jit(lambda p, tok, mask: nnx.merge(graphdef, p)(tok, mask=mask)), params


def _tokens(seed, shape=(2, T), vocab=50):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


def _assert_causal(model, i=6):
    f, params = _logits_fn(model)
    tok = _tokens(0)
    changed = tok.at[:, i + 1:].set((tok[:, i + 1:] + 7) % 50)
    a, b = f(params, tok, None), f(params, changed, None)
    np.testing.assert_allclose(a[:, :i + 1], b[:, :i + 1], atol=1e-5)
    assert float(jnp.abs(a[:, i + 1:] - b[:, i + 1:]).max()) > 1e-3


@pytest.mark.parametrize("kind", ["flash", "flash_quad"])
def test_flash_lm_is_causal(kind):
    _assert_causal(build(dataclasses.replace(TINY, kind=kind)))


def test_transformer_pp_is_causal():
    _assert_causal(build(matched_transformer_config(TINY, num_heads=2, init_std=0.3)))


@pytest.mark.parametrize("kind", ["flash", "transformer_pp"])
def test_default_positions_make_the_rope_tables_constants_of_the_compiled_step(kind):
    """Without positions both LMs compute the RoPE tables once at trace time (no sin/cos in the compiled step;
    traced positions make XLA:CPU recompute them inside every RoPE fusion), with the result of explicit positions
    0..T-1 (a traced array, which the step then does compute sin/cos of)."""
    model = build(TINY if kind == "flash" else matched_transformer_config(TINY, num_heads=2, init_std=0.3))
    graphdef, params = nnx.split(model, nnx.Param)
    tok = _tokens(0)

    def loss(p, positions=None):
        return jnp.sum(nnx.merge(graphdef, p)(tok, positions=positions) ** 2)

    grad = jax.jit(jax.grad(loss))
    pos = jnp.arange(T)[None]
    assert "stablehlo.sine" not in grad.lower(params).as_text()
    assert "stablehlo.sine" in grad.lower(params, pos).as_text()
    for a, b in zip(jax.tree.leaves(grad(params)), jax.tree.leaves(grad(params, pos))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_mlm_is_bidirectional_and_ignores_padding():
    model = build(dataclasses.replace(TINY, task="mlm"))
    f, params = _logits_fn(model)
    tok = _tokens(1)
    mask = jnp.arange(T)[None] < jnp.array([[T], [9]])
    a = f(params, tok, mask)
    later = f(params, tok.at[0, -1].set((tok[0, -1] + 1) % 50), mask)
    assert float(jnp.abs(a[0, 0] - later[0, 0]).max()) > 1e-4  # position 0 sees the last token
    padded_changed = f(params, tok.at[1, 9:].set(3), mask)
    np.testing.assert_allclose(a[1, :9], padded_changed[1, :9], atol=1e-5)


def _abstract(cfg):
    """The model's parameter shapes without computing any initialiser."""
    return nnx.eval_shape(lambda: build(cfg))


@pytest.mark.parametrize("layernorm", [False, True])
def test_param_counts_and_matching(layernorm):
    norm = "layernorm" if layernorm else "scalenorm"
    for kind in ("flash", "flash_quad"):
        cfg = dataclasses.replace(TINY, kind=kind, norm=norm)
        assert count_params(nnx.eval_shape(lambda: GAU(cfg, rngs=nnx.Rngs(0)))) == gau_layer_params(cfg)
    cfg = FlashConfig(vocab_size=50, d_model=64, num_layers=4, key_size=16, chunk_size=4, norm=norm)
    tcfg = matched_transformer_config(cfg)
    tmodel = _abstract(tcfg)
    assert tcfg.num_layers == 2
    assert count_params(tmodel.layers[0]) == transformer_layer_params(tcfg)
    fmodel = _abstract(cfg)
    flash_body, tpp_body = count_params(fmodel.layers), count_params(tmodel.layers)
    assert abs(flash_body - tpp_body) / flash_body < 0.01
    assert abs(count_params(fmodel) - count_params(tmodel)) / count_params(fmodel) < 0.01
    # the paper's rule of thumb: one GAU ~ 3 d e = 6 d^2, one attention + FFN layer ~ 12 d^2
    assert abs(gau_layer_params(cfg) / (6 * 64 ** 2) - 1) < 0.3


def test_bfloat16_compute_close_to_float32():
    cfg32 = dataclasses.replace(TINY, init_std=0.1)
    cfg16 = dataclasses.replace(cfg32, compute_dtype="bfloat16")
    m32, m16 = build(cfg32, seed=3), build(cfg16, seed=3)
    f32, p32 = _logits_fn(m32)
    f16, p16 = _logits_fn(m16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))
    tok = _tokens(2)
    a, b = f32(p32, tok, None), f16(p16, tok, None)
    assert b.dtype == jnp.float32 and np.isfinite(np.asarray(b)).all()
    assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(a).max()) + 0.02


def test_lm_loss_matches_scipy_cross_entropy():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7)) * 3
    targets = _tokens(1, (2, 5), 7)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ours = lm_loss(logits, targets, mask)
    logp = log_softmax(np.asarray(logits, np.float64), axis=-1)
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    ref = nll[np.asarray(mask) == 1].mean()
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    # uniform logits: exactly ln V nats = log2 V bits
    np.testing.assert_allclose(lm_loss(jnp.zeros((1, 3, 8)), jnp.zeros((1, 3), int)), math.log(8), rtol=1e-6)


def test_mlm_corrupt_rates():
    tok = jnp.full((64, 256), 5)
    inputs, selected = mlm_corrupt(jax.random.PRNGKey(0), tok, mask_token_id=1, vocab_size=50, rate=0.15)
    frac = float(selected.mean())
    assert abs(frac - 0.15) < 0.01
    masked = float(((inputs == 1) & selected).sum() / selected.sum())
    assert abs(masked - 0.8) < 0.03
    assert not bool(((inputs != 5) & ~selected).any())  # unselected tokens untouched


def test_sharded_train_step_lowers_loss():
    """The loss_fn drives the training core's update on a batch split over 8 devices."""
    from gen_jax.train import TrainState, batch_sharded, make_mesh, make_update_fn, replicated
    model = build(dataclasses.replace(TINY, init_std=0.05))
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.adam(3e-3)
    update = make_update_fn(make_loss_fn(graphdef), opt)
    mesh = make_mesh()
    state = jax.device_put(TrainState.create(params, opt, jax.random.PRNGKey(0), use_ema=False),
                           replicated(mesh))
    batch = {"tokens": jax.device_put(jnp.tile(jnp.arange(T + 1) % 5, (8, 1)), batch_sharded(mesh))}
    step = jax.jit(update)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(math.log(50), abs=0.3)
    assert losses[-1] < losses[0] - 0.5
