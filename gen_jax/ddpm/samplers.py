"""Samplers for a trained denoiser: ancestral DDPM (Ho et al. 2020, arXiv 2006.11239, Algorithm 2, eq. 11)
and DDIM (Song, Meng, Ermon 2020, arXiv 2010.02502, eq. 12 and 16).

Every sampler is driven by `eps_fn(x_t, t) -> eps` with x_t float32 [B, ...] and t an int32 array [B] of
0-based timesteps (index t = the paper's step t+1, see schedules.py). The whole reverse loop is one
`lax.scan`, so `jax.jit(lambda rng: ddim_sample(schedule, eps_fn, shape, rng))` compiles a single program
with the model closed over; no host round trip per step.

Ancestral step (eq. 11 written through the posterior, as in the original code):
    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)       [optionally clipped to [-1, 1]]
    x_{t-1} = mu~_t(x0_hat, x_t) + sigma_t z,  sigma_t^2 = b_t ("beta") or b~_t ("posterior"), no z at t=1.
Without clipping mu~_t(x0_hat, x_t) equals eq. 11's (x_t - b_t / sqrt(1 - abar_t) eps) / sqrt(a_t).

DDIM step from t to the previous timestep s of the subsequence (eq. 12, sigma from eq. 16):
    sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)
    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps + sigma z,     abar_s = 1 after the last step.
eta = 0 is the deterministic DDIM, eta = 1 matches DDPM's posterior variance on the subsequence. When x0_hat
is clipped, eps is kept as predicted (as diffusers' DDIMScheduler does).

DDIM timestep subsequence (`spacing`):
    "leading"  (default; the DDIM paper's "uniform" and diffusers' "leading" with steps_offset=0):
               t_i = i * (T // num_steps), i = 0..num_steps-1, e.g. T=1000, 50 steps: 980, 960, ..., 0.
    "trailing" (diffusers' "trailing"): round(T - i T / num_steps) - 1, e.g. 999, 979, ..., 19; it starts
               at the last step, so the first model input is pure noise as in training.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gen_jax.ddpm.diffusion import eps_from_v, predict_eps_from_x0, predict_x0_from_eps, q_posterior
from gen_jax.ddpm.schedules import Schedule, extract
from gen_jax.errors import ConfigError

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def eps_fn_from_model(schedule: Schedule, model_fn: EpsFn, prediction: str = "eps") -> EpsFn:
    """Wrap a model that predicts eps, v or x0 into an eps_fn for the samplers and the bound."""
    if prediction == "eps":
        return lambda x_t, t: model_fn(x_t, t).astype(jnp.float32)
    if prediction == "v":
        return lambda x_t, t: eps_from_v(schedule, x_t, t, model_fn(x_t, t))
    if prediction == "x0":
        return lambda x_t, t: predict_eps_from_x0(schedule, x_t, t, model_fn(x_t, t))
    raise ConfigError(f"prediction={prediction!r}: use 'eps', 'v' or 'x0'")


def model_variance(schedule: Schedule, variance: str) -> tuple[jax.Array, jax.Array]:
    """The fixed reverse-process variance sigma_t^2 and its log, arrays of length T.

    "beta": sigma_t^2 = b_t; "posterior": sigma_t^2 = b~_t. The log at index 0 is log(b~_2) for both, as in
    the original code (b~_1 = 0); it only matters for the decoder p(x_0 | x_1) of the bound.
    """
    if variance == "beta":
        var = schedule.betas
        log_var = jnp.concatenate([schedule.posterior_log_variance_clipped[:1], jnp.log(schedule.betas[1:])])
    elif variance == "posterior":
        var = schedule.posterior_variance
        log_var = schedule.posterior_log_variance_clipped
    else:
        raise ConfigError(f"variance={variance!r}: use 'beta' (sigma^2 = beta_t) or 'posterior' (beta tilde)")
    return var, log_var


def ddpm_step(schedule: Schedule, eps: jax.Array, x_t: jax.Array, t: jax.Array, noise: jax.Array, *,
              variance: str = "beta", clip_x0: bool = True) -> jax.Array:
    """One ancestral step x_t -> x_{t-1} given the predicted eps and fresh noise z (no noise at t index 0)."""
    x0_hat = predict_x0_from_eps(schedule, x_t, t, eps)
    if clip_x0:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    mean, _, _ = q_posterior(schedule, x0_hat, x_t, t)
    var, _ = model_variance(schedule, variance)
    sigma = jnp.sqrt(extract(var, t, x_t.ndim))
    nonzero = (t > 0).astype(jnp.float32).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return mean + nonzero * sigma * noise.astype(jnp.float32)


def ddpm_sample(schedule: Schedule, eps_fn: EpsFn, shape: tuple[int, ...], rng: jax.Array, *,
                variance: str = "beta", clip_x0: bool = True, return_trajectory: bool = False):
    """Algorithm 2: x_T ~ N(0, I), then T ancestral steps in one `lax.scan`.

    Returns x_0 (float32, `shape`), or (x_0, trajectory) with trajectory [T+1, *shape] = x_T, ..., x_0.
    """
    model_variance(schedule, variance)  # validate early
    init_rng, step_rng = jax.random.split(rng)
    x_T = jax.random.normal(init_rng, shape, jnp.float32)
    batch = shape[0]

    def body(x, t):
        t_B = jnp.full((batch,), t, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(step_rng, t), shape, jnp.float32)
        x = ddpm_step(schedule, eps_fn(x, t_B), x, t_B, noise, variance=variance, clip_x0=clip_x0)
        return x, (x if return_trajectory else None)

    ts = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    x0, traj = jax.lax.scan(body, x_T, ts)
    if return_trajectory:
        return x0, jnp.concatenate([x_T[None], traj], axis=0)
    return x0


def ddim_timesteps(T: int, num_steps: int, spacing: str = "leading") -> np.ndarray:
    """The descending DDIM subsequence of 0-based timesteps (see the module docstring)."""
    if not 1 <= num_steps <= T:
        raise ConfigError(f"num_steps={num_steps} must be in [1, T={T}]")
    if spacing == "leading":
        ts = np.arange(num_steps) * (T // num_steps)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64)[:num_steps] - 1
    else:
        raise ConfigError(f"spacing={spacing!r}: use 'leading' or 'trailing'")
    return np.sort(ts)[::-1].astype(np.int32)


def ddim_step(schedule: Schedule, eps: jax.Array, x_t: jax.Array, t: jax.Array, t_prev: jax.Array,
              noise: jax.Array, *, eta: float = 0.0, clip_x0: bool = True) -> jax.Array:
    """One DDIM step x_t -> x_{t_prev} (t_prev = -1 means "to x_0": abar_prev = 1)."""
    nd = x_t.ndim
    abar_t = extract(schedule.alphas_cumprod, t, nd)
    abar_prev = jnp.where(t_prev >= 0, jnp.take(schedule.alphas_cumprod, jnp.maximum(t_prev, 0)), 1.0)
    abar_prev = abar_prev.reshape((-1,) + (1,) * (nd - 1))
    eps = eps.astype(jnp.float32)
    x0_hat = predict_x0_from_eps(schedule, x_t, t, eps)
    if clip_x0:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
    return jnp.sqrt(abar_prev) * x0_hat + direction + sigma * noise.astype(jnp.float32)


def ddim_sample(schedule: Schedule, eps_fn: EpsFn, shape: tuple[int, ...], rng: jax.Array, *,
                num_steps: int = 50, eta: float = 0.0, clip_x0: bool = True, spacing: str = "leading",
                return_trajectory: bool = False):
    """DDIM over `num_steps` timesteps of the subsequence, in one `lax.scan`.

    Returns x_0 (float32, `shape`), or (x_0, trajectory) with trajectory [num_steps+1, *shape].
    """
    ts = ddim_timesteps(schedule.num_timesteps, num_steps, spacing)
    ts_prev = np.append(ts[1:], -1).astype(np.int32)
    init_rng, step_rng = jax.random.split(rng)
    x_T = jax.random.normal(init_rng, shape, jnp.float32)
    batch = shape[0]

    def body(x, xs):
        i, t, t_prev = xs
        t_B = jnp.full((batch,), t, jnp.int32)
        tp_B = jnp.full((batch,), t_prev, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(step_rng, i), shape, jnp.float32)
        x = ddim_step(schedule, eps_fn(x, t_B), x, t_B, tp_B, noise, eta=eta, clip_x0=clip_x0)
        return x, (x if return_trajectory else None)

    xs = (jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(ts), jnp.asarray(ts_prev))
    x0, traj = jax.lax.scan(body, x_T, xs)
    if return_trajectory:
        return x0, jnp.concatenate([x_T[None], traj], axis=0)
    return x0
