"""GAN losses on discriminator outputs (logits or critic values), D and G variants, scalar results.

- hinge (Lim and Ye 2017; Miyato et al., SNGAN, ICLR 2018, eq. 16/17):
  L_D = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))],  L_G = -E[D(G(z))]
- non-saturating BCE on logits (Goodfellow et al. 2014, sec. 3):
  L_D = E[softplus(-D(x))] + E[softplus(D(G(z)))] = -E[log s(D(x))] - E[log(1 - s(D(G(z))))],
  L_G = E[softplus(-D(G(z)))] = -E[log s(D(G(z)))]
- WGAN (Arjovsky et al. 2017, eq. 3): L_D = E[D(G(z))] - E[D(x)],  L_G = -E[D(G(z))]

GN-GAN feeds its normalized f_hat to hinge or BCE (not WGAN). Inputs are [B] or [B, 1].
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from gen_jax.errors import ConfigError, ShapeError

__all__ = ["d_hinge_loss", "g_hinge_loss", "d_bce_loss", "g_bce_loss", "d_wgan_loss", "g_wgan_loss",
           "get_loss", "LOSSES"]


def _scores(s: jax.Array, name: str) -> jax.Array:
    if s.ndim == 2 and s.shape[1] == 1:
        return s[:, 0]
    if s.ndim != 1:
        raise ShapeError(f"{name} must be discriminator scores of shape [B] or [B, 1], got {s.shape}")
    return s


def d_hinge_loss(real_B: jax.Array, fake_B: jax.Array) -> jax.Array:
    """Hinge discriminator loss E[relu(1 - D(x))] + E[relu(1 + D(G(z)))] from raw scores [B]."""
    real_B, fake_B = _scores(real_B, "real_B"), _scores(fake_B, "fake_B")
    return jnp.mean(jax.nn.relu(1.0 - real_B)) + jnp.mean(jax.nn.relu(1.0 + fake_B))


def g_hinge_loss(fake_B: jax.Array) -> jax.Array:
    """Hinge generator loss -E[D(G(z))]."""
    return -jnp.mean(_scores(fake_B, "fake_B"))


def d_bce_loss(real_B: jax.Array, fake_B: jax.Array) -> jax.Array:
    """Binary cross-entropy discriminator loss -E[log sigmoid(D(x))] - E[log(1 - sigmoid(D(G(z))))] from logits."""
    real_B, fake_B = _scores(real_B, "real_B"), _scores(fake_B, "fake_B")
    return jnp.mean(jax.nn.softplus(-real_B)) + jnp.mean(jax.nn.softplus(fake_B))


def g_bce_loss(fake_B: jax.Array) -> jax.Array:
    """Non-saturating generator loss -E[log sigmoid(D(G(z)))]."""
    return jnp.mean(jax.nn.softplus(-_scores(fake_B, "fake_B")))


def d_wgan_loss(real_B: jax.Array, fake_B: jax.Array) -> jax.Array:
    """Wasserstein critic loss E[D(G(z))] - E[D(x)] (add `gradient_penalty` for WGAN-GP)."""
    return jnp.mean(_scores(fake_B, "fake_B")) - jnp.mean(_scores(real_B, "real_B"))


def g_wgan_loss(fake_B: jax.Array) -> jax.Array:
    """Wasserstein generator loss -E[D(G(z))]."""
    return -jnp.mean(_scores(fake_B, "fake_B"))


LOSSES: dict[str, tuple[Callable, Callable]] = {
    "hinge": (d_hinge_loss, g_hinge_loss),
    "bce": (d_bce_loss, g_bce_loss),
    "wgan": (d_wgan_loss, g_wgan_loss),
}


def get_loss(name: str) -> tuple[Callable, Callable]:
    """(d_loss(real_B, fake_B), g_loss(fake_B)) for 'hinge', 'bce' (non-saturating) or 'wgan'."""
    if name not in LOSSES:
        raise ConfigError(f"unknown GAN loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]
