"""Glue between the FLASH models and the training core for `experiments.flash`: character-LM data,
validation bits per character, an optimizer schedule, text sampling with cached decoding, and the
comparison table of FLASH / FLASH-Quad / Transformer++ (Hua et al., ICML 2022, sec. 4's comparison at
equal steps and matched parameters, here on character LMs).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gen_jax.data import CharVocab, TextData, lm_windows, load_text
from gen_jax.errors import ConfigError, DataError
from gen_jax.flash.configs import FlashConfig, FlashRunConfig, TransformerConfig
from gen_jax.flash.decode import generate
from gen_jax.flash.models import lm_loss
from gen_jax.train.mesh import batch_sharded, replicated

MODEL_TITLES = {"flash": "FLASH", "flash_quad": "FLASH-Quad", "transformer_pp": "Transformer++"}


@dataclasses.dataclass(frozen=True)
class LMData:
    """Token windows [N, T + 1] (inputs w[:, :-1], targets w[:, 1:]) of the train and eval splits."""
    vocab: CharVocab
    train_windows: np.ndarray
    eval_windows: np.ndarray
    train_chars: int
    eval_chars: int


def encode_documents(data: TextData, vocab: CharVocab) -> np.ndarray:
    """One int32 stream: each document's characters followed by <eos>, so a model learns where texts end
    and a prompt that starts after <eos> starts a new document."""
    if not len(data):
        raise DataError(f"{data.source}/{data.split} has no documents")
    return np.concatenate([vocab.encode(doc, add_eos=True) for doc in data.documents])


def prepare_lm_data(cfg: FlashRunConfig, vocab: CharVocab | None = None) -> LMData:
    """Load the corpus, build (or reuse) the char vocab from the train split, cut both splits into windows."""
    d = cfg.data
    train_text = load_text(d.source, "train", data_dir=d.data_dir)
    eval_text = load_text(d.source, d.eval_split, data_dir=d.data_dir)
    if vocab is None:
        vocab = CharVocab.build(train_text.documents, min_count=d.min_char_count)
    train_ids, eval_ids = encode_documents(train_text, vocab), encode_documents(eval_text, vocab)
    return LMData(vocab=vocab, train_windows=lm_windows(train_ids, d.seq_len),
                  eval_windows=lm_windows(eval_ids, d.seq_len), train_chars=len(train_ids),
                  eval_chars=len(eval_ids))


def spread_windows(windows: np.ndarray, count: int) -> np.ndarray:
    """`count` windows evenly spaced over the split (all of them when count is 0 or too large)."""
    if count <= 0 or count >= len(windows):
        return windows
    return windows[np.linspace(0, len(windows) - 1, count).round().astype(int)]


def lm_learning_rate(cfg: FlashRunConfig) -> optax.Schedule:
    """Linear warmup from 0 over train.warmup_steps, then constant or cosine decay to 10% at train.num_steps."""
    tc = cfg.train
    peak, warm = tc.learning_rate, min(tc.warmup_steps, max(tc.num_steps - 1, 0))
    if cfg.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0 if warm else peak, peak, warm, max(tc.num_steps, warm + 1),
                                                  end_value=0.1 * peak)
    if warm:
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), optax.constant_schedule(peak)],
                                    [warm])
    return optax.constant_schedule(peak)


def make_lm_optimizer(cfg: FlashRunConfig) -> optax.GradientTransformation:
    """Adam (AdamW with train.weight_decay) on `lm_learning_rate`, after global-norm clipping."""
    tc, lr = cfg.train, lm_learning_rate(cfg)
    opt = optax.adamw(lr, weight_decay=tc.weight_decay) if tc.weight_decay else optax.adam(lr)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip_norm), opt) if tc.grad_clip_norm else opt


def non_embedding_params(total: int, config: FlashConfig | TransformerConfig) -> int:
    """Parameters outside the token embedding (and the untied output matrix), the paper's size measure."""
    table = config.vocab_size * config.d_model
    return total - table * (1 if config.tie_embeddings else 2)


def make_eval_fn(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh) -> Callable:
    """A compiled `(params, windows_BxT1, weight_B) -> (sum of nats, number of targets)` over the mesh; rows
    with weight 0 are padding."""
    sh = batch_sharded(mesh)

    @functools.partial(jax.jit, in_shardings=(replicated(mesh), sh, sh), out_shardings=replicated(mesh))
    def eval_fn(params, windows, weight_B):
        logits = nnx.merge(graphdef, params)(windows[:, :-1])
        targets_mask = jnp.broadcast_to(weight_B[:, None], windows[:, 1:].shape)
        count = targets_mask.sum()
        return lm_loss(logits, windows[:, 1:], targets_mask) * jnp.maximum(count, 1.0), count

    return eval_fn


def _global(mesh: jax.sharding.Mesh, x: np.ndarray) -> jax.Array:
    local = x.reshape(jax.process_count(), -1, *x.shape[1:])[jax.process_index()]
    return jax.make_array_from_process_local_data(batch_sharded(mesh), local, x.shape)


def evaluate_bits_per_char(eval_fn: Callable, params: Any, windows: np.ndarray, batch_size: int,
                           mesh: jax.sharding.Mesh) -> dict[str, float]:
    """Mean bits per target character over every window (each window an independent context of T chars).

    Batches are padded to a multiple of the mesh size with zero-weight rows, so every window counts once.
    """
    if not len(windows):
        raise DataError("no evaluation windows; use a shorter data.seq_len")
    batch = -(-max(batch_size, 1) // mesh.size) * mesh.size  # whole rows per device
    nats, count = 0.0, 0.0
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        weight = np.ones(batch, np.float32)
        if len(chunk) < batch:
            weight[len(chunk):] = 0.0
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        s, c = eval_fn(params, _global(mesh, chunk), _global(mesh, weight))
        nats, count = nats + float(s), count + float(c)
    mean = nats / count
    return {"bpc": mean / math.log(2.0), "nats": mean, "chars": int(count), "windows": int(len(windows))}


def sample_text(graphdef: nnx.GraphDef, params: Any, vocab: CharVocab, prompt: str, *, num_tokens: int,
                num_samples: int, rng: jax.Array, temperature: float, top_p: float) -> list[str]:
    """`num_samples` continuations of `prompt` (started after <eos>) by cached decoding (`generate`)."""
    if num_samples < 1 or num_tokens < 1:
        return []
    ids = vocab.encode(prompt)
    if "<unk>" in vocab.specials and (ids == vocab.unk_id).any():
        raise ConfigError(f"sample.prompt={prompt!r} has characters outside the vocabulary; pick another prompt")
    prompt_BxP = np.tile(np.concatenate([[vocab.eos_id], ids]).astype(np.int32), (num_samples, 1))
    tokens = np.asarray(generate(graphdef, params, prompt_BxP, num_tokens=num_tokens, rng=rng,
                                 temperature=temperature, top_p=top_p))
    out = []
    for row in tokens:
        ends = np.flatnonzero(row == vocab.eos_id)  # a finished document ends the sample
        out.append(prompt + vocab.decode(row[:ends[0]] if len(ends) else row))
    return out


def comparison_markdown(rows: Sequence[dict], *, source: str, seq_len: int, batch_size: int) -> str:
    """The results table: one row per model, validation bits/char at equal steps."""
    lines = [f"Character LM on `{source}`, context {seq_len}, batch {batch_size}; validation bits per character "
             "after equal training steps (lower is better).", "",
             "| model | layers | params (non-emb.) | steps | val bits/char | train bits/char | steps/s | "
             "tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {MODEL_TITLES.get(r['model'], r['model'])} | {r['layers']} | {r['params']:,} "
                     f"({r['params_non_embedding']:,}) | {r['steps']} | {r['val_bpc']:.4f} | "
                     f"{_fmt(r.get('train_bpc'))} | {_fmt(r.get('steps_per_sec'), 3)} | "
                     f"{_fmt(r.get('tokens_per_sec'), 0)} |")
    return "\n".join(lines) + "\n"


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:,.{digits}f}"
