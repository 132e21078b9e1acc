"""Losses of RoFormer-Sim (SimBERTv2; Su, kexue.fm posts 8454 and 8541) as plain functions of arrays,
plus `loss_fn(params, batch, rng)` builders for the training core.

Stage 1: L = L_gen + L_sim. L_gen: UniLM seq2seq token cross-entropy of the target segment (the final [SEP]
included), mean over target tokens. L_sim: in-batch contrastive loss on V = l2norm(pooled [CLS]) with
S = scale * V V^T, the diagonal masked out, and row i's positive at i XOR 1 (rows 2k, 2k+1 are a pair).
Stage 2 (distillation): L_sim = 100 * mean_ij (cos(u_i, u_j) - cos(v_i, v_j))^2 between student and teacher.
Supervised (post 8541): Sentence-BERT classification, logits = [u, v, |u - v|] W with W: [3D, 5] (no bias);
binary-pair rows use logits 0-1, NLI rows logits 2-4 (the others masked out).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gen_jax.errors import ShapeError
from gen_jax.roformer.model import RoFormer, unilm_mask

_NEG = -1e12  # the diagonal / masked-logit value (finite: keeps gradients NaN-free)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def unilm_generation_loss(logits_BxTxV: jax.Array, token_ids_BxT: jax.Array, segment_ids_BxT: jax.Array,
                          padding_mask_BxT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over target tokens: position t predicts token t+1 wherever token t+1 is
    in segment 1 and not padding (so the target's final [SEP] is predicted, its [CLS]-side prompt is not).
    Returns (loss, number of target tokens)."""
    if logits_BxTxV.shape[:2] != token_ids_BxT.shape:
        raise ShapeError(f"logits {logits_BxTxV.shape} do not match token ids {token_ids_BxT.shape}")
    target_BxT1 = token_ids_BxT[:, 1:]
    weight_BxT1 = segment_ids_BxT[:, 1:] == 1
    if padding_mask_BxT is not None:
        weight_BxT1 = weight_BxT1 & padding_mask_BxT[:, 1:].astype(bool)
    logp_BxT1xV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
    nll_BxT1 = -jnp.take_along_axis(logp_BxT1xV, target_BxT1[..., None], axis=-1)[..., 0]
    n = jnp.sum(weight_BxT1)
    return jnp.sum(nll_BxT1 * weight_BxT1) / jnp.maximum(n, 1), n


def contrastive_loss(pooled_BxD: jax.Array, scale: float = 20.0) -> jax.Array:
    """In-batch softmax over cosine similarities (diagonal excluded); row i's label is i XOR 1."""
    B = pooled_BxD.shape[0]
    if B % 2:
        raise ShapeError(f"contrastive loss needs paired rows (2k, 2k+1), got an odd batch of {B}")
    v_BxD = l2_normalize(pooled_BxD)
    s_BxB = scale * (v_BxD @ v_BxD.T)
    s_BxB = jnp.where(jnp.eye(B, dtype=bool), _NEG, s_BxB)
    labels_B = jnp.arange(B) ^ 1
    logp_BxB = jax.nn.log_softmax(s_BxB, axis=-1)
    return -jnp.mean(logp_BxB[jnp.arange(B), labels_B])


def cosine_matrix(x_BxD: jax.Array) -> jax.Array:
    v = l2_normalize(x_BxD)
    return v @ v.T


def distillation_loss(student_BxD: jax.Array, teacher_BxD: jax.Array, weight: float = 100.0) -> jax.Array:
    """weight * mean over all (i, j) of (cos(u_i, u_j) - cos(v_i, v_j))^2; the teacher gets no gradient."""
    if student_BxD.shape[0] != teacher_BxD.shape[0]:
        raise ShapeError(f"student batch {student_BxD.shape[0]} != teacher batch {teacher_BxD.shape[0]}")
    diff = cosine_matrix(student_BxD) - jax.lax.stop_gradient(cosine_matrix(teacher_BxD))
    return weight * jnp.mean(diff ** 2)


def sbert_logits(u_BxD: jax.Array, v_BxD: jax.Array, kernel_3Dx5: jax.Array) -> jax.Array:
    """Sentence-BERT features [u, v, |u - v|] times a bias-free Dense(5)."""
    feats = jnp.concatenate([u_BxD, v_BxD, jnp.abs(u_BxD - v_BxD)], axis=-1).astype(jnp.float32)
    if feats.shape[-1] != kernel_3Dx5.shape[0]:
        raise ShapeError(f"classifier kernel {kernel_3Dx5.shape} needs {feats.shape[-1]} input rows (3 * D)")
    return feats @ kernel_3Dx5.astype(jnp.float32)


def sbert_classification_loss(logits_Bx5: jax.Array, labels_B: jax.Array, is_nli_B: jax.Array
                              ) -> tuple[jax.Array, jax.Array]:
    """Masked-logit cross-entropy: binary rows (label 0/1) over logits 0-1, NLI rows (label 0/1/2 =
    contradiction/entailment/neutral) over logits 2-4. Returns (mean loss, accuracy)."""
    is_nli_B = is_nli_B.astype(bool)
    cols_5 = jnp.arange(5)
    allowed_Bx5 = jnp.where(is_nli_B[:, None], cols_5 >= 2, cols_5 < 2)
    masked = jnp.where(allowed_Bx5, logits_Bx5.astype(jnp.float32), _NEG)
    target_B = labels_B.astype(jnp.int32) + 2 * is_nli_B
    logp = jax.nn.log_softmax(masked, axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(logp, target_B[:, None], axis=-1))
    acc = jnp.mean(jnp.argmax(masked, axis=-1) == target_B)
    return loss, acc


# ------------------------------------------------------------------------------------------ model-level recipe

def sentence_vectors(model: RoFormer, token_ids_BxT: jax.Array, padding_mask_BxT: jax.Array | None = None,
                     dropout_rng: jax.Array | None = None) -> jax.Array:
    """Pooled [CLS] vector of `[CLS] text [SEP]` rows (all segment 0, so the UniLM mask is bidirectional)."""
    out = model(token_ids_BxT, jnp.zeros_like(token_ids_BxT), padding_mask_BxT=padding_mask_BxT,
                dropout_rng=dropout_rng)
    return out.pooled_BxD


def stage1_loss(model: RoFormer, batch: dict, rng: jax.Array | None, *, scale: float = 20.0
                ) -> tuple[jax.Array, dict]:
    """batch: `token_ids`, `segment_ids`, `padding_mask` [B, T] of rows `[CLS] a [SEP] b [SEP]`, rows 2k and
    2k+1 holding a pair and its swap. Returns (L_gen + L_sim, metrics)."""
    out = model(batch["token_ids"], batch["segment_ids"],
                attention_mask_BxTxT=unilm_mask(batch["segment_ids"], batch["padding_mask"]), dropout_rng=rng)
    gen, n = unilm_generation_loss(model.mlm_logits(out.hidden_BxTxD), batch["token_ids"], batch["segment_ids"],
                                   batch["padding_mask"])
    sim = contrastive_loss(out.pooled_BxD, scale)
    return gen + sim, {"gen_loss": gen, "sim_loss": sim, "target_tokens": n.astype(jnp.float32)}


def stage2_loss(model: RoFormer, batch: dict, rng: jax.Array | None, teacher_BxD: jax.Array, *,
                weight: float = 100.0) -> tuple[jax.Array, dict]:
    """Distillation: L_gen on the UniLM rows + weight * cosine-matrix MSE between the student's pooled
    vectors and `teacher_BxD` (the teacher's vectors of the clean sources)."""
    out = model(batch["token_ids"], batch["segment_ids"],
                attention_mask_BxTxT=unilm_mask(batch["segment_ids"], batch["padding_mask"]), dropout_rng=rng)
    gen, _ = unilm_generation_loss(model.mlm_logits(out.hidden_BxTxD), batch["token_ids"], batch["segment_ids"],
                                   batch["padding_mask"])
    sim = distillation_loss(out.pooled_BxD, teacher_BxD, weight)
    return gen + sim, {"gen_loss": gen, "distill_loss": sim}


def supervised_loss(model: RoFormer, classifier_3Dx5: jax.Array, batch: dict, rng: jax.Array | None
                    ) -> tuple[jax.Array, dict]:
    """batch: `ids_a`, `mask_a`, `ids_b`, `mask_b` [B, T] (`[CLS] s [SEP]` rows), `label` [B], `is_nli` [B]."""
    r1, r2 = (None, None) if rng is None else jax.random.split(rng)
    u = sentence_vectors(model, batch["ids_a"], batch["mask_a"], r1)
    v = sentence_vectors(model, batch["ids_b"], batch["mask_b"], r2)
    loss, acc = sbert_classification_loss(sbert_logits(u, v, classifier_3Dx5), batch["label"], batch["is_nli"])
    return loss, {"accuracy": acc}


def make_stage1_loss_fn(graphdef: nnx.GraphDef, *, scale: float = 20.0) -> Callable:
    """loss_fn(params, batch, rng) -> (loss, metrics) for the training core."""
    def loss_fn(params, batch, rng):
        return stage1_loss(nnx.merge(graphdef, params), batch, rng, scale=scale)
    return loss_fn


def make_stage2_loss_fn(graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef | None = None,
                        teacher_params: Any = None, *, weight: float = 100.0) -> Callable:
    """loss_fn(params, batch, rng). The teacher's vectors come from `batch["teacher_vectors"]` or, given a
    teacher model, from encoding `batch["source_ids"]` / `batch["source_mask"]` (clean `[CLS] a [SEP]`)."""
    def loss_fn(params, batch, rng):
        if teacher_graphdef is None:
            teacher = batch["teacher_vectors"]
        else:
            teacher = sentence_vectors(nnx.merge(teacher_graphdef, teacher_params), batch["source_ids"],
                                       batch["source_mask"])
        return stage2_loss(nnx.merge(graphdef, params), batch, rng, jax.lax.stop_gradient(teacher), weight=weight)
    return loss_fn


def make_supervised_loss_fn(graphdef: nnx.GraphDef) -> Callable:
    """loss_fn(params, batch, rng) with params = {"encoder": model params, "classifier": [3D, 5] kernel}."""
    def loss_fn(params, batch, rng):
        return supervised_loss(nnx.merge(graphdef, params["encoder"]), params["classifier"], batch, rng)
    return loss_fn


def init_classifier(rng: jax.Array, hidden_size: int) -> jax.Array:
    """Glorot-uniform [3D, 5] kernel of the supervised head (Keras Dense default)."""
    return jax.nn.initializers.glorot_uniform()(rng, (3 * hidden_size, 5), jnp.float32)
