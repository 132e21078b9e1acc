"""Noise schedules of DDPM (Ho, Jain, Abbeel 2020, arXiv 2006.11239, sec. 2 and 4) and the cosine schedule
(Nichol & Dhariwal 2021, arXiv 2102.09672, eq. 17).

Paper notation (eq. 2, 4, 6, 7):
    q(x_t | x_{t-1}) = N(sqrt(1 - b_t) x_{t-1}, b_t I),    a_t = 1 - b_t,    abar_t = prod_{s<=t} a_s
    q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    q(x_{t-1} | x_t, x_0) = N(mu~_t, b~_t I),
        mu~_t = sqrt(abar_{t-1}) b_t / (1 - abar_t) x_0 + sqrt(a_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        b~_t  = (1 - abar_{t-1}) / (1 - abar_t) b_t

Index convention: arrays have length T and are indexed by a 0-based `t` in [0, T); index `t` holds the
paper's step t+1. So `betas[0]` is b_1, `alphas_cumprod[T-1]` is abar_T, `alphas_cumprod_prev[0]` is
abar_0 = 1 and `posterior_variance[0]` is b~_1 = 0 (x_0 is known exactly given x_1 and x_0).

Su's notation (kexue.fm post 9119, "DDPM = demolish + rebuild") writes x_t = alpha_t x_{t-1} + beta_t eps
with alpha_t^2 + beta_t^2 = 1, i.e. his alpha_t = sqrt(a_t) = sqrt(1 - b_t) and his beta_t = sqrt(b_t);
his abar_t = prod alpha_s = sqrt(paper's abar_t) and his betabar_t = sqrt(1 - abar_t^2). His schedule
alpha_t = sqrt(1 - 0.02 t / T) is (up to the tiny 1e-4 start) the paper's linear schedule. The schedule
stores the paper's quantities; `su_alphas`/`su_alphas_bar` give his, and a test checks both forms agree.

Everything is computed in float64 numpy and stored as float32 arrays, so the schedule is exact to float32
whatever precision the model computes in.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gen_jax.errors import ConfigError


class Schedule(struct.PyTreeNode):
    """Per-step constants of a diffusion, each a float32 array of length T (0-based index = paper's t+1)."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def su_alphas(self) -> jax.Array:
        """Su's alpha_t = sqrt(1 - b_t) (his x_t = alpha_t x_{t-1} + beta_t eps)."""
        return jnp.sqrt(self.alphas)

    @property
    def su_alphas_bar(self) -> jax.Array:
        """Su's abar_t = prod alpha_s = sqrt(paper's abar_t)."""
        return self.sqrt_alphas_cumprod


def schedule_from_betas(betas) -> Schedule:
    """All schedule constants from b_1..b_T (float64 math, float32 storage)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ConfigError(f"betas must be a 1-D array of length T >= 2, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas < 1)):
        raise ConfigError("every beta must lie in (0, 1); clip the schedule (e.g. max_beta=0.999)")
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # b~_1 = 0, so log(b~_1) is -inf; the original code substitutes b~_2 there (the decoder's variance).
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return Schedule(
        betas=f32(betas),
        alphas=f32(alphas),
        alphas_cumprod=f32(abar),
        alphas_cumprod_prev=f32(abar_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(abar)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
        log_one_minus_alphas_cumprod=f32(np.log(1.0 - abar)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / abar)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / abar - 1.0)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_log_var),
        posterior_mean_coef1=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
        posterior_mean_coef2=f32((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)),
    )


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """The paper's schedule (sec. 4): b_t linear from `beta_start` to `beta_end` over T steps."""
    if T < 2:
        raise ConfigError(f"T={T}: a diffusion needs at least 2 steps")
    return schedule_from_betas(np.linspace(beta_start, beta_end, T, dtype=np.float64))


def cosine_schedule(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2).

    b_t = 1 - abar(t)/abar(t-1), clipped at `max_beta` (near t = T the raw b_t -> 1, which would make
    1/sqrt(a_t) blow up); abar is then recomputed from the clipped betas.
    """
    if T < 2:
        raise ConfigError(f"T={T}: a diffusion needs at least 2 steps")
    f = lambda u: np.cos((u / T + s) / (1.0 + s) * math.pi / 2.0) ** 2
    t = np.arange(T + 1, dtype=np.float64)
    abar = f(t) / f(0.0)
    betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
    return schedule_from_betas(betas)


def make_schedule(name: str, T: int = 1000) -> Schedule:
    """`"linear"` or `"cosine"` with the papers' defaults."""
    if name == "linear":
        return linear_schedule(T)
    if name == "cosine":
        return cosine_schedule(T)
    raise ConfigError(f"unknown schedule {name!r}; use 'linear' or 'cosine'")


def extract(arr_T: jax.Array, t_B: jax.Array, ndim: int) -> jax.Array:
    """arr[t] reshaped to [B, 1, ..., 1] (ndim axes) to broadcast against x_Bx...."""
    return jnp.take(arr_T, t_B, axis=0).reshape((-1,) + (1,) * (ndim - 1))
