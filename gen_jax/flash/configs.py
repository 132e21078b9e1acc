"""Model configs of FLASH / FLASH-Quad language models and the Transformer++ baseline, with presets and
the parameter-matching rule of the paper (2 GAU layers ~ 1 attention + FFN layer, sec. 2.1)."""
from __future__ import annotations

import dataclasses
import math

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
    attention_impl: str | None = None  # jax.nn.dot_product_attention: None (auto), "xla" or "cudnn"
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
    if name not in PRESETS:
        raise ConfigError(f"unknown FLASH preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
