"""RoFormer encoder: parity with transformers' PyTorch RoFormer, RoPE and UniLM properties, KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.nn.rope import apply_rope
from gen_jax.roformer import RoFormerConfig, build, unilm_mask
from gen_jax.roformer.convert import load_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_SMALL = dict(vocab_size=60, embedding_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)


@nnx.jit
def fwd(model, ids, seg, pad=None, mask=None, pos=None):
    """Jitted forward: hidden states, pooled vector (or None), MLM logits (or None)."""
    out = model(ids, seg, padding_mask_BxT=pad, attention_mask_BxTxT=mask, positions_BxT=pos)
    logits = model.mlm_logits(out.hidden_BxTxD) if model.config.with_mlm else None
    return out.hidden_BxTxD, out.pooled_BxD, logits


@pytest.fixture(scope="module")
def tiny():
    return build("tiny")


def _perturbed_state_dict(model, seed):
    """HF init is tiny (std 0.02, LN = 1/0); perturb every weight so parity is a real test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:  # the fixed sinusoid table, not a weight
                continue
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.state_dict()


def _inputs(B=3, T=11, V=60, seed=0):
    r = np.random.RandomState(seed)
    ids = r.randint(5, V, (B, T)).astype(np.int64)
    seg = np.zeros((B, T), np.int64)
    seg[:, 6:] = 1
    pad = np.ones((B, T), np.int64)
    pad[1, 8:] = 0
    pad[2, 5:] = 0
    seg[2, 5:] = 0
    ids[pad == 0] = 0
    return ids, seg, pad


def test_mlm_logits_and_hidden_states_match_transformers():
    hf = transformers.RoFormerForMaskedLM(transformers.RoFormerConfig(**HF_SMALL)).eval()
    sd = _perturbed_state_dict(hf, 0)
    model = load_hf(sd, num_heads=4)
    assert model.config.embedding_size == 24 and model.config.pooler is None and model.config.with_mlm
    ids, seg, pad = _inputs()
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(pad), token_type_ids=torch.tensor(seg),
                 output_hidden_states=True)
    hidden, _, logits = fwd(model, jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pad))
    valid = pad.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], ref.hidden_states[-1].numpy()[valid],
                               atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(logits)[valid], ref.logits.numpy()[valid], atol=5e-4, rtol=1e-4)


def test_base_model_with_rotary_value_and_pooler_matches_transformers():
    cfg = dict(HF_SMALL, embedding_size=None, rotary_value=True, layer_norm_eps=1e-7)
    hf = transformers.RoFormerModel(transformers.RoFormerConfig(**cfg)).eval()
    sd = dict(_perturbed_state_dict(hf, 1))
    r = np.random.RandomState(1)
    w, b = r.randn(32, 32).astype(np.float32), r.randn(32).astype(np.float32)
    sd["pooler.dense.weight"], sd["pooler.dense.bias"] = torch.tensor(w), torch.tensor(b)
    ours = RoFormerConfig(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                          rotary_value=True, layer_norm_eps=1e-7, with_mlm=False, pooler="linear")
    model = load_hf(sd, ours)
    ids, seg, pad = _inputs(seed=2)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(pad), token_type_ids=torch.tensor(seg))
    hidden, pooled, _ = fwd(model, jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pad))
    h_ref = ref.last_hidden_state.numpy()
    valid = pad.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], h_ref[valid], atol=2e-4, rtol=1e-4)
    # linear pooler (no tanh) on [CLS], as RoFormer-Sim
    np.testing.assert_allclose(np.asarray(pooled), h_ref[:, 0] @ w.T + b, atol=1e-3, rtol=1e-4)


def test_rope_score_depends_only_on_relative_position():
    r = np.random.RandomState(0)
    q, k = jnp.asarray(r.randn(1, 8)), jnp.asarray(r.randn(1, 8))

    def score(m, n):
        return float(jnp.sum(apply_rope(q, jnp.array([m])) * apply_rope(k, jnp.array([n]))))

    for m, n in [(3, 1), (10, 4), (0, 7)]:
        for shift in (1, 5, 40):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    assert abs(score(3, 1) - score(4, 1)) > 1e-3  # but it does depend on m - n


def test_encoder_is_invariant_to_a_global_position_shift(tiny):
    ids, seg, pad = map(jnp.asarray, _inputs(V=128))
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    base = fwd(tiny, ids, seg, pad, None, pos)[0]
    shifted = fwd(tiny, ids, seg, pad, None, pos + 17)[0]
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(base), atol=1e-4)


def test_default_positions_make_the_rope_tables_constants_of_the_compiled_step(tiny):
    """Without positions the RoPE tables are computed once at trace time: the compiled forward and backward
    contain no sin/cos (traced positions made XLA:CPU recompute them inside every RoPE fusion: 5% of a
    training step), and the result equals passing positions 0..T-1 explicitly."""
    ids, seg, pad = map(jnp.asarray, _inputs(V=128))
    graphdef, params = nnx.split(tiny, nnx.Param)

    def loss(p, pos=None):
        return jnp.sum(nnx.merge(graphdef, p)(ids, seg, padding_mask_BxT=pad, positions_BxT=pos).hidden_BxTxD ** 2)

    grad = jax.jit(jax.grad(loss))
    hlo = grad.lower(params).as_text()
    assert "stablehlo.sine" not in hlo and "stablehlo.cosine" not in hlo
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    assert "stablehlo.sine" in grad.lower(params, pos).as_text()  # the check above can see traced sin/cos
    for a, b in zip(jax.tree.leaves(grad(params)), jax.tree.leaves(grad(params, pos))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_unilm_mask_matches_definition_and_hides_segment_1_from_the_source(tiny):
    seg = np.array([[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]])
    pad = np.array([[1, 1, 1, 1, 1, 1, 0], [1] * 7], bool)
    mask = np.asarray(unilm_mask(jnp.asarray(seg), jnp.asarray(pad)))
    for b in range(2):
        idx = np.cumsum(seg[b])
        for i in range(7):
            for j in range(7):
                assert mask[b, i, j] == ((idx[j] <= idx[i]) and pad[b, j])

    ids = np.random.RandomState(0).randint(5, 128, (1, 9))
    seg1 = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    other = ids.copy()
    other[0, 4:] = np.random.RandomState(1).randint(5, 128, 5)  # a different target
    both, seg2 = jnp.asarray(np.concatenate([ids, other])), jnp.concatenate([seg1, seg1])
    hidden, pooled, _ = fwd(tiny, both, seg2, None, unilm_mask(seg2))
    np.testing.assert_allclose(np.asarray(pooled[0]), np.asarray(pooled[1]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(hidden[0, :4]), np.asarray(hidden[1, :4]), atol=1e-6)
    # without the mask the [CLS] vector does see the target
    full = fwd(tiny, both, seg2, None, jnp.ones((2, 9, 9), bool))[1]
    assert np.abs(np.asarray(full[0] - full[1])).max() > 1e-4


def test_cached_decoding_equals_full_recomputation_with_padded_prompts(tiny):
    """Two prompts of lengths 5 and 3 (padded to 5) decoded token by token against the cache give, at every
    step, the logits of re-running the whole unpadded sequence under the UniLM mask."""
    model = tiny
    r = np.random.RandomState(3)
    prompts = [[2] + list(r.randint(5, 128, 3)) + [3], [2, int(r.randint(5, 128)), 3]]
    gen = r.randint(5, 128, (2, 4))
    P, S = 5, 9
    ids = np.zeros((2, P), np.int32)
    pmask = np.zeros((2, P), bool)
    for b, p in enumerate(prompts):
        ids[b, :len(p)], pmask[b, :len(p)] = p, True
    graphdef, params = nnx.split(model)

    @jax.jit  # one compile for the prefill, one for all decode steps
    def run(params, ids, seg, pmask, mask, cache, index, pos):
        m = nnx.merge(graphdef, params)
        out = m(ids, seg, padding_mask_BxT=pmask, attention_mask_BxTxT=mask, cache=cache, cache_index=index,
                positions_BxT=pos)
        return m.mlm_logits(out.hidden_BxTxD), out.cache

    cache = model.init_cache(2, S)
    prefill_mask = jnp.asarray(np.broadcast_to(np.arange(S) < P, (2, P, S)))
    logits, cache = run(params, jnp.asarray(ids), jnp.zeros((2, P), jnp.int32), jnp.asarray(pmask), prefill_mask,
                        cache, 0, jnp.broadcast_to(jnp.arange(P), (2, P)))
    lens = np.array([len(p) for p in prompts])
    step_logits = [np.asarray(logits)[np.arange(2), lens - 1]]
    for t in range(gen.shape[1]):
        logits, cache = run(params, jnp.asarray(gen[:, t:t + 1]), jnp.ones((2, 1), jnp.int32), None, None, cache,
                            P + t, jnp.asarray(lens[:, None] + t))
        step_logits.append(np.asarray(logits)[:, 0])
    for b, p in enumerate(prompts):  # full recomputation, right-padded to one length (one compile)
        n = len(p) + gen.shape[1]
        full = np.zeros((1, S), np.int32)
        full[0, :n] = p + list(gen[b])
        seg = jnp.asarray([[0] * len(p) + [1] * (S - len(p))])
        logits = np.asarray(fwd(model, jnp.asarray(full), seg, jnp.asarray(np.arange(S) < n)[None],
                                unilm_mask(seg))[2])[0]
        for t in range(gen.shape[1] + 1):
            np.testing.assert_allclose(step_logits[t][b], logits[len(p) - 1 + t], atol=2e-5, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_output(tiny):
    m16 = build("tiny", compute_dtype="bfloat16")  # same seed: same weights as `tiny`
    _, p16 = nnx.split(m16, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))
    ids, seg, pad = (jnp.asarray(x) for x in _inputs(V=128))
    h32 = fwd(tiny, ids, seg, pad)[0]
    h16 = fwd(m16, ids, seg, pad)[0]
    assert h16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(h16, np.float32) - np.asarray(h32)).max() < 0.1


def test_dropout_is_active_only_with_an_rng_and_bad_configs_raise(tiny):
    ids, seg, pad = map(jnp.asarray, _inputs(V=128))
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    a = fwd(tiny, ids, seg, pad, None, pos)[0]
    run = nnx.jit(lambda m, rng: m(ids, seg, padding_mask_BxT=pad, positions_BxT=pos, dropout_rng=rng).hidden_BxTxD)
    b = run(tiny, jax.random.key(0))
    assert not np.allclose(a, b) and np.isfinite(np.asarray(b)).all()
    with pytest.raises(ConfigError, match="multiple"):
        RoFormerConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ShapeError, match=r"\[B, T\]"):
        tiny(jnp.ones((6,), jnp.int32))
    with pytest.raises(ConfigError, match="no pooler"):
        build("tiny", pooler=None).pool(a)


def test_half_layout_rope_and_erf_gelu_equal_the_interleaved_reference():
    """The layer rotates q/k in a per-head half layout (kernel columns permuted); undoing the permutation
    must give apply_rope's interleaved result, and the erf GELU must equal jax.nn.gelu(approximate=False)."""
    from gen_jax.nn.rope import half_layout
    from gen_jax.roformer.model import _gelu, _rope_half, _rope_tables
    N, H, T = 3, 8, 7
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(2, T, N * H), jnp.float32)
    w = jnp.asarray(r.randn(N * H, N * H), jnp.float32)
    pos = jnp.asarray(r.randint(0, 50, (2, T)))
    ref = apply_rope((x @ w).reshape(2, T, N, H), pos[:, :, None])
    half = _rope_half((x @ half_layout(w, H)).reshape(2, T, N, H), *_rope_tables(pos, H))
    back = half.reshape(2, T, N, 2, H // 2).swapaxes(-1, -2).reshape(2, T, N, H)  # half -> interleaved
    np.testing.assert_allclose(np.asarray(back), np.asarray(ref), atol=1e-5, rtol=1e-5)
    z = jnp.linspace(-8.0, 8.0, 101)
    np.testing.assert_allclose(np.asarray(_gelu(z)), np.asarray(jax.nn.gelu(z, approximate=False)), atol=1e-6)
