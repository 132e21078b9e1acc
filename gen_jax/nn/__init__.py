"""Layers and sampling utilities shared across papers."""
from gen_jax.nn.conv import conv_general_dilated
from gen_jax.nn.dense import flat_dot, flat_dot_general
from gen_jax.nn.rope import apply_rope, rope_angles
from gen_jax.nn.sampling import nucleus_cutoff, nucleus_sample, sample_from_probs

__all__ = ["conv_general_dilated", "flat_dot", "flat_dot_general", "apply_rope", "rope_angles", "nucleus_cutoff",
           "nucleus_sample", "sample_from_probs"]
