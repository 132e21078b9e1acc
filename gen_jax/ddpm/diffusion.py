"""Forward process, posterior and training loss of DDPM (Ho et al. 2020, arXiv 2006.11239).

- `q_sample`: eq. 4, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
- `q_posterior`: eq. 6-7, mean and variance of q(x_{t-1} | x_t, x_0).
- `predict_x0_from_eps`: eq. 4 solved for x_0 (used in eq. 11 via the posterior mean).
- v-parametrization (Salimans & Ho 2022, arXiv 2202.00512, sec. 4): v = sqrt(abar) eps - sqrt(1 - abar) x_0.
- `diffusion_loss`: L_simple (eq. 14) with t ~ U{1..T} (0-based t ~ U{0..T-1}, see schedules.py).

All functions take 0-based int timesteps t_B of shape [B] and work under jit/vmap/grad. Math runs in
float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from gen_jax.ddpm.schedules import Schedule, extract
from gen_jax.errors import ConfigError, ShapeError

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_t(x: jax.Array, t: jax.Array) -> None:
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ShapeError(f"timesteps must have shape [B]=[{x.shape[0]}] matching x's batch, got {t.shape}; "
                         "pass one int per example")


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the given standard-normal noise."""
    _check_t(x0, t)
    x0 = x0.astype(jnp.float32)
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise.astype(jnp.float32))


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (eq. 6-7), each broadcast to x."""
    _check_t(x_t, t)
    nd = x_t.ndim
    mean = (extract(schedule.posterior_mean_coef1, t, nd) * x0.astype(jnp.float32)
            + extract(schedule.posterior_mean_coef2, t, nd) * x_t.astype(jnp.float32))
    var = jnp.broadcast_to(extract(schedule.posterior_variance, t, nd), mean.shape)
    log_var = jnp.broadcast_to(extract(schedule.posterior_log_variance_clipped, t, nd), mean.shape)
    return mean, var, log_var


def predict_x0_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    nd = x_t.ndim
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, nd) * x_t.astype(jnp.float32)
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, nd) * eps.astype(jnp.float32))


def predict_eps_from_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    nd = x_t.ndim
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t, nd) * x_t.astype(jnp.float32)
             - x0.astype(jnp.float32)) / extract(schedule.sqrt_recipm1_alphas_cumprod, t, nd))


def v_from_eps_x0(schedule: Schedule, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (the v-prediction target)."""
    nd = x0.ndim
    return (extract(schedule.sqrt_alphas_cumprod, t, nd) * eps.astype(jnp.float32)
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) * x0.astype(jnp.float32))


def eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v (uses abar + (1 - abar) = 1)."""
    nd = x_t.ndim
    return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) * x_t.astype(jnp.float32)
            + extract(schedule.sqrt_alphas_cumprod, t, nd) * v.astype(jnp.float32))


def x0_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    nd = x_t.ndim
    return (extract(schedule.sqrt_alphas_cumprod, t, nd) * x_t.astype(jnp.float32)
            - extract(schedule.sqrt_one_minus_alphas_cumprod, t, nd) * v.astype(jnp.float32))


def diffusion_loss(schedule: Schedule, model_fn: ModelFn, x0: jax.Array, rng: jax.Array, *,
                   prediction: str = "eps", reduction: str = "mean") -> jax.Array:
    """Per-example L_simple (eq. 14): || target - model_fn(x_t, t) ||^2 with t ~ U{0..T-1}, eps ~ N(0, I).

    prediction: "eps" (the paper), "v" (target sqrt(abar) eps - sqrt(1-abar) x_0) or "x0".
    reduction:  "mean" over pixels (the paper's code) or "sum" over pixels (Su's Keras code); the two
                differ by the constant factor H*W*C, which only rescales the learning rate under SGD
                (Adam is nearly invariant to it).
    Returns float32 losses of shape [B]; average them for the batch loss.
    """
    if prediction not in ("eps", "v", "x0"):
        raise ConfigError(f"prediction={prediction!r}: use 'eps', 'v' or 'x0'")
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"reduction={reduction!r}: use 'mean' or 'sum'")
    batch = x0.shape[0]
    t_rng, noise_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (batch,), 0, schedule.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    x_t = q_sample(schedule, x0, t, noise)
    if prediction == "eps":
        target = noise
    elif prediction == "v":
        target = v_from_eps_x0(schedule, x0, noise, t)
    else:
        target = x0.astype(jnp.float32)
    out = model_fn(x_t, t)
    if out.shape != target.shape:
        raise ShapeError(f"model output {out.shape} does not match the target {target.shape}; the model must "
                         "return one value per input pixel and channel")
    sq = jnp.square(out.astype(jnp.float32) - target).reshape(batch, -1)
    return sq.mean(axis=1) if reduction == "mean" else sq.sum(axis=1)
