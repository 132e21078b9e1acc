"""RoFormer-Sim launcher presets. Each preset's docstring says how to run it, on what, how long, and what to expect.

    python -m experiments.roformer_sim --preset tiny_zh     # offline default: ~10 min on 2 CPU cores
    python -m experiments.roformer_sim --preset tiny        # seconds: smoke test
    python -m experiments.roformer_sim --init PATH --set stage=2          # distil (teacher = frozen PATH)
    python -m experiments.roformer_sim --init PATH --set stage=supervised \\
        --set data.sts_train=lcqmc_train.tsv --set data.sts_eval=lcqmc_test.tsv   # your own labelled files
    python -m experiments.roformer_sim --help               # every key, change any with --set key=value

No labelled STS data (LCQMC, BQ, ATEC, PAWSX, STS-B, CNSD) ships with gen_jax: the supervised stage and the
Spearman evaluation run only on files you supply.
"""
from __future__ import annotations

import dataclasses

from gen_jax.config import TrainConfig
from gen_jax.errors import ConfigError

STAGES = ("1", "2", "supervised")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "zh_news"  # offline Chinese news (People's Daily, Jan 1998); pairs from the same article
    train_split: str = "train"
    eval_split: str = "valid+test"  # held-out articles (splits joined by +): retrieval and generation inputs
    max_articles: int = 0  # use only the first N articles of each split (0: all); for smoke runs
    maxlen: int = 32  # chars (~tokens) per sentence, longer ones are dropped (the original cut at 64 tokens)
    min_chars: int = 8  # shorter sentences are dropped
    min_cjk_fraction: float = 0.7  # drop number tables, bylines and other non-prose lines
    min_overlap: float = 0.2  # char-set Jaccard of the two sentences of a pair: the weak-supervision filter
    max_overlap: float = 0.8  # above this the pair is a template near-copy (tables, captions): dropped
    max_pairs_per_sentence: int = 2  # greedy by overlap; keeps one boilerplate sentence from dominating
    max_train_pairs: int = 0  # 0: every pair that passes the filter
    eval_pairs: int = 512  # held-out pairs (each sentence in at most one); retrieval among all of them
    vocab_size: int = 3000  # BERT WordPiece vocab built on the training text (Chinese chars stay single tokens)
    vocab_min_frequency: int = 2
    whole_word: bool = True  # corrupt whole words (segmented with a lexicon from the tagged corpus), else chars
    corrupt_prob: float = 0.5  # fraction of rows whose source is BART-corrupted (the original: half)
    # --- supervised stage: user-supplied labelled files (none ship with gen_jax)
    sts_train: str | None = None  # tsv `text1<TAB>text2<TAB>label` (LCQMC / BQ / ATEC / PAWSX / STS-B)
    sts_task: str = "LCQMC"  # which format sts_train / sts_eval follow (STS-B scores > 2.5 count as similar)
    nli_train: str | None = None  # CNSD jsonl (sentence1, sentence2, gold_label), mixed in as NLI rows
    sts_eval: str | None = None  # tsv scored by Spearman(cos, label) at the end, any stage


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of a model trained from scratch (ignored with --init, which brings its own config)."""
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 512
    dropout_rate: float = 0.1
    compute_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 175  # retrieval accuracy on the held-out pairs every this many steps (0: only at the end)
    group_size: int = 32  # "among the batch": candidates are the other pairs of a group of this many
    num_generate: int = 5  # held-out inputs shown with generated similar sentences
    gen_candidates: int = 64  # n sampled candidates per input (the original: 100)
    gen_top_k: int = 5  # kept after dedupe and re-ranking by cosine (the original: 20)
    top_p: float = 0.95
    encode_batch: int = 64


@dataclasses.dataclass(frozen=True)
class SimConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    stage: str = "1"  # "1" gen + contrastive + corruption; "2" distillation; "supervised" Sentence-BERT
    init: str | None = None  # released / exported checkpoint: HF folder, .bin, .safetensors, or a gen_jax workdir
    teacher: str | None = None  # stage 2 teacher (same forms as init); default: a frozen copy of init
    sim_scale: float = 20.0  # contrastive logit scale (SimBERT: 30)
    distill_weight: float = 100.0
    train: TrainConfig = TrainConfig(num_steps=700, batch_size=32, learning_rate=1e-3, warmup_steps=70,
                                     grad_clip_norm=1.0, weight_decay=0.01, ema_decay=None, log_every=25,
                                     checkpoint_every=175)
    eval: EvalConfig = EvalConfig()

    def validate(self) -> None:
        d = self.data
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r}: use one of {', '.join(STAGES)}")
        if self.stage == "2" and not (self.init or self.teacher):
            raise ConfigError("stage 2 distils from a teacher: pass --init PATH (the student, whose frozen copy is "
                              "the default teacher) and/or --set teacher=PATH")
        if self.stage == "supervised" and not (d.sts_train or d.nli_train):
            raise ConfigError("stage=supervised trains on labelled pairs, and none ship with gen_jax: pass your own "
                              "--set data.sts_train=PATH.tsv (LCQMC-style text1<TAB>text2<TAB>label) and/or "
                              "--set data.nli_train=PATH.jsonl (CNSD)")
        if d.source != "zh_news":
            raise ConfigError(f"data.source={d.source!r}: the pair builder reads 'zh_news' (the offline corpus)")
        if not 0.0 <= d.min_overlap < d.max_overlap <= 1.0:
            raise ConfigError(f"need 0 <= data.min_overlap < data.max_overlap <= 1, got {d.min_overlap}, "
                              f"{d.max_overlap}")
        if d.maxlen < 4 or d.min_chars < 1:
            raise ConfigError("data.maxlen must be >= 4 and data.min_chars >= 1")
        if not 0.0 <= d.corrupt_prob <= 1.0:
            raise ConfigError(f"data.corrupt_prob={d.corrupt_prob} must lie in [0, 1]")
        if d.eval_pairs < 2 or self.eval.group_size < 2:
            raise ConfigError("data.eval_pairs and eval.group_size must be >= 2 (retrieval needs distractors)")
        if self.model.hidden_size % self.model.num_heads or (self.model.hidden_size // self.model.num_heads) % 2:
            raise ConfigError(f"model.hidden_size={self.model.hidden_size} must be num_heads * an even head size")


def tiny_zh() -> SimConfig:
    """Offline default: a 3-layer H128 RoFormer from scratch on People's Daily pairs, stage 1, 700 steps of 32
    pairs; ~10 min on 2 quiet CPU cores. Shows held-out retrieval accuracy (vs bag-of-chars and chance) and
    generated similar sentences."""
    return SimConfig()


def tiny() -> SimConfig:
    """Seconds-long smoke run for tests: 2 layers H32, 300 articles, a few steps."""
    return SimConfig(
        data=DataConfig(max_articles=300, maxlen=24, eval_pairs=48, vocab_size=1500, max_train_pairs=512),
        model=ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
        train=TrainConfig(num_steps=6, batch_size=8, learning_rate=1e-3, warmup_steps=0, grad_clip_norm=1.0,
                          weight_decay=0.01, ema_decay=None, log_every=2, checkpoint_every=3),
        eval=EvalConfig(every=3, group_size=16, num_generate=2, gen_candidates=8, gen_top_k=3, encode_batch=48))


def small_zh() -> SimConfig:
    """The released small size (L6 H384 A6) from scratch on the offline pairs at maxlen 64; a GPU/TPU or a long
    CPU run (~30k steps). Weak supervision only: expect far less than the released model, trained on 30M pairs."""
    return SimConfig(
        data=DataConfig(maxlen=64, vocab_size=6000),
        model=ModelConfig(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536, dropout_rate=0.2),
        train=TrainConfig(num_steps=30_000, batch_size=48, learning_rate=2e-4, warmup_steps=1000,
                          grad_clip_norm=1.0, weight_decay=0.01, ema_decay=None, log_every=200,
                          checkpoint_every=2000),
        eval=EvalConfig(every=2000, gen_candidates=100, gen_top_k=10))


def finetune() -> SimConfig:
    """Continue a released RoFormer-Sim (`--init PATH`, its vocab.txt) with the original's stage-1 settings: 48
    pairs (96 rows), maxlen 64, AdamW lr 1e-5, wd 0.01. Add `--set stage=2` or `--set stage=supervised ...`
    for the other stages (supervised: lr 2e-5 and 96 pairs in the post)."""
    return SimConfig(
        data=DataConfig(maxlen=64),
        model=ModelConfig(dropout_rate=0.2),
        train=TrainConfig(num_steps=5000, batch_size=48, learning_rate=1e-5, warmup_steps=0, grad_clip_norm=None,
                          weight_decay=0.01, ema_decay=None, log_every=100, checkpoint_every=1000),
        eval=EvalConfig(every=1000, gen_candidates=100, gen_top_k=20))


PRESETS = {"tiny_zh": tiny_zh, "tiny": tiny, "small_zh": small_zh, "finetune": finetune}
