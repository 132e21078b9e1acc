"""RoFormer-Sim losses against direct numpy computations, and the stage-1 loss_fn end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gen_jax.errors import ShapeError
from gen_jax.roformer import build
from gen_jax.roformer_sim.losses import (contrastive_loss, distillation_loss, init_classifier, make_stage1_loss_fn,
                                         make_supervised_loss_fn, sbert_classification_loss, sbert_logits,
                                         unilm_generation_loss)


def _log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def test_generation_loss_is_mean_ce_over_target_tokens_including_final_sep():
    r = np.random.RandomState(0)
    B, T, V = 3, 8, 11
    logits = r.randn(B, T, V).astype(np.float32)
    ids = r.randint(0, V, (B, T))
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0]])
    pad = np.array([[1] * 7 + [0], [1] * 8, [1] * 6 + [0, 0]], bool)
    total, n = 0.0, 0
    for b in range(B):
        for t in range(1, T):
            if seg[b, t] == 1 and pad[b, t]:  # token t is predicted from position t-1
                total -= _log_softmax(logits[b, t - 1])[ids[b, t]]
                n += 1
    loss, count = unilm_generation_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pad))
    assert int(count) == n == 4 + 6 + 2
    assert float(loss) == pytest.approx(total / n, rel=1e-5)


def test_contrastive_loss_masks_the_diagonal_and_pairs_rows_2k_2k_plus_1():
    r = np.random.RandomState(1)
    x = r.randn(6, 5)
    v = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = 0.0
    for i in range(6):
        s = np.array([20 * v[i] @ v[j] for j in range(6) if j != i])
        others = [j for j in range(6) if j != i]
        expected -= _log_softmax(s)[others.index(i ^ 1)]
    assert float(contrastive_loss(jnp.asarray(x, jnp.float32))) == pytest.approx(expected / 6, rel=1e-4)
    # scale 30 (SimBERT) differs
    assert float(contrastive_loss(jnp.asarray(x, jnp.float32), 30.0)) != pytest.approx(expected / 6, rel=1e-3)
    with pytest.raises(ShapeError, match="odd"):
        contrastive_loss(jnp.ones((5, 3)))


def test_distillation_loss_is_100_times_mean_squared_cosine_gap():
    r = np.random.RandomState(2)
    u, t = r.randn(5, 4), r.randn(5, 7)  # teacher may have another width
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    expected = 100 * np.mean([(cos(u[i], u[j]) - cos(t[i], t[j])) ** 2 for i in range(5) for j in range(5)])
    got = distillation_loss(jnp.asarray(u, jnp.float32), jnp.asarray(t, jnp.float32))
    assert float(got) == pytest.approx(expected, rel=1e-4)
    g = jax.grad(lambda tt: distillation_loss(jnp.asarray(u, jnp.float32), tt))(jnp.asarray(t, jnp.float32))
    assert np.all(np.asarray(g) == 0)  # no gradient into the teacher


def test_sbert_loss_uses_logits_0_1_for_pairs_and_2_4_for_nli():
    r = np.random.RandomState(3)
    u, v, W = r.randn(4, 3), r.randn(4, 3), r.randn(9, 5)
    labels, is_nli = np.array([1, 0, 2, 1]), np.array([0, 0, 1, 1])
    logits = sbert_logits(jnp.asarray(u), jnp.asarray(v), jnp.asarray(W))
    feats = np.concatenate([u, v, np.abs(u - v)], 1)
    np.testing.assert_allclose(np.asarray(logits), feats @ W, rtol=1e-5, atol=1e-5)
    expected, correct = 0.0, 0
    for i in range(4):
        z = (feats @ W)[i, 2:] if is_nli[i] else (feats @ W)[i, :2]
        expected -= _log_softmax(z)[labels[i]]
        correct += int(np.argmax(z) == labels[i])
    loss, acc = sbert_classification_loss(logits, jnp.asarray(labels), jnp.asarray(is_nli))
    assert float(loss) == pytest.approx(expected / 4, rel=1e-4)
    assert float(acc) == pytest.approx(correct / 4)


@pytest.mark.slow  # two gradient compiles of a model
def test_stage1_and_supervised_loss_fns_train_a_tiny_model():
    """One jitted gradient step of each recipe loss_fn lowers its loss (no NaN, gradients reach the pooler)."""
    model = build("tiny", dropout_rate=0.0, attention_dropout_rate=0.0)
    graphdef, params = nnx.split(model, nnx.Param)
    r = np.random.RandomState(0)
    ids = r.randint(5, 128, (4, 10)).astype(np.int32)
    ids[:, 0], ids[:, 5], ids[:, 9] = 2, 3, 3
    seg = np.zeros_like(ids)
    seg[:, 6:] = 1
    batch = {"token_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(seg), "padding_mask": jnp.ones((4, 10), bool)}
    loss_fn = make_stage1_loss_fn(graphdef)

    @jax.jit
    def step(p):
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, jax.random.key(0))
        return loss, m, g, jax.tree.map(lambda a, b: a - 0.5 * b, p, g)

    loss, metrics, grads, new = step(params)
    assert float(loss) == pytest.approx(float(metrics["gen_loss"] + metrics["sim_loss"]), rel=1e-5)
    assert float(metrics["target_tokens"]) == 16
    assert float(jnp.abs(grads["pooler"]["kernel"]).sum()) > 0
    assert float(step(new)[0]) < float(loss)

    sup = make_supervised_loss_fn(graphdef)
    sbatch = {"ids_a": jnp.asarray(ids[:, :6]), "mask_a": jnp.ones((4, 6), bool), "ids_b": jnp.asarray(ids[:, 4:]),
              "mask_b": jnp.ones((4, 6), bool), "label": jnp.array([0, 1, 2, 0]), "is_nli": jnp.array([0, 0, 1, 1])}
    sp = {"encoder": params, "classifier": init_classifier(jax.random.key(1), 32)}
    l0, _ = jax.jit(sup)(sp, sbatch, None)
    assert np.isfinite(float(l0))
