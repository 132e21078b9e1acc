"""RoFormer (arXiv 2104.09864): encoder, checkpoint conversion, char-level tokenizer."""
from gen_jax.roformer.model import PRESETS, RoFormer, RoFormerConfig, RoFormerOutput, build, unilm_mask

__all__ = ["PRESETS", "RoFormer", "RoFormerConfig", "RoFormerOutput", "build", "unilm_mask"]
