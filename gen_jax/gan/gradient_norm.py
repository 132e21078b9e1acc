"""Gradient normalization of GAN discriminators, as function transforms, and the WGAN-GP penalty.

GN-GAN (Wu, Fang, Zhang, Wang and Chang, "Gradient Normalization for Generative Adversarial Networks",
ICCV 2021, arXiv 2109.02235, eq. 8 and its use in the losses, eq. 9/10):

    f_hat(x) = f(x) / (||grad_x f(x)|| + |f(x)|)                                    (GN)

GraN-GAN (Bhaskara, Aumentado-Armstrong, Jepson and Levinshtein, "GraN-GAN: Piecewise Gradient
Normalization for Generative Adversarial Networks", WACV 2022, arXiv 2111.03162, eq. 6):

    f_hat(x) = K f(x) ||grad_x f(x)|| / (||grad_x f(x)||^2 + eps)                   (GraN)

WGAN-GP (Gulrajani et al., NeurIPS 2017, arXiv 1704.00028, eq. 3): E[(||grad f(x_hat)|| - 1)^2] at random
interpolates x_hat of real and fake examples.

A discriminator here is any pure function `f(params, x_Bx...) -> [B]` (or [B, 1]). The per-example input
gradient is computed as the gradient of sum_b f(params, x)_b with respect to x, which equals the
per-example gradient ONLY when example b's output depends on example b's input alone: the discriminator must
have no batch-coupled layers (no BatchNorm in training mode, no minibatch-stddev). Use GroupNorm,
LayerNorm, spectral norm or no normalization in D.

The transforms return ordinary differentiable functions: `jax.grad` of a loss of `f_hat` with respect to
params (D step) or to the generator's parameters through x (G step) differentiates through grad_x f, i.e.
takes second-order derivatives (double backprop). `stop_norm_gradient=True` treats ||grad_x f|| as a
constant in that backward pass, which removes the double backprop (the cheaper variant for the G step).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from gen_jax.errors import ShapeError

Discriminator = Callable[[Any, jax.Array], jax.Array]

__all__ = ["input_grad_norm", "gradient_normalize", "gran_normalize", "gradient_penalty"]


def _per_example(out: jax.Array, batch: int) -> jax.Array:
    """[B] or [B, 1] -> [B]; anything else is an error (the transforms need one score per example)."""
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != (batch,):
        raise ShapeError(f"the discriminator must return one score per example, shape [{batch}] or "
                         f"[{batch}, 1]; got {out.shape}. Reduce its output to one logit per example.")
    return out


def _safe_norm(sq: jax.Array) -> jax.Array:
    """sqrt that is exact, with zero (not NaN) derivative where its argument is 0."""
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def input_grad_norm(f: Discriminator, params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(f(params, x) as [B], ||grad_x f(params, x)_b|| over each example's flattened input, [B]).

    Uses grad of the batch sum, which is the per-example gradient when D has no batch-coupled layers.
    """
    if x.ndim < 1:
        raise ShapeError(f"x must have a leading batch axis, got shape {x.shape}")
    batch = x.shape[0]

    def total(x_in):
        out_B = _per_example(f(params, x_in), batch)
        return jnp.sum(out_B), out_B

    (_, out_B), grad_x = jax.value_and_grad(total, has_aux=True)(x)
    sq_B = jnp.sum(jnp.square(grad_x).reshape(batch, -1), axis=1)
    return out_B, _safe_norm(sq_B)


def gradient_normalize(f: Discriminator, *, stop_norm_gradient: bool = False) -> Discriminator:
    """GN: f_hat(params, x) = f / (||grad_x f|| + |f|), one value per example, |f_hat| <= 1.

    Where both f and its gradient vanish f_hat is defined as 0. With `stop_norm_gradient` the gradient norm
    is a constant for differentiation (no second-order terms; the fast variant for the G step).
    """

    def f_hat(params: Any, x: jax.Array) -> jax.Array:
        out_B, gnorm_B = input_grad_norm(f, params, x)
        if stop_norm_gradient:
            gnorm_B = jax.lax.stop_gradient(gnorm_B)
        denom_B = gnorm_B + jnp.abs(out_B)
        return jnp.where(denom_B > 0, out_B / jnp.where(denom_B > 0, denom_B, 1.0), 0.0)

    return f_hat


def gran_normalize(f: Discriminator, *, eps: float = 1e-4, K: float = 1.0,
                   stop_norm_gradient: bool = False) -> Discriminator:
    """GraN: f_hat(params, x) = K f ||grad_x f|| / (||grad_x f||^2 + eps), one value per example.

    About K f / ||grad_x f|| where the gradient is large against sqrt(eps); |f_hat| <= K |f| / (2 sqrt(eps)).
    `eps` and `K` are the paper's epsilon and output scale (check them against the paper's tables for a
    given dataset); `stop_norm_gradient` as in `gradient_normalize`.
    """
    if eps <= 0:
        raise ValueError(f"gran_normalize needs eps > 0 (got {eps}); it keeps the ratio finite where "
                         "grad f = 0")

    def f_hat(params: Any, x: jax.Array) -> jax.Array:
        out_B, gnorm_B = input_grad_norm(f, params, x)
        if stop_norm_gradient:
            gnorm_B = jax.lax.stop_gradient(gnorm_B)
        return K * out_B * gnorm_B / (jnp.square(gnorm_B) + eps)

    return f_hat


def gradient_penalty(f: Discriminator, params: Any, real: jax.Array, fake: jax.Array,
                     rng: jax.Array) -> jax.Array:
    """WGAN-GP penalty mean_b (||grad_x f(x_hat_b)|| - 1)^2, x_hat = a real + (1 - a) fake, a ~ U[0, 1].

    One a per example. Returns the unweighted mean: the loss multiplies it by lambda (10 in the paper).
    """
    if real.shape != fake.shape:
        raise ShapeError(f"real and fake batches must have the same shape, got {real.shape} and "
                         f"{fake.shape}")
    alpha = jax.random.uniform(rng, (real.shape[0],) + (1,) * (real.ndim - 1), dtype=real.dtype)
    x_hat = alpha * real + (1.0 - alpha) * fake
    _, gnorm_B = input_grad_norm(f, params, x_hat)
    return jnp.mean(jnp.square(gnorm_B - 1.0))
