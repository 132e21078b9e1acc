"""Chinese STS data readers and Spearman evaluation (RoFormer-Sim, kexue.fm posts 8454 / 8541).

No labelled STS data ships with this project: point these readers at your own copies of the files.
- LCQMC / BQ / ATEC / PAWSX / STS-B: tsv lines `text1<TAB>text2<TAB>label` (STS-B: a 0-5 score).
  For training, STS-B scores > 2.5 count as similar (1); for evaluation the raw score is kept.
- CNSD (Chinese SNLI/MNLI): jsonl with `sentence1`, `sentence2`, `gold_label` in
  {contradiction, entailment, neutral} -> 0 / 1 / 2; rows with another gold label ('-') are skipped.
Evaluation: Spearman correlation (x 100 in the table) between cos(u, v) and the label.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import stats

from gen_jax.errors import ConfigError, DataError

TASKS = ("ATEC", "BQ", "LCQMC", "PAWSX", "STS-B")
NLI_LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}

Pair = tuple[str, str, float]


def read_sts_tsv(path: str, task: str | None = None, *, binary: bool = False) -> list[Pair]:
    """(text1, text2, label) rows of a tsv; with `binary=True` an STS-B score becomes 1 if > 2.5 else 0."""
    rows: list[Pair] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise DataError(f"{path}:{n}: expected text1<TAB>text2<TAB>label, got {len(parts)} field(s)")
            t1, t2, lab = parts[0], parts[1], parts[-1]
            try:
                y = float(lab)
            except ValueError:
                if n == 1:  # a header line
                    continue
                raise DataError(f"{path}:{n}: label {lab!r} is not a number") from None
            if binary and (task or "").upper() == "STS-B":
                y = float(y > 2.5)
            rows.append((t1, t2, y))
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def read_cnsd_jsonl(path: str) -> list[tuple[str, str, int]]:
    """(sentence1, sentence2, label) with label 0 contradiction, 1 entailment, 2 neutral."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e})") from None
            if d.get("gold_label") in NLI_LABELS:
                rows.append((d["sentence1"], d["sentence2"], NLI_LABELS[d["gold_label"]]))
    if not rows:
        raise DataError(f"{path} holds no rows with a gold_label in {sorted(NLI_LABELS)}")
    return rows


def cosine_scores(encode_fn: Callable[[Sequence[str]], np.ndarray], pairs: Sequence[Pair],
                  batch_size: int = 256) -> np.ndarray:
    """cos(encode(text1), encode(text2)) per pair; encode_fn maps a list of texts to [N, D] vectors."""
    def enc(texts):
        return np.concatenate([np.asarray(encode_fn(list(texts[i:i + batch_size])), np.float64)
                               for i in range(0, len(texts), batch_size)])
    u, v = enc([p[0] for p in pairs]), enc([p[1] for p in pairs])
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return np.sum(u * v, axis=1)


def evaluate_spearman(encode_fn: Callable[[Sequence[str]], np.ndarray], pairs: Sequence[Pair],
                      batch_size: int = 256) -> float:
    """Spearman correlation (in [-1, 1]) between the pairs' cosine similarities and their labels."""
    if len(pairs) < 2:
        raise DataError("Spearman needs at least two pairs")
    scores = cosine_scores(encode_fn, pairs, batch_size)
    return float(stats.spearmanr(scores, np.asarray([p[2] for p in pairs])).statistic)


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table like the post's: rows are models, columns ATEC BQ LCQMC PAWSX STS-B, Spearman x 100."""
    for model, row in results.items():
        unknown = set(row) - set(TASKS)
        if unknown:
            raise ConfigError(f"unknown task(s) {sorted(unknown)} for {model}; tasks are {list(TASKS)}")
    lines = ["| model | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for model, row in results.items():
        cells = [f"{100 * row[t]:.2f}" if t in row else "-" for t in TASKS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
