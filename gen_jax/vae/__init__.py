"""VAEs: importance-sampled log-likelihood (IWAE bound), the von Mises-Fisher distribution with reparameterized
samplers, and MLP Gaussian / hyperspherical VAEs on binarized MNIST.

- `likelihood`: `log_likelihood` (chunked importance sampling, IWAE objective), `elbo`, `DiagGaussian`.
- `vmf`: log-normalizer, log-density, entropy, KL to uniform, mean resultant length, rejection sampling (Wood's or
  the gamma envelope) and Su's inverse-CDF table sampler, `VonMisesFisher`.
- `models`: `GaussianVAE` (IWAE paper / N-VAE), `SphericalVAE` (S-VAE), `binarize`, loss builders.
"""
from gen_jax.vae import vmf
from gen_jax.vae.likelihood import (DiagGaussian, elbo, iwae_bound, log_likelihood, log_weights,
                                    standard_normal_log_prob)
from gen_jax.vae.models import (IWAE_HIDDEN, IWAE_LATENT, GaussianVAE, SphericalVAE, bernoulli_log_prob, binarize,
                                make_iwae_loss, make_log_likelihood_fn, make_vae_loss, svae_ambient_dim)
from gen_jax.vae.vmf import VonMisesFisher

__all__ = ["vmf", "DiagGaussian", "elbo", "iwae_bound", "log_likelihood", "log_weights",
           "standard_normal_log_prob", "IWAE_HIDDEN", "IWAE_LATENT", "GaussianVAE", "SphericalVAE",
           "bernoulli_log_prob", "binarize", "make_iwae_loss", "make_log_likelihood_fn", "make_vae_loss",
           "svae_ambient_dim", "VonMisesFisher"]
