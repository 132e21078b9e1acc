"""FLASH: "Transformer Quality in Linear Time" (Hua, Dai, Liu, Le; ICML 2022) in JAX / Flax NNX.

- `mixed_chunk_attention` / `quadratic_attention` / `dense_reference`: the attention as pure functions.
- `GAU`, `FlashLM` (kind "flash" | "flash_quad", task "clm" | "mlm"), `TransformerPP` baseline with
  `matched_transformer_config`, `count_params`, `lm_loss`, `make_loss_fn`.
- `init_cache`, `prefill`, `decode_step`, `generate`: constant-cost-per-token cached decoding.
"""
from gen_jax.flash.chunk_attention import (EXACT_DECODING, NORMALIZERS, dense_reference, mixed_chunk_attention,
                                           quadratic_attention)
from gen_jax.flash.configs import (PRESETS, FlashConfig, TransformerConfig, gau_layer_params,
                                   matched_transformer_config, preset, transformer_layer_params)
from gen_jax.flash.decode import decode_step, generate, init_cache, make_decode_step, prefill, sample_logits
from gen_jax.flash.gau import GAU, ScaleNorm
from gen_jax.flash.models import (FlashLM, TransformerPP, build, count_params, lm_loss, make_loss_fn,
                                  mlm_corrupt, nats_to_bits)

__all__ = ["EXACT_DECODING", "NORMALIZERS", "dense_reference", "mixed_chunk_attention", "quadratic_attention",
           "PRESETS", "FlashConfig", "TransformerConfig", "gau_layer_params", "matched_transformer_config",
           "preset", "transformer_layer_params", "decode_step", "generate", "init_cache", "make_decode_step",
           "prefill", "sample_logits", "GAU", "ScaleNorm", "FlashLM", "TransformerPP", "build", "count_params",
           "lm_loss", "make_loss_fn", "mlm_corrupt", "nats_to_bits"]
