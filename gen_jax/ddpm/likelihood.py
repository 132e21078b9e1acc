"""The variational bound of DDPM in bits/dim (Ho et al. 2020, arXiv 2006.11239, eq. 5 and sec. 3.3).

    -log p(x_0) <= L = L_T + sum_{t>1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                                  (prior term)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),  x_t ~ q(x_t | x_0)
    L_0     = -log p(x_0 | x_1),  the discretized Gaussian decoder of eq. 13

Data x_0 are uint8 images mapped to [-1, 1] (`uint8_to_model`); the decoder integrates the Gaussian
N(mu_theta(x_1, 1), sigma_1^2) over each of the 256 bins of width 2/255 (the edge bins extend to -inf/+inf),
so L is a bound on the discrete data's NLL. Every term is reported in bits per dimension: nats averaged
over pixels and channels, divided by ln 2.

p(x_{t-1} | x_t) = N(mu~_t(x0_hat, x_t), sigma_t^2 I) with x0_hat from the model's eps (optionally clipped to
[-1, 1], the same model the sampler draws from) and sigma_t^2 fixed to b_t or b~_t (`variance`).

`bits_per_dim` sums all T terms in one `lax.scan` over t (fresh noise per t), or, with
`num_timesteps_eval=K`, estimates the sum of the T-1 KL terms by stratified sampling: t=2..T is cut into K
contiguous blocks, one t is drawn uniformly per block (independently per example) and its term is weighted
by the block size. That is an unbiased estimate of the full sum with K model calls instead of T-1; the
decoder and prior terms are always computed exactly.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from gen_jax.ddpm.diffusion import predict_x0_from_eps, q_posterior, q_sample
from gen_jax.ddpm.samplers import EpsFn, model_variance
from gen_jax.ddpm.schedules import Schedule, extract
from gen_jax.errors import ConfigError, ShapeError

LN2 = math.log(2.0)


def uint8_to_model(x: jax.Array) -> jax.Array:
    """uint8 0..255 -> float32 in [-1, 1]: x / 127.5 - 1."""
    return jnp.asarray(x).astype(jnp.float32) / 127.5 - 1.0


def model_to_uint8(x: jax.Array) -> jax.Array:
    """float in [-1, 1] -> uint8 0..255 (rounded, clipped)."""
    return jnp.clip(jnp.round((jnp.asarray(x, jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def normal_kl(mean1: jax.Array | float, logvar1: jax.Array | float, mean2: jax.Array | float,
              logvar2: jax.Array | float) -> jax.Array:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log_diff_exp(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """log(exp(log_a) - exp(log_b)) for log_a > log_b, accurate when the two are close."""
    d = jnp.minimum(log_b - log_a, -1e-30)
    return log_a + jnp.log(-jnp.expm1(d))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """log P(x) per element, x on the 256-value grid of [-1, 1], for N(means, exp(log_scales)^2) binned.

    P(x) = Phi((x + 1/255 - mu)/sigma) - Phi((x - 1/255 - mu)/sigma), with the lowest bin extended to -inf
    and the highest to +inf, so the 256 probabilities sum to 1. Computed with log Phi and a log-difference
    on whichever tail the bin lies in, so tiny or far-out bins keep their precision.
    """
    x = x.astype(jnp.float32)
    centered = x - means.astype(jnp.float32)
    inv_std = jnp.exp(-log_scales.astype(jnp.float32))
    plus_in = inv_std * (centered + 1.0 / 255.0)
    min_in = inv_std * (centered - 1.0 / 255.0)
    log_cdf_plus = log_ndtr(plus_in)
    log_sf_min = log_ndtr(-min_in)
    # Bin below the mean: difference of CDFs; above it: difference of survival functions (no cancellation).
    mid_left = _log_diff_exp(log_cdf_plus, log_ndtr(min_in))
    mid_right = _log_diff_exp(log_sf_min, log_ndtr(-plus_in))
    log_mid = jnp.where(centered <= 0, mid_left, mid_right)
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_sf_min, log_mid))


def _mean_bits(x_BxD: jax.Array) -> jax.Array:
    return x_BxD.reshape(x_BxD.shape[0], -1).mean(axis=1) / LN2


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example [B]."""
    last = schedule.num_timesteps - 1
    mean = schedule.sqrt_alphas_cumprod[last] * x0.astype(jnp.float32)
    log_var = schedule.log_one_minus_alphas_cumprod[last]
    return _mean_bits(normal_kl(mean, log_var, 0.0, 0.0))


def vlb_term(schedule: Schedule, eps_fn: EpsFn, x0: jax.Array, t: jax.Array, noise: jax.Array, *,
             variance: str = "beta", clip_x0: bool = True) -> jax.Array:
    """The bound's term at 0-based timesteps t [B], in bits/dim [B]: L_0 (decoder NLL) where t == 0,
    else KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), with x_t = q_sample(x0, t, noise)."""
    if t.shape != (x0.shape[0],):
        raise ShapeError(f"t must have shape [B]=[{x0.shape[0]}], got {t.shape}")
    x0 = x0.astype(jnp.float32)
    x_t = q_sample(schedule, x0, t, noise)
    x0_hat = predict_x0_from_eps(schedule, x_t, t, eps_fn(x_t, t))
    if clip_x0:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    model_mean, _, _ = q_posterior(schedule, x0_hat, x_t, t)
    _, log_var_T = model_variance(schedule, variance)
    model_log_var = extract(log_var_T, t, x0.ndim)
    true_mean, _, true_log_var = q_posterior(schedule, x0, x_t, t)
    kl = _mean_bits(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    decoder_nll = -_mean_bits(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    return jnp.where(t == 0, decoder_nll, kl)


def vlb_terms(schedule: Schedule, eps_fn: EpsFn, x0: jax.Array, rng: jax.Array, *, variance: str = "beta",
              clip_x0: bool = True) -> jax.Array:
    """All T terms, [T, B] bits/dim (row t = the term at 0-based t: row 0 is L_0, row t is L_t), in one
    `lax.scan` with fresh noise per t. Their row sum plus `prior_bpd` is the full bound."""
    batch = x0.shape[0]

    def body(_, t):
        noise = jax.random.normal(jax.random.fold_in(rng, t), x0.shape, jnp.float32)
        return None, vlb_term(schedule, eps_fn, x0, jnp.full((batch,), t, jnp.int32), noise,
                              variance=variance, clip_x0=clip_x0)

    _, terms = jax.lax.scan(body, None, jnp.arange(schedule.num_timesteps, dtype=jnp.int32))
    return terms


def bits_per_dim(schedule: Schedule, eps_fn: EpsFn, x0_uint8: jax.Array, rng: jax.Array, *,
                 num_timesteps_eval: int | None = None, variance: str = "beta",
                 clip_x0: bool = True) -> dict[str, jax.Array]:
    """The bound L in bits/dim per example, on uint8 images x0_uint8 [B, H, W, C].

    Returns {"total", "prior", "decoder", "kl"}, each float32 [B], total = prior + decoder + kl, where kl is
    the sum of the T-1 KL terms: exact when num_timesteps_eval is None (or >= T-1), otherwise the stratified
    unbiased estimate with num_timesteps_eval model calls (see the module docstring). Jittable; the
    strata are fixed by the static num_timesteps_eval.
    """
    if not jnp.issubdtype(jnp.asarray(x0_uint8).dtype, jnp.integer):
        raise ShapeError(f"bits_per_dim expects integer (uint8) images, got {jnp.asarray(x0_uint8).dtype}; "
                         "pass the raw 0..255 data, not model-scaled floats")
    T = schedule.num_timesteps
    K = T - 1 if num_timesteps_eval is None else int(num_timesteps_eval)
    if K < 1:
        raise ConfigError(f"num_timesteps_eval={num_timesteps_eval} must be >= 1 (or None for all T terms)")
    K = min(K, T - 1)
    x0 = uint8_to_model(x0_uint8)
    batch = x0.shape[0]
    dec_rng, kl_rng, t_rng = jax.random.split(rng, 3)
    noise = jax.random.normal(dec_rng, x0.shape, jnp.float32)
    decoder = vlb_term(schedule, eps_fn, x0, jnp.zeros((batch,), jnp.int32), noise, variance=variance,
                       clip_x0=clip_x0)
    # Strata of t = 1..T-1 (0-based): [edges[k], edges[k+1]), sizes >= 1 since K <= T-1.
    edges = 1 + (np.arange(K + 1) * (T - 1)) // K
    starts = jnp.asarray(edges[:-1], jnp.int32)
    sizes = jnp.asarray(np.diff(edges), jnp.int32)

    def body(acc, xs):
        k, start, size = xs
        u = jax.random.randint(jax.random.fold_in(t_rng, k), (batch,), 0, size, dtype=jnp.int32)
        nz = jax.random.normal(jax.random.fold_in(kl_rng, k), x0.shape, jnp.float32)
        term = vlb_term(schedule, eps_fn, x0, start + u, nz, variance=variance, clip_x0=clip_x0)
        return acc + size.astype(jnp.float32) * term, None

    kl, _ = jax.lax.scan(body, jnp.zeros((batch,), jnp.float32),
                         (jnp.arange(K, dtype=jnp.int32), starts, sizes))
    prior = prior_bpd(schedule, x0)
    return {"total": prior + decoder + kl, "prior": prior, "decoder": decoder, "kl": kl}
