"""Model configs of FLASH / FLASH-Quad language models and the Transformer++ baseline, with presets and
the parameter-matching rule of the paper (2 GAU layers ~ 1 attention + FFN layer, sec. 2.1)."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

from gen_jax.config import TrainConfig
from gen_jax.errors import ConfigError
from gen_jax.flash.chunk_attention import NORMALIZERS

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """A stack of gated attention units (GAU) with an LM head.

    kind: "flash" (mixed chunk attention, linear in T) or "flash_quad" (full T x T attention).
    task: "clm" (causal LM) or "mlm" (bidirectional masked LM head).
    normalizer: "relu2_n", "relu2_const" or "softmax_plus" (see `gen_jax.flash.chunk_attention`);
    norm_const: the constant of "relu2_const" (None: chunk_size).
    """
    vocab_size: int = 256
    d_model: int = 512
    num_layers: int = 8
    expansion: int = 2  # e = expansion * d_model (paper: e = 2d)
    key_size: int = 128  # s
    kind: str = "flash"
    chunk_size: int = 256  # C
    normalizer: str = "relu2_n"
    norm_const: float | None = None
    task: str = "clm"
    norm: str = "scalenorm"  # pre-norm: "scalenorm" or "layernorm"
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    init_std: float = 0.02
    compute_dtype: str = "float32"  # "bfloat16": compute in bf16, params stay float32
    remat: bool = False  # rematerialise each layer in the backward pass (long sequences)

    def __post_init__(self):
        if self.kind not in ("flash", "flash_quad"):
            raise ConfigError(f"kind must be 'flash' or 'flash_quad', got {self.kind!r}")
        if self.task not in ("clm", "mlm"):
            raise ConfigError(f"task must be 'clm' (causal LM) or 'mlm' (masked LM), got {self.task!r}")
        if self.normalizer not in NORMALIZERS:
            raise ConfigError(f"normalizer must be one of {NORMALIZERS}, got {self.normalizer!r}")
        if self.norm not in ("scalenorm", "layernorm"):
            raise ConfigError(f"norm must be 'scalenorm' or 'layernorm', got {self.norm!r}")
        if self.compute_dtype not in _DTYPES:
            raise ConfigError(f"compute_dtype must be one of {_DTYPES}, got {self.compute_dtype!r}")
        if self.key_size % 2:
            raise ConfigError(f"key_size {self.key_size} is odd; RoPE rotates pairs, use an even key_size")
        if self.chunk_size < 1 or min(self.d_model, self.num_layers, self.expansion, self.vocab_size) < 1:
            raise ConfigError("chunk_size, d_model, num_layers, expansion and vocab_size must all be >= 1")

    @property
    def causal(self) -> bool:
        return self.task == "clm"

    @property
    def expansion_size(self) -> int:
        return self.expansion * self.d_model

    @property
    def attn_const(self) -> float:
        return float(self.norm_const if self.norm_const is not None else self.chunk_size)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Transformer++ (paper sec. 4 baseline): pre-norm, RoPE, softmax attention, GLU (SwiGLU) FFN."""
    vocab_size: int = 256
    d_model: int = 512
    num_layers: int = 4
    num_heads: int = 8
    ffn_size: int = 1365  # GLU hidden size f; 8d/3 gives 12 d^2 per layer, like 2 GAUs
    task: str = "clm"
    norm: str = "scalenorm"
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    init_std: float = 0.02
    compute_dtype: str = "float32"
    attention_impl: Literal["xla", "cudnn"] | None = None  # jax.nn.dot_product_attention; None: automatic
    remat: bool = False

    def __post_init__(self):
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ConfigError(f"d_model {self.d_model} must split into {self.num_heads} heads of even size")
        if self.task not in ("clm", "mlm"):
            raise ConfigError(f"task must be 'clm' or 'mlm', got {self.task!r}")
        if self.norm not in ("scalenorm", "layernorm"):
            raise ConfigError(f"norm must be 'scalenorm' or 'layernorm', got {self.norm!r}")
        if self.compute_dtype not in _DTYPES:
            raise ConfigError(f"compute_dtype must be one of {_DTYPES}, got {self.compute_dtype!r}")
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ConfigError(f"attention_impl must be None, 'xla' or 'cudnn', got {self.attention_impl!r}")

    @property
    def causal(self) -> bool:
        return self.task == "clm"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def _norm_params(norm: str, d: int) -> int:
    return 1 if norm == "scalenorm" else 2 * d


def gau_layer_params(cfg: FlashConfig) -> int:
    """Parameters of one GAU layer (closed form; tests check it against the module)."""
    d, e, s = cfg.d_model, cfg.expansion_size, cfg.key_size
    heads = 4 if cfg.kind == "flash" else 2
    return (_norm_params(cfg.norm, d) + d * (2 * e + s) + (2 * e + s)  # pre-norm, W_u|W_v|W_z with bias
            + 2 * heads * s  # per-dim scale and offset of Q/K maps
            + e * d + d)  # W_o with bias


def transformer_layer_params(cfg: TransformerConfig) -> int:
    """Parameters of one Transformer++ layer: 2 norms, Wqkv + Wo (no bias), GLU FFN (no bias)."""
    d, f = cfg.d_model, cfg.ffn_size
    return 2 * _norm_params(cfg.norm, d) + 4 * d * d + 3 * d * f


def matched_transformer_config(cfg: FlashConfig, *, num_heads: int | None = None, **overrides) -> TransformerConfig:
    """The Transformer++ with the same vocab/width/head/precision and matched non-embedding parameters.

    Layers: ceil(L / 2) (2 GAUs ~ 1 attention + FFN layer); the GLU size f is solved so that the layer
    parameter totals agree (to within d*3 parameters). Heads default to d / 64 (at least 1).
    """
    d = cfg.d_model
    heads = num_heads or max(1, d // 64)
    layers = max(1, math.ceil(cfg.num_layers / 2))
    target = cfg.num_layers * gau_layer_params(cfg) / layers
    base = dataclasses.replace(TransformerConfig(), vocab_size=cfg.vocab_size, d_model=d, num_layers=layers,
                               num_heads=heads, ffn_size=1, task=cfg.task, norm=cfg.norm,
                               tie_embeddings=cfg.tie_embeddings, rope_base=cfg.rope_base,
                               init_std=cfg.init_std, compute_dtype=cfg.compute_dtype, remat=cfg.remat)
    f = max(1, round((target - transformer_layer_params(base) + 3 * d) / (3 * d)))
    return dataclasses.replace(base, ffn_size=f, **overrides)


PRESETS: dict[str, FlashConfig] = {
    # tests and CPU smoke runs
    "tiny": FlashConfig(vocab_size=64, d_model=32, num_layers=2, key_size=16, chunk_size=4),
    # character LM on a laptop/CPU (Shakespeare-sized corpora)
    "char_small": FlashConfig(vocab_size=256, d_model=256, num_layers=8, key_size=128, chunk_size=128),
    # paper's base size (sec. 4: FLASH/FLASH-Quad ~110M with d=768; here 24 GAUs ~ 12 Transformer layers)
    "base": FlashConfig(vocab_size=32000, d_model=768, num_layers=24, key_size=128, chunk_size=256),
}


def preset(name: str, **overrides) -> FlashConfig:
    """The named model preset ("tiny", "char_small", "base") with `overrides` applied (dataclass fields)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown FLASH preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------- launcher
# `python -m experiments.flash`: character LMs on the offline corpora, FLASH vs FLASH-Quad vs Transformer++.

MODEL_NAMES = ("flash", "flash_quad", "transformer_pp")


@dataclasses.dataclass(frozen=True)
class LMDataConfig:
    source: str = "shakespeare"  # "shakespeare" or "zh_news" (gen_jax.data.load_text, offline)
    data_dir: str | None = None  # a directory holding the pinned package archive (no network needed)
    seq_len: int = 512  # context length T of training and evaluation windows
    min_char_count: int = 1  # rarer training characters map to <unk> (zh_news has ~4.6k distinct chars)
    eval_split: str = "valid"


@dataclasses.dataclass(frozen=True)
class LMModelConfig:
    """Shared by the three models; Transformer++ gets ceil(num_layers / 2) layers and a GLU size solved for
    matched non-embedding parameters (`matched_transformer_config`)."""
    d_model: int = 128
    num_layers: int = 4  # GAU layers of FLASH / FLASH-Quad
    expansion: int = 2  # e = expansion * d_model
    key_size: int = 64  # s
    chunk_size: int = 128  # C of FLASH's mixed chunk attention
    normalizer: str = "relu2_n"  # "relu2_n" (paper), "relu2_const" or "softmax_plus" (Su)
    norm: str = "scalenorm"
    transformer_heads: int | None = None  # None: d_model / 64
    compute_dtype: str = "float32"  # "bfloat16" on accelerators
    remat: bool = False  # recompute each layer in the backward pass (long contexts)


@dataclasses.dataclass(frozen=True)
class LMEvalConfig:
    every_steps: int = 100  # validation bits/char on `curve_windows` windows (the curve); 0: only at the end
    curve_windows: int = 32
    final_windows: int = 0  # windows of the final, reported number (0: the whole split)
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class LMSampleConfig:
    prompt: str = "ROMEO:\n"  # after an <eos>, i.e. at the start of a document
    num_tokens: int = 400  # prompt + num_tokens beyond data.seq_len runs RoPE past the trained length
    num_samples: int = 2
    temperature: float = 0.8
    top_p: float = 0.95


@dataclasses.dataclass(frozen=True)
class FlashRunConfig:
    """Train each of `models` for train.num_steps on the same batches, then compare validation bits/char."""
    models: tuple[str, ...] = MODEL_NAMES
    data: LMDataConfig = LMDataConfig()
    model: LMModelConfig = LMModelConfig()
    # YNNPACK fusions off on the CPU: FLASH trains ~1.2x faster at this size, the others 1.01-1.10x (RESULTS.md)
    train: TrainConfig = TrainConfig(num_steps=300, batch_size=8, learning_rate=2e-3, warmup_steps=30,
                                     grad_clip_norm=1.0, ema_decay=None, log_every=50, checkpoint_every=100,
                                     cpu_ynn_fusions=False)
    lr_schedule: str = "cosine"  # "cosine" (decay to 10% at train.num_steps) or "constant" after warmup
    eval: LMEvalConfig = LMEvalConfig()
    sample: LMSampleConfig = LMSampleConfig()

    def validate(self) -> None:
        bad = [m for m in self.models if m not in MODEL_NAMES]
        if bad or not self.models or len(set(self.models)) != len(self.models):
            raise ConfigError(f"models={','.join(self.models)!r}: give distinct names from {MODEL_NAMES}, "
                              "e.g. --set models=flash,transformer_pp")
        if self.data.source not in ("shakespeare", "zh_news"):
            raise ConfigError(f"data.source={self.data.source!r}: use 'shakespeare' or 'zh_news'")
        if self.data.eval_split not in ("valid", "test"):
            raise ConfigError(f"data.eval_split={self.data.eval_split!r}: use 'valid' or 'test'")
        if self.data.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.data.seq_len} is too short; use >= 2")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"lr_schedule={self.lr_schedule!r}: use 'cosine' or 'constant'")
        if self.eval.batch_size < 1 or self.eval.curve_windows < 1 or self.eval.final_windows < 0:
            raise ConfigError("eval.batch_size and eval.curve_windows must be >= 1, eval.final_windows >= 0")
        if self.sample.num_samples < 0 or self.sample.num_tokens < 0 or self.sample.temperature < 0:
            raise ConfigError("sample.num_samples, sample.num_tokens and sample.temperature must be >= 0")
        # builds (and so validates) the model configs
        lm_model_config(self, "flash", vocab_size=8)
        lm_model_config(self, "transformer_pp", vocab_size=8)


def lm_model_config(cfg: FlashRunConfig, name: str, vocab_size: int) -> FlashConfig | TransformerConfig:
    """The FlashConfig (name "flash" / "flash_quad") or matched TransformerConfig ("transformer_pp")."""
    m = cfg.model
    flash = FlashConfig(vocab_size=vocab_size, d_model=m.d_model, num_layers=m.num_layers,
                        expansion=m.expansion, key_size=m.key_size, chunk_size=m.chunk_size,
                        normalizer=m.normalizer, norm=m.norm, task="clm",
                        kind="flash_quad" if name == "flash_quad" else "flash",
                        compute_dtype=m.compute_dtype, remat=m.remat)
    if name == "transformer_pp":
        return matched_transformer_config(flash, num_heads=m.transformer_heads)
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    return flash


def lm_shakespeare() -> FlashRunConfig:
    """Shakespeare char LM at context 512: FLASH, FLASH-Quad, Transformer++ (0.44M params each), 300 steps
    of 8 x 512 chars each; ~9 min for all three on 2 quiet CPU cores (estimate from CPU time per step). Measured: FLASH 3.30 val bits/char at
    step 300. The paper's relu^2 attention starts slowly from its init (q.k ~ 0, so relu^2 ~ 0): on short
    budgets `--set model.normalizer=softmax_plus` learns much faster (see the README)."""
    return FlashRunConfig()


def lm_zh_news() -> FlashRunConfig:
    """People's Daily 1998 (Chinese) char LM at context 512, same models and budget as `shakespeare`
    (chars seen < 2 times -> <unk>); ~10 min on 2 quiet CPU cores. Bits/char are far higher than English
    (~3.4k-char vocabulary, one char ~ one morpheme)."""
    return dataclasses.replace(FlashRunConfig(), data=LMDataConfig(source="zh_news", min_char_count=2),
                               sample=LMSampleConfig(prompt="中国"))


def lm_shakespeare_long() -> FlashRunConfig:
    """Long context, for one accelerator (GPU/TPU): context 4096, d=512, 8 GAUs (~13M params), C=256,
    bf16, 5000 steps of 16 x 4096 chars. Hours on a GPU; where FLASH's linear cost beats full attention."""
    return FlashRunConfig(
        data=LMDataConfig(seq_len=4096),
        model=LMModelConfig(d_model=512, num_layers=8, key_size=128, chunk_size=256, compute_dtype="bfloat16"),
        train=TrainConfig(num_steps=5000, batch_size=16, learning_rate=1e-3, warmup_steps=500,
                          grad_clip_norm=1.0, ema_decay=None, log_every=100, checkpoint_every=500,
                          compute_dtype="bfloat16", cpu_ynn_fusions=False),
        eval=LMEvalConfig(every_steps=500, curve_windows=16, batch_size=8),
        sample=LMSampleConfig(num_tokens=1000))


def lm_tiny() -> FlashRunConfig:
    """Seconds per model: tests and smoke runs (Shakespeare, context 64, d=32, 2 GAUs, 6 steps)."""
    return FlashRunConfig(
        data=LMDataConfig(seq_len=64),
        model=LMModelConfig(d_model=32, num_layers=2, key_size=16, chunk_size=16),
        train=TrainConfig(num_steps=6, batch_size=8, learning_rate=3e-3, warmup_steps=2, grad_clip_norm=1.0,
                          ema_decay=None, log_every=3, checkpoint_every=3, cpu_ynn_fusions=False),
        eval=LMEvalConfig(every_steps=3, curve_windows=8, final_windows=16, batch_size=8),
        sample=LMSampleConfig(num_tokens=24, num_samples=1))


LAUNCH_PRESETS = {"shakespeare": lm_shakespeare, "zh_news": lm_zh_news, "shakespeare_long": lm_shakespeare_long,
                  "tiny": lm_tiny}
