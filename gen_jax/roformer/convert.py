"""Load RoFormer weights that users already have into `gen_jax.roformer.RoFormer`.

Sources:
- HF transformers PyTorch weights of `RoFormerModel` or `RoFormerForMaskedLM` (a state dict, a
  `pytorch_model.bin`, a `model.safetensors`, or a folder holding one plus `config.json`), including the
  pooler weights (`pooler.dense.*`) that the junnyu/roformer_chinese_sim_char* conversions carry.
- bert4keras TF1 checkpoints (`bert_config.json`, `bert_model.ckpt.*`), read with `tf.train.load_checkpoint`
  when tensorflow is installed; the name mapping itself (`bert4keras_to_params`) works on any
  {name: np.ndarray} dict.
Linear weights: PyTorch stores [out, in], TF and Flax [in, out]. Missing or unexpected names and shape
mismatches raise `CheckpointError` listing all of them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gen_jax.errors import CheckpointError, ConfigError
from gen_jax.roformer.model import RoFormer, RoFormerConfig

# (our path inside the param tree, HF name, bert4keras name, transpose HF weight)
_Entry = tuple[tuple, str, str, bool]


def _dense(ours: tuple, hf: str, tf: str) -> list[_Entry]:
    return [(ours + ("kernel",), hf + ".weight", tf + "/kernel", True),
            (ours + ("bias",), hf + ".bias", tf + "/bias", False)]


def _norm(ours: tuple, hf: str, tf: str) -> list[_Entry]:
    return [(ours + ("scale",), hf + ".weight", tf + "/gamma", False),
            (ours + ("bias",), hf + ".bias", tf + "/beta", False)]


def _name_table(cfg: RoFormerConfig) -> list[_Entry]:
    t: list[_Entry] = [
        (("word_embeddings", "embedding"), "embeddings.word_embeddings.weight",
         "bert/embeddings/word_embeddings", False),
        (("segment_embeddings", "embedding"), "embeddings.token_type_embeddings.weight",
         "bert/embeddings/token_type_embeddings", False),
        *_norm(("embed_norm",), "embeddings.LayerNorm", "bert/embeddings/LayerNorm"),
    ]
    if cfg.emb_size != cfg.hidden_size:
        t += _dense(("embed_project",), "embeddings_project", "bert/encoder/embedding_hidden_mapping_in")
    for i in range(cfg.num_layers):
        hf, tf, o = f"encoder.layer.{i}.", f"bert/encoder/layer_{i}/", ("layers", i)
        t += _dense(o + ("query",), hf + "attention.self.query", tf + "attention/self/query")
        t += _dense(o + ("key",), hf + "attention.self.key", tf + "attention/self/key")
        t += _dense(o + ("value",), hf + "attention.self.value", tf + "attention/self/value")
        t += _dense(o + ("attn_out",), hf + "attention.output.dense", tf + "attention/output/dense")
        t += _norm(o + ("attn_norm",), hf + "attention.output.LayerNorm", tf + "attention/output/LayerNorm")
        t += _dense(o + ("ffn_in",), hf + "intermediate.dense", tf + "intermediate/dense")
        t += _dense(o + ("ffn_out",), hf + "output.dense", tf + "output/dense")
        t += _norm(o + ("ffn_norm",), hf + "output.LayerNorm", tf + "output/LayerNorm")
    if cfg.pooler:
        t += _dense(("pooler",), "pooler.dense", "bert/pooler/dense")
    if cfg.with_mlm:
        t += _dense(("mlm_dense",), "cls.predictions.transform.dense", "cls/predictions/transform/dense")
        t += _norm(("mlm_norm",), "cls.predictions.transform.LayerNorm", "cls/predictions/transform/LayerNorm")
        t.append((("mlm_bias",), "cls.predictions.bias", "cls/predictions/output_bias", False))
    return t


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (bf16 included)
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _assemble(cfg: RoFormerConfig, found: dict[tuple, np.ndarray], missing: list[str], unexpected: list[str],
              source: str) -> dict:
    """Check names and shapes against a fresh model's param tree and return it as a pure nested dict."""
    abstract = nnx.eval_shape(lambda: RoFormer(cfg, rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    mismatched = []

    def fill(tree, prefix=()):
        out = {}
        for k, v in tree.items():
            path = prefix + (k,)
            if isinstance(v, dict):
                out[k] = fill(v, path)
            elif path in found:
                arr = found[path]
                if arr.shape != tuple(v.shape):
                    mismatched.append(f"{'/'.join(map(str, path))}: checkpoint {arr.shape} vs model {tuple(v.shape)}")
                out[k] = jnp.asarray(arr, jnp.float32)
            else:
                missing.append("/".join(map(str, path)))
        return out

    params = fill(pure)
    if missing or unexpected or mismatched:
        lines = [f"cannot load {source} into RoFormer({cfg}):"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {sorted(set(missing))}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {sorted(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatch ({len(mismatched)}): {mismatched}")
        lines.append("  fix: pass a config matching the checkpoint (num_layers, sizes, pooler=None when it has no "
                     "pooler, with_mlm=False when it has no MLM head), or infer it with config_from_hf_state_dict")
        raise CheckpointError("\n".join(lines))
    return params


# ------------------------------------------------------------------------------------------------ HF (PyTorch)

_HF_IGNORED = ("encoder.embed_positions.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
               "embeddings.position_ids")


def _strip_hf_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state_dict.items():
        out[k[len("roformer."):] if k.startswith("roformer.") else k] = v
    return out


def hf_state_dict_to_params(state_dict: Mapping[str, Any], config: RoFormerConfig) -> dict:
    """Map an HF RoFormerModel / RoFormerForMaskedLM state dict (torch tensors or arrays) to our params.

    Returns the pure nested dict of `nnx.split(model, nnx.Param)[1]` (see `nnx.replace_by_pure_dict`).
    The tied decoder weight must equal the word embeddings; RoPE's sinusoid table is not a parameter here.
    """
    sd = {k: _to_numpy(v) for k, v in _strip_hf_prefix(state_dict).items()}
    table = _name_table(config)
    found, missing = {}, []
    for ours, hf, _, transpose in table:
        if hf in sd:
            found[ours] = sd[hf].T if transpose else sd[hf]
        else:
            missing.append(hf)
    known = {e[1] for e in table} | set(_HF_IGNORED)
    unexpected = [k for k in sd if k not in known]
    if config.with_mlm and "cls.predictions.decoder.weight" in sd and "embeddings.word_embeddings.weight" in sd:
        if not np.allclose(sd["cls.predictions.decoder.weight"], sd["embeddings.word_embeddings.weight"]):
            raise CheckpointError("cls.predictions.decoder.weight differs from the word embeddings; this port ties "
                                  "them (as RoFormer does). Re-save the checkpoint with tied output embeddings.")
    return _assemble(config, found, missing, unexpected, "HF state dict")


def params_to_hf_state_dict(params: Mapping, config: RoFormerConfig) -> dict[str, np.ndarray]:
    """Our params -> an HF state dict (prefixed `roformer.` and with the tied decoder when with_mlm), loadable
    into transformers' RoFormerForMaskedLM (or RoFormerModel with_mlm=False; the pooler keys go beside it)."""
    prefix = "roformer." if config.with_mlm else ""
    out: dict[str, np.ndarray] = {}
    for ours, hf, _, transpose in _name_table(config):
        node = params
        for k in ours:
            node = node[k]
        arr = np.asarray(node, np.float32)
        name = hf if hf.startswith("cls.") else prefix + hf
        out[name] = arr.T.copy() if transpose else arr
    if config.with_mlm:
        out["cls.predictions.decoder.weight"] = out[prefix + "embeddings.word_embeddings.weight"]
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    # HF's sinusoid table (sin half, cos half), so a strict load_state_dict succeeds
    d = config.head_dim
    pos = np.arange(config.max_positions)[:, None] / np.power(10000.0, 2 * (np.arange(d // 2)) / d)[None, :]
    out[prefix + "encoder.embed_positions.weight"] = np.concatenate([np.sin(pos), np.cos(pos)], 1).astype(np.float32)
    return out


def config_from_hf_json(cfg_json: Mapping[str, Any], **overrides) -> RoFormerConfig:
    """Our config from an HF RoFormer config.json dict (overrides win, e.g. pooler=None)."""
    if cfg_json.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"hidden_act {cfg_json['hidden_act']!r} unsupported; this port uses exact (erf) gelu")
    kw = dict(vocab_size=cfg_json["vocab_size"], hidden_size=cfg_json["hidden_size"],
              num_layers=cfg_json["num_hidden_layers"], num_heads=cfg_json["num_attention_heads"],
              intermediate_size=cfg_json["intermediate_size"],
              embedding_size=cfg_json.get("embedding_size") or None,
              type_vocab_size=cfg_json.get("type_vocab_size", 2),
              max_positions=min(cfg_json.get("max_position_embeddings", 512), 4096),
              layer_norm_eps=cfg_json.get("layer_norm_eps", 1e-12),
              rotary_value=cfg_json.get("rotary_value", False),
              dropout_rate=cfg_json.get("hidden_dropout_prob", 0.1),
              attention_dropout_rate=cfg_json.get("attention_probs_dropout_prob", 0.1),
              pad_token_id=cfg_json.get("pad_token_id", 0) or 0)
    kw.update(overrides)
    return RoFormerConfig(**kw)


def config_from_hf_state_dict(state_dict: Mapping[str, Any], num_heads: int, **overrides) -> RoFormerConfig:
    """Infer sizes from weight shapes (heads cannot be inferred); pooler / MLM head from which keys exist."""
    sd = _strip_hf_prefix(state_dict)
    try:
        V, E = sd["embeddings.word_embeddings.weight"].shape
        F, D = sd["encoder.layer.0.intermediate.dense.weight"].shape
    except KeyError as e:
        raise CheckpointError(f"not a RoFormer state dict: {e} is missing") from None
    L = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    kw = dict(vocab_size=V, hidden_size=D, num_layers=L, num_heads=num_heads, intermediate_size=F,
              embedding_size=None if E == D else E,
              type_vocab_size=sd["embeddings.token_type_embeddings.weight"].shape[0],
              pooler="linear" if "pooler.dense.weight" in sd else None,
              with_mlm="cls.predictions.bias" in sd)
    kw.update(overrides)
    return RoFormerConfig(**kw)


def _read_hf_weights(path: str) -> dict[str, Any]:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:  # numpy reader cannot hold bf16 but covers float32 files
            from safetensors.numpy import load_file
        return dict(load_file(path))
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading {path} needs PyTorch: pip install torch (CPU build is enough), or "
                              "convert the file to .safetensors") from None
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def load_hf(source: str | Mapping[str, Any], config: RoFormerConfig | None = None, **overrides) -> RoFormer:
    """A RoFormer holding HF weights: `source` is a state dict, a .bin / .safetensors file, or a folder with
    `model.safetensors` or `pytorch_model.bin` (and `config.json`, used when `config` is None).
    Without a config.json pass `config` or `num_heads=...` (other sizes are read from the shapes)."""
    cfg_json = None
    if isinstance(source, str):
        if os.path.isdir(source):
            cfg_path = os.path.join(source, "config.json")
            if os.path.exists(cfg_path):
                with open(cfg_path) as f:
                    cfg_json = json.load(f)
            for name in ("model.safetensors", "pytorch_model.bin"):
                if os.path.exists(os.path.join(source, name)):
                    source_path = os.path.join(source, name)
                    break
            else:
                raise CheckpointError(f"{source} holds neither model.safetensors nor pytorch_model.bin")
        else:
            source_path = source
        if not os.path.exists(source_path):
            raise CheckpointError(f"no such checkpoint file: {source_path}")
        state_dict = _read_hf_weights(source_path)
    else:
        state_dict = dict(source)
    if config is None:
        sd = _strip_hf_prefix(state_dict)
        detected = dict(pooler="linear" if "pooler.dense.weight" in sd else None,
                        with_mlm="cls.predictions.bias" in sd)
        if cfg_json is not None:
            config = config_from_hf_json(cfg_json, **{**detected, **overrides})
        elif "num_heads" in overrides:
            config = config_from_hf_state_dict(state_dict, **overrides)
        else:
            raise ConfigError("no config.json next to the weights: pass config=RoFormerConfig(...) or num_heads=N")
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return _model_from_params(config, hf_state_dict_to_params(state_dict, config))


def _model_from_params(config: RoFormerConfig, params: dict) -> RoFormer:
    model = nnx.eval_shape(lambda: RoFormer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------- bert4keras (TF1 checkpoint)

def _b4k_ignored(name: str) -> bool:
    return (name in ("global_step", "bad_steps", "loss_scale") or "adam" in name.lower()
            or name.startswith("cls/seq_relationship") or name.endswith("position_embeddings")
            or "/optimizer" in name or name.startswith("training/"))


def bert4keras_to_params(variables: Mapping[str, np.ndarray], config: RoFormerConfig) -> dict:
    """Map bert4keras / Google-BERT variable names ({name: array}, e.g. from tf.train.load_checkpoint) to our
    params. The pooler may be named `bert/pooler/dense/*` or `pooler/dense/*`; optimizer slots are ignored."""
    var = {("bert/" + k if k.startswith("pooler/") else k): np.asarray(v, np.float32) for k, v in variables.items()}
    table = _name_table(config)
    found, missing = {}, []
    for ours, _, tf, _ in table:
        if tf in var:
            found[ours] = var[tf]  # TF kernels are already [in, out]
        else:
            missing.append(tf)
    known = {e[2] for e in table}
    unexpected = [k for k in var if k not in known and not _b4k_ignored(k)]
    return _assemble(config, found, missing, unexpected, "bert4keras checkpoint")


def config_from_bert_json(cfg_json: Mapping[str, Any], **overrides) -> RoFormerConfig:
    """Our config from a bert4keras bert_config.json (LayerNorm eps 1e-7 as bert4keras used)."""
    kw = dict(layer_norm_eps=1e-7)
    kw.update(overrides)
    return config_from_hf_json(cfg_json, **kw)


def load_bert4keras(checkpoint_dir: str, config: RoFormerConfig | None = None, **overrides) -> RoFormer:
    """A RoFormer from a bert4keras release folder (bert_config.json + bert_model.ckpt.*); needs tensorflow."""
    try:
        import tensorflow as tf  # noqa: F401
    except ImportError:
        raise CheckpointError("reading a bert4keras TF checkpoint needs tensorflow: `pip install tensorflow` "
                              "(CPU build is enough), or pass {name: array} to bert4keras_to_params") from None
    ckpt = os.path.join(checkpoint_dir, "bert_model.ckpt") if os.path.isdir(checkpoint_dir) else checkpoint_dir
    reader = tf.train.load_checkpoint(ckpt)
    variables = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    if config is None:
        cfg_path = os.path.join(os.path.dirname(ckpt), "bert_config.json")
        if not os.path.exists(cfg_path):
            raise ConfigError(f"no bert_config.json at {cfg_path}: pass config=RoFormerConfig(...)")
        with open(cfg_path) as f:
            cfg_json = json.load(f)
        names = {("bert/" + k if k.startswith("pooler/") else k) for k in variables}
        detected = dict(pooler="linear" if "bert/pooler/dense/kernel" in names else None,
                        with_mlm="cls/predictions/output_bias" in names)
        config = config_from_bert_json(cfg_json, **{**detected, **overrides})
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return _model_from_params(config, bert4keras_to_params(variables, config))
