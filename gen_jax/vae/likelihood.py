"""Importance-sampled log p(x) for latent-variable models, the IWAE bound and the ELBO.

Su, post 8791 ("VAE part 8"); Burda, Grosse, Salakhutdinov, "Importance Weighted Autoencoders" (2015),
eq. 8. With a proposal q(z|x) (the encoder) and K draws z_k ~ q(z|x):

    log p(x) >= L_K = E[ log (1/K) sum_k w_k ],   w_k = p(x|z_k) p(z_k) / q(z_k|x)

L_1 is the ELBO, L_K rises monotonically with K (Burda et al., Theorem 1) and tends to log p(x). The same
estimate is the evaluation metric (K = 5000) and, differentiated through reparameterized samples, the IWAE
training objective (K > 1).

The interface is functional: `encode(x) -> posterior`, where a posterior has `.sample(rng, n) -> [n, B, ...]`
(reparameterized) and `.log_prob(z [..., B, ...]) -> [..., B]` (`DiagGaussian`, `vmf.VonMisesFisher`);
`decode_log_prob(z [..., B, ...], x [B, ...]) -> [..., B]`; `prior_log_prob(z [..., B, ...]) -> [..., B]`.

Memory: the K samples are drawn in chunks of `chunk_size` inside a `lax.scan` that carries a running
logsumexp, so only one chunk of decoder outputs is alive at a time. Sample k always uses the k-th of
`jax.random.split(rng, K)`, so the estimate does not depend on the chunk size.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from gen_jax.errors import ConfigError, ShapeError

__all__ = ["DiagGaussian", "standard_normal_log_prob", "log_likelihood", "log_weights", "elbo", "iwae_bound"]

Posterior = Any
LOG_2PI = math.log(2.0 * math.pi)


@struct.dataclass
class DiagGaussian:
    """N(mean, diag(exp(log_var))) over the last axis; mean, log_var [B, D]."""

    mean: jax.Array
    log_var: jax.Array

    def sample(self, rng: jax.Array, n: int) -> jax.Array:
        """n reparameterized draws [n, B, D]: mean + exp(log_var / 2) * eps."""
        eps = jax.random.normal(rng, (n, *self.mean.shape), self.mean.dtype)
        return self.mean + jnp.exp(0.5 * self.log_var) * eps

    def log_prob(self, z: jax.Array) -> jax.Array:
        """log density of z [..., B, D] summed over D -> [..., B]."""
        sq = jnp.square(z - self.mean) * jnp.exp(-self.log_var)
        return -0.5 * jnp.sum(sq + self.log_var + LOG_2PI, axis=-1)

    def kl_to_prior(self) -> jax.Array:
        """KL(q || N(0, I)) per example [B] (Kingma and Welling 2014, Appendix B)."""
        return 0.5 * jnp.sum(jnp.exp(self.log_var) + jnp.square(self.mean) - 1.0 - self.log_var, axis=-1)


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
    """log N(z; 0, I) summed over the last axis."""
    return -0.5 * jnp.sum(jnp.square(z) + LOG_2PI, axis=-1)


def log_weights(rng: jax.Array, x: jax.Array, posterior: Posterior, decode_log_prob: Callable,
                prior_log_prob: Callable, n: int) -> jax.Array:
    """log w [n, B] for n draws from `posterior` (one key per draw: sample k uses split(rng, n)[k])."""
    return _log_weights_from_keys(jax.random.split(rng, n), x, posterior, decode_log_prob, prior_log_prob)


def _log_weights_from_keys(keys: jax.Array, x: jax.Array, posterior: Posterior, decode_log_prob: Callable,
                           prior_log_prob: Callable) -> jax.Array:
    z = jax.vmap(lambda k: posterior.sample(k, 1)[0])(keys)  # [n, B, ...], one key per draw
    return decode_log_prob(z, x) + prior_log_prob(z) - posterior.log_prob(z)


def log_likelihood(rng: jax.Array, x: jax.Array, encode: Callable[[jax.Array], Posterior],
                   decode_log_prob: Callable, prior_log_prob: Callable, *, num_samples: int,
                   chunk_size: int | None = None) -> jax.Array:
    """Per-example importance-sampled estimate log (1/K) sum_k w_k of log p(x) [B], K = num_samples.

    Differentiable (reparameterized samples), so `-log_likelihood(...).mean()` with K > 1 is the IWAE loss.
    `chunk_size` (default K) must divide K; chunks run sequentially in a `lax.scan` with a running
    logsumexp, so memory is that of one chunk.
    """
    K = int(num_samples)
    chunk = K if chunk_size is None else int(chunk_size)
    if K < 1 or chunk < 1 or K % chunk:
        raise ConfigError(f"num_samples={num_samples} must be a positive multiple of chunk_size={chunk_size}; "
                          "pick a chunk size that divides the number of importance samples")
    if x.ndim < 1:
        raise ShapeError(f"x must be batched [B, ...], got shape {x.shape}")
    posterior = encode(x)
    num_chunks = K // chunk
    keys = jax.random.split(rng, K)
    keys = keys.reshape(num_chunks, chunk, *keys.shape[1:])

    def chunk_lse(keys_c):
        log_w = _log_weights_from_keys(keys_c, x, posterior, decode_log_prob, prior_log_prob)
        return jax.nn.logsumexp(log_w, axis=0)

    acc = chunk_lse(keys[0])
    if num_chunks > 1:
        def body(acc_B, keys_c):
            return jnp.logaddexp(acc_B, chunk_lse(keys_c)), None

        acc, _ = jax.lax.scan(body, acc, keys[1:])
    return acc - math.log(K)


def iwae_bound(rng: jax.Array, x: jax.Array, encode: Callable, decode_log_prob: Callable,
               prior_log_prob: Callable, *, num_samples: int) -> jax.Array:
    """The IWAE objective L_K per example [B] (Burda et al. eq. 8): `log_likelihood` with one chunk."""
    return log_likelihood(rng, x, encode, decode_log_prob, prior_log_prob, num_samples=num_samples)


def elbo(rng: jax.Array, x: jax.Array, encode: Callable, decode_log_prob: Callable, prior_log_prob: Callable,
         *, num_samples: int = 1, analytic_kl: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ELBO per example [B] = E_q[log p(x|z)] - KL(q || p), averaged over `num_samples` draws, and its parts
    {"reconstruction": [B], "kl": [B]}.

    analytic_kl: use the posterior's closed-form `kl_to_prior()` (DiagGaussian: to N(0, I);
    VonMisesFisher: to the uniform distribution); `prior_log_prob` must then be that prior and is unused.
    Otherwise the KL is the Monte Carlo estimate log q(z|x) - log p(z) on the same draws.
    """
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    posterior = encode(x)
    z = posterior.sample(rng, num_samples)
    recon = jnp.mean(decode_log_prob(z, x), axis=0)
    if analytic_kl:
        if not hasattr(posterior, "kl_to_prior"):
            raise ConfigError(f"{type(posterior).__name__} has no closed-form kl_to_prior(); use analytic_kl=False")
        kl = posterior.kl_to_prior()
    else:
        kl = jnp.mean(posterior.log_prob(z) - prior_log_prob(z), axis=0)
    return recon - kl, {"reconstruction": recon, "kl": kl}
