"""DDPM (Ho, Jain, Abbeel 2020) and DDIM (Song et al. 2020): schedules, forward process and loss, samplers,
the variational bound in bits/dim, and the U-Net. Pure functions of arrays plus one NNX module."""
from gen_jax.ddpm.diffusion import (diffusion_loss, eps_from_v, predict_eps_from_x0, predict_x0_from_eps,
                                    q_posterior, q_sample, v_from_eps_x0, x0_from_v)
from gen_jax.ddpm.likelihood import (bits_per_dim, discretized_gaussian_log_likelihood, model_to_uint8,
                                     normal_kl, prior_bpd, uint8_to_model, vlb_term, vlb_terms)
from gen_jax.ddpm.samplers import (ddim_sample, ddim_step, ddim_timesteps, ddpm_sample, ddpm_step,
                                   eps_fn_from_model, model_variance)
from gen_jax.ddpm.schedules import (Schedule, cosine_schedule, extract, linear_schedule, make_schedule,
                                    schedule_from_betas)
from gen_jax.ddpm.unet import UNet, count_params, timestep_embedding

__all__ = [
    "Schedule", "linear_schedule", "cosine_schedule", "make_schedule", "schedule_from_betas", "extract",
    "q_sample", "q_posterior", "predict_x0_from_eps", "predict_eps_from_x0", "eps_from_v", "v_from_eps_x0",
    "x0_from_v", "diffusion_loss",
    "ddpm_sample", "ddpm_step", "ddim_sample", "ddim_step", "ddim_timesteps", "eps_fn_from_model",
    "model_variance",
    "bits_per_dim", "vlb_term", "vlb_terms", "prior_bpd", "normal_kl", "discretized_gaussian_log_likelihood",
    "uint8_to_model", "model_to_uint8",
    "UNet", "count_params", "timestep_embedding",
]
