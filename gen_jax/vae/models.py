"""MLP VAEs on binarized MNIST: the Gaussian VAE/IWAE of Burda et al. and the hyperspherical S-VAE.

- `GaussianVAE`: the IWAE paper's one-stochastic-layer model (Burda et al. 2015, sec. 5 / Appendix C):
  encoder 784-200-200 tanh -> mean and log-variance of a 50-d diagonal Gaussian, decoder 50-200-200 tanh
  -> 784 Bernoulli logits, prior N(0, I). With other `hidden`/`latent_dim`/`activation` it is the N-VAE
  of Davidson et al. (2018).
- `SphericalVAE`: the S-VAE (Davidson et al. 2018; Su, post 8404): encoder -> mean direction mu (l2-normalized)
  and kappa (learned: softplus(.) + 1 as in Davidson et al., or a fixed hyperparameter as in Su's script),
  latent z on S^{m-1} in R^m, uniform prior, the same Bernoulli MLP decoder.

Latent dimension convention: `SphericalVAE(ambient_dim=m)` has z in R^m on the (m-1)-sphere, i.e. m - 1
degrees of freedom. Per the project notes (papers/vmf_vae.md), the S-VAE column "d" of Davidson et al.'s
Table 1 uses ambient dimension d + 1 (`svae_ambient_dim(d)`), so it compares S^d with a d-dim Gaussian.

Data: `binarize` draws x ~ Bernoulli(pixel intensity) with a fresh key every call (dynamic binarization;
a fixed binarization overfits, IWAE paper sec. 5). Batches are {"images": uint8 [B, 28, 28, 1]} as the data
layer hands them out (or floats in [0, 1]).

Losses for `gen_jax.train.make_update_fn`, built from a graphdef (docs/architecture.md):

    graphdef, params = nnx.split(GaussianVAE(rngs=nnx.Rngs(0)), nnx.Param)
    loss_fn = make_vae_loss(graphdef)                 # -ELBO, analytic KL
    loss_fn = make_iwae_loss(graphdef, num_samples=5)  # -L_5
    loss, metrics = loss_fn(params, batch, rng)
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gen_jax.errors import ConfigError, ShapeError
from gen_jax.vae import vmf
from gen_jax.vae.likelihood import DiagGaussian, elbo, log_likelihood, standard_normal_log_prob

__all__ = ["binarize", "bernoulli_log_prob", "GaussianVAE", "SphericalVAE", "svae_ambient_dim",
           "make_vae_loss", "make_iwae_loss", "make_log_likelihood_fn", "IWAE_HIDDEN", "IWAE_LATENT"]

IWAE_HIDDEN = (200, 200)
IWAE_LATENT = 50
ACTIVATIONS: dict[str, Callable] = {"tanh": jnp.tanh, "relu": jax.nn.relu}


def svae_ambient_dim(d: int) -> int:
    """Ambient dimension of the S-VAE that Davidson et al.'s table lists under latent dimension d: d + 1."""
    return int(d) + 1


def binarize(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Dynamic binarization: uint8 [B, H, W, C] (or floats in [0, 1]) -> {0, 1} float32 [B, H*W*C]."""
    if images.ndim < 2:
        raise ShapeError(f"images must be batched [B, ...], got shape {images.shape}")
    p = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    p = p.reshape(p.shape[0], -1)
    return jax.random.bernoulli(rng, p).astype(jnp.float32)


def bernoulli_log_prob(logits: jax.Array, x: jax.Array) -> jax.Array:
    """sum_i [x_i log sigmoid(l_i) + (1 - x_i) log sigmoid(-l_i)] = sum_i [x_i l_i - softplus(l_i)]."""
    return jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)


class MLP(nnx.Module):
    """Dense layers with an activation after every layer but the last."""

    def __init__(self, sizes: Sequence[int], activation: str, *, rngs: nnx.Rngs):
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, h: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = act(h)
        return h


class _BernoulliDecoderVAE(nnx.Module):
    x_dim: int

    def decode_logits(self, z: jax.Array) -> jax.Array:
        """Bernoulli logits [..., x_dim] for latents z [..., latent]."""
        return self.decoder(z)

    def decode_log_prob(self, z: jax.Array, x: jax.Array) -> jax.Array:
        """log p(x | z) [..., B] for z [..., B, latent] and binary x [B, x_dim]."""
        if x.shape[-1] != self.x_dim:
            raise ShapeError(f"x has {x.shape[-1]} features but the model expects {self.x_dim}; "
                             "flatten images to [B, H*W*C] (see binarize)")
        return bernoulli_log_prob(self.decode_logits(z), x)


class GaussianVAE(_BernoulliDecoderVAE):
    """Diagonal-Gaussian posterior, N(0, I) prior, Bernoulli MLP decoder (defaults: the IWAE paper's)."""

    def __init__(self, x_dim: int = 784, hidden: Sequence[int] = IWAE_HIDDEN, latent_dim: int = IWAE_LATENT,
                 activation: str = "tanh", *, rngs: nnx.Rngs):
        self.x_dim, self.latent_dim = x_dim, latent_dim
        self.encoder = MLP([x_dim, *hidden, 2 * latent_dim], activation, rngs=rngs)
        self.decoder = MLP([latent_dim, *reversed(tuple(hidden)), x_dim], activation, rngs=rngs)

    def encode(self, x_BxD: jax.Array) -> DiagGaussian:
        mean, log_var = jnp.split(self.encoder(x_BxD), 2, axis=-1)
        return DiagGaussian(mean, log_var)

    def prior_log_prob(self, z: jax.Array) -> jax.Array:
        return standard_normal_log_prob(z)

    def sample_prior(self, rng: jax.Array, n: int) -> jax.Array:
        return jax.random.normal(rng, (n, self.latent_dim))


class SphericalVAE(_BernoulliDecoderVAE):
    """vMF posterior on S^{m-1} (m = ambient_dim), uniform prior, Bernoulli MLP decoder.

    kappa=None learns kappa = softplus(Dense(h)) + 1 per example (Davidson et al.); a float fixes it (Su).
    `encode(x, table)` uses Su's inverse-CDF sampler when given `vmf.make_inverse_cdf_table(m, kappa)`
    (fixed kappa only), rejection sampling (Wood's or the gamma envelope, `vmf.sample_w_wood`) otherwise.
    """

    def __init__(self, x_dim: int = 784, hidden: Sequence[int] = (256, 128), ambient_dim: int = 3,
                 kappa: float | None = None, activation: str = "relu", *, rngs: nnx.Rngs):
        if ambient_dim < 2:
            raise ConfigError(f"ambient_dim must be >= 2 (the latent lives on S^(ambient_dim-1)), got {ambient_dim}")
        if kappa is not None and not kappa >= 0:
            raise ConfigError(f"a fixed kappa must be >= 0, got {kappa}")
        self.x_dim, self.ambient_dim = x_dim, ambient_dim
        self.fixed_kappa = None if kappa is None else float(kappa)
        self.encoder = MLP([x_dim, *hidden], activation, rngs=rngs)
        self.activation = activation
        self.to_mu = nnx.Linear(hidden[-1], ambient_dim, rngs=rngs)
        self.to_kappa = nnx.Linear(hidden[-1], 1, rngs=rngs) if kappa is None else None
        self.decoder = MLP([ambient_dim, *reversed(tuple(hidden)), x_dim], activation, rngs=rngs)

    def encode(self, x_BxD: jax.Array, table: jax.Array | None = None) -> vmf.VonMisesFisher:
        h = ACTIVATIONS[self.activation](self.encoder(x_BxD))
        m = self.to_mu(h)
        mu = m / jnp.sqrt(jnp.maximum(jnp.sum(m * m, axis=-1, keepdims=True), 1e-12))
        if self.fixed_kappa is None:
            if table is not None:
                raise ConfigError("the inverse-CDF table sampler needs a fixed kappa; build the model with kappa=...")
            kappa = jax.nn.softplus(self.to_kappa(h)[..., 0]) + 1.0
        else:
            kappa = jnp.full(mu.shape[:-1], self.fixed_kappa, mu.dtype)
        return vmf.VonMisesFisher(mu, kappa, table)

    def prior_log_prob(self, z: jax.Array) -> jax.Array:
        return jnp.full(z.shape[:-1], -vmf.log_sphere_area(self.ambient_dim), z.dtype)

    def sample_prior(self, rng: jax.Array, n: int) -> jax.Array:
        g = jax.random.normal(rng, (n, self.ambient_dim))
        return g / jnp.linalg.norm(g, axis=-1, keepdims=True)


def _encode_fn(model, table) -> Callable:
    if table is None:
        return model.encode
    return lambda x: model.encode(x, table)


def make_vae_loss(graphdef: nnx.GraphDef, *, num_samples: int = 1, analytic_kl: bool = True,
                  table: np.ndarray | None = None) -> Callable:
    """`loss_fn(params, batch, rng) -> (-mean ELBO, metrics)` on dynamically binarized batch["images"].

    Metrics (nats per example): elbo, reconstruction, kl. With a fixed-kappa SphericalVAE and analytic_kl,
    the KL is Su's constant and the loss is reconstruction plus that constant.
    """
    def loss_fn(params, batch, rng):
        model = nnx.merge(graphdef, params)
        k_bin, k_z = jax.random.split(rng)
        x = binarize(k_bin, batch["images"])
        elbo_B, parts = elbo(k_z, x, _encode_fn(model, table), model.decode_log_prob, model.prior_log_prob,
                             num_samples=num_samples, analytic_kl=analytic_kl)
        loss = -jnp.mean(elbo_B)
        return loss, {"elbo": -loss, "reconstruction": jnp.mean(parts["reconstruction"]),
                      "kl": jnp.mean(parts["kl"])}

    return loss_fn


def make_iwae_loss(graphdef: nnx.GraphDef, *, num_samples: int, table: np.ndarray | None = None) -> Callable:
    """`loss_fn(params, batch, rng) -> (-mean L_K, metrics)`: the IWAE objective with K = num_samples."""
    def loss_fn(params, batch, rng):
        model = nnx.merge(graphdef, params)
        k_bin, k_z = jax.random.split(rng)
        x = binarize(k_bin, batch["images"])
        bound_B = log_likelihood(k_z, x, _encode_fn(model, table), model.decode_log_prob, model.prior_log_prob,
                                 num_samples=num_samples)
        loss = -jnp.mean(bound_B)
        return loss, {"iwae_bound": -loss}

    return loss_fn


def make_log_likelihood_fn(graphdef: nnx.GraphDef, *, num_samples: int, chunk_size: int | None = None,
                           table: np.ndarray | None = None) -> Callable:
    """Jitted `fn(params, x_BxD, rng) -> log p(x) estimates [B]` (nats) for already-binarized x [B, x_dim];
    the test NLL is `-fn(...).mean()` over the test set (IWAE paper: K = 5000)."""
    @jax.jit
    def fn(params, x_BxD, rng):
        model = nnx.merge(graphdef, params)
        return log_likelihood(rng, x_BxD, _encode_fn(model, table), model.decode_log_prob, model.prior_log_prob,
                              num_samples=num_samples, chunk_size=chunk_size)

    return fn
