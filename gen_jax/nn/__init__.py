"""Layers shared across papers."""
from gen_jax.nn.rope import apply_rope, rope_angles

__all__ = ["apply_rope", "rope_angles"]
