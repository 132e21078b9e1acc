"""Schedules, forward process, posterior and single sampler steps against closed forms and against
HF diffusers' PyTorch DDPMScheduler / DDIMScheduler (an independent implementation)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gen_jax.ddpm import (cosine_schedule, ddim_step, ddim_timesteps, ddpm_step, diffusion_loss, eps_from_v,
                          linear_schedule, predict_x0_from_eps, q_posterior, q_sample, v_from_eps_x0,
                          x0_from_v)
from gen_jax.errors import ConfigError, ShapeError

T = 1000


def test_linear_schedule_matches_closed_form_and_index_convention():
    sch = linear_schedule(T)
    betas = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(sch.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(sch.alphas_cumprod, abar, rtol=1e-5)
    # index 0 is the paper's t=1: abar_0 = 1 and the posterior variance b~_1 = 0
    assert sch.alphas_cumprod_prev[0] == 1.0 and sch.posterior_variance[0] == 0.0
    np.testing.assert_allclose(sch.alphas_cumprod_prev[1:], abar[:-1], rtol=1e-5)
    post = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    np.testing.assert_allclose(sch.posterior_variance[1:], post, rtol=1e-5)
    np.testing.assert_allclose(sch.posterior_log_variance_clipped[1:], np.log(post), rtol=1e-5)
    np.testing.assert_allclose(sch.posterior_log_variance_clipped[0], np.log(post[0]), rtol=1e-5)
    for name in ("betas", "alphas_cumprod", "posterior_mean_coef1", "sqrt_recipm1_alphas_cumprod"):
        assert getattr(sch, name).dtype == jnp.float32 and getattr(sch, name).shape == (T,)
    # The paper's schedule ends almost at pure noise: abar_T ~ 4e-5.
    assert 1e-5 < float(sch.alphas_cumprod[-1]) < 1e-4


def test_cosine_schedule_matches_its_definition():
    sch = cosine_schedule(T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (1, 10, 500, 900):  # paper's t; array index t-1; beta clipping only bites at the very end
        np.testing.assert_allclose(float(sch.alphas_cumprod[t - 1]), f(t) / f(0), rtol=1e-5)
    assert float(sch.betas.max()) <= 0.999 + 1e-7
    assert np.all(np.diff(np.asarray(sch.alphas_cumprod)) < 0)


def test_su_notation_agrees_with_paper_notation():
    """Su: x_t = alpha_t x_{t-1} + beta_t eps, alpha_t^2 + beta_t^2 = 1, alpha_t = sqrt(1 - 0.02 t / T)."""
    sch = linear_schedule(T, beta_start=0.02 / T, beta_end=0.02)  # exactly Su's alpha_t^2 = 1 - 0.02 t/T
    t = np.arange(1, T + 1)
    su_alpha = np.sqrt(1 - 0.02 * t / T)
    su_beta = np.sqrt(1 - su_alpha**2)
    np.testing.assert_allclose(sch.su_alphas, su_alpha, rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(sch.betas), su_beta, rtol=1e-5)
    su_abar = np.cumprod(su_alpha)
    np.testing.assert_allclose(sch.su_alphas_bar, su_abar, rtol=1e-4)
    # Both forms give the same x_t from the same x_0 and eps: x_t = abar x_0 + sqrt(1 - abar^2) eps (Su).
    x0 = jax.random.normal(jax.random.key(0), (4, 3))
    eps = jax.random.normal(jax.random.key(1), (4, 3))
    tt = jnp.array([0, 10, 500, 999])
    ab = su_abar[np.asarray(tt)][:, None]
    np.testing.assert_allclose(q_sample(sch, x0, tt, eps), ab * x0 + np.sqrt(1 - ab**2) * eps,
                               rtol=1e-4, atol=1e-5)
    # Composing Su's one-step forward twice equals the paper's q(x_t|x_0) in distribution: variances add up.
    a1, a2 = su_alpha[0], su_alpha[1]
    var_two_steps = a2**2 * (1 - a1**2) + (1 - a2**2)
    np.testing.assert_allclose(var_two_steps, float(sch.sqrt_one_minus_alphas_cumprod[1]) ** 2, rtol=1e-5)


def test_q_posterior_matches_eq_7_and_is_the_bayes_posterior():
    sch = linear_schedule(T)
    key = jax.random.key(0)
    x0, xt = jax.random.normal(key, (2, 5, 3))
    t = jnp.array([3, 700, 0, 999, 1])
    mean, var, log_var = q_posterior(sch, x0, xt, t)
    b = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1 - b)
    abar_prev = np.append(1.0, abar[:-1])
    tn = np.asarray(t)
    expect = (np.sqrt(abar_prev[tn]) * b[tn] / (1 - abar[tn]))[:, None] * np.asarray(x0) + \
             (np.sqrt(1 - b[tn]) * (1 - abar_prev[tn]) / (1 - abar[tn]))[:, None] * np.asarray(xt)
    np.testing.assert_allclose(mean, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[:, 0], (1 - abar_prev[tn]) / (1 - abar[tn]) * b[tn], rtol=1e-5, atol=1e-12)
    # Bayes by completing the square: q(x_{t-1}|x_0) q(x_t|x_{t-1}) -> precision 1/(1-abar_prev) + a_t/b_t.
    k = 700
    prec = 1 / (1 - abar_prev[k]) + (1 - b[k]) / b[k]
    m = (np.sqrt(abar_prev[k]) * np.asarray(x0[1]) / (1 - abar_prev[k])
         + np.sqrt(1 - b[k]) * np.asarray(xt[1]) / b[k]) / prec
    np.testing.assert_allclose(mean[1], m, rtol=1e-4)
    np.testing.assert_allclose(float(var[1, 0]), 1 / prec, rtol=1e-5)
    assert log_var.shape == mean.shape


def test_eps_x0_v_conversions_are_consistent():
    sch = cosine_schedule(T)
    k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k0, (6, 4, 4, 2))
    eps = jax.random.normal(k1, x0.shape)
    t = jax.random.randint(k2, (6,), 0, T)
    xt = q_sample(sch, x0, t, eps)
    np.testing.assert_allclose(predict_x0_from_eps(sch, xt, t, eps), x0, atol=2e-3)
    v = v_from_eps_x0(sch, x0, eps, t)
    np.testing.assert_allclose(eps_from_v(sch, xt, t, v), eps, atol=1e-4)
    np.testing.assert_allclose(x0_from_v(sch, xt, t, v), x0, atol=1e-4)


def test_loss_is_zero_for_the_true_noise_and_reductions_differ_by_pixel_count():
    """A model that sees the noise it must predict (an oracle built from the loss's own rng) scores 0."""
    sch = linear_schedule(100)
    x0 = jax.random.uniform(jax.random.key(3), (5, 4, 4, 1), minval=-1, maxval=1)
    rng = jax.random.key(7)
    zero = lambda x, t: jnp.zeros_like(x)
    mean = diffusion_loss(sch, zero, x0, rng, reduction="mean")
    total = diffusion_loss(sch, zero, x0, rng, reduction="sum")
    np.testing.assert_allclose(total, mean * 16, rtol=1e-5)
    # With the zero model the eps loss is the mean of eps^2; its noise is N(0, 1), so about 1.
    assert mean.shape == (5,) and 0.3 < float(mean.mean()) < 2.0
    # x0 prediction with a model returning exactly x0 recovered from x_t and the (known) noise: recompute
    # the loss's draws to build the oracle.
    t_rng, n_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (5,), 0, 100, dtype=jnp.int32)
    noise = jax.random.normal(n_rng, x0.shape)
    for prediction, target in (("eps", noise), ("x0", x0), ("v", v_from_eps_x0(sch, x0, noise, t))):
        oracle = lambda x, tt, target=target: target
        np.testing.assert_allclose(diffusion_loss(sch, oracle, x0, rng, prediction=prediction), 0.0, atol=1e-10)
    with pytest.raises(ConfigError):
        diffusion_loss(sch, zero, x0, rng, prediction="score")
    with pytest.raises(ShapeError):
        q_sample(sch, x0, jnp.zeros((3,), jnp.int32), x0)


# ---- diffusers as an independent reference --------------------------------------------------------------

def _diffusers():
    pytest.importorskip("torch")
    return pytest.importorskip("diffusers")


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedules_match_diffusers(kind):
    diffusers = _diffusers()
    ref = diffusers.DDPMScheduler(num_train_timesteps=T,
                                  beta_schedule="linear" if kind == "linear" else "squaredcos_cap_v2")
    sch = linear_schedule(T) if kind == "linear" else cosine_schedule(T)
    np.testing.assert_allclose(sch.betas, ref.betas.numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(sch.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-4, atol=1e-7)
    ref_var = np.array([float(ref._get_variance(t)) for t in (1, 10, 500, 999)])
    # diffusers forms 1 - abar in float32 (cancellation near abar = 1); ours is float64, so allow 1e-3.
    np.testing.assert_allclose(np.asarray(sch.posterior_variance)[[1, 10, 500, 999]], ref_var, rtol=1e-3)


def _torch_noise(seed, shape):
    import torch
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variance,clip", [("beta", False), ("posterior", True)])
def test_ddpm_step_matches_diffusers(variance, clip):
    diffusers = _diffusers()
    import torch
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=clip,
                                  variance_type="fixed_large" if variance == "beta" else "fixed_small")
    sch = linear_schedule(T)
    rs = np.random.RandomState(0)
    x = rs.randn(2, 4, 4, 3).astype(np.float32)
    eps = rs.randn(2, 4, 4, 3).astype(np.float32)
    for t in (999, 400, 37, 0):
        seed = 100 + t
        out = ref.step(torch.from_numpy(eps).permute(0, 3, 1, 2), t, torch.from_numpy(x).permute(0, 3, 1, 2),
                       generator=torch.Generator().manual_seed(seed)).prev_sample.permute(0, 2, 3, 1).numpy()
        noise = _torch_noise(seed, (2, 3, 4, 4)).permute(0, 2, 3, 1).numpy()
        ours = ddpm_step(sch, jnp.asarray(eps), jnp.asarray(x), jnp.full((2,), t, jnp.int32), jnp.asarray(noise),
                         variance=variance, clip_x0=clip)
        np.testing.assert_allclose(ours, out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_timesteps_match_diffusers(spacing):
    diffusers = _diffusers()
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", timestep_spacing=spacing,
                                  steps_offset=0, set_alpha_to_one=True)
    for n in (50, 10, 1000):
        ref.set_timesteps(n)
        np.testing.assert_array_equal(ddim_timesteps(T, n, spacing), ref.timesteps.numpy())


@pytest.mark.parametrize("eta,clip", [(0.0, False), (1.0, True), (0.5, False)])
def test_ddim_step_matches_diffusers(eta, clip):
    diffusers = _diffusers()
    import torch
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=clip,
                                  set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    ref.set_timesteps(50)
    sch = linear_schedule(T)
    ts = ddim_timesteps(T, 50)
    rs = np.random.RandomState(1)
    x = rs.randn(2, 4, 4, 3).astype(np.float32)
    eps = rs.randn(2, 4, 4, 3).astype(np.float32)
    for i in (0, 17, 49):  # first step, a middle one, and the last (to abar = 1)
        t, t_prev = int(ts[i]), (int(ts[i + 1]) if i + 1 < len(ts) else -1)
        seed = 7 + i
        out = ref.step(torch.from_numpy(eps).permute(0, 3, 1, 2), t, torch.from_numpy(x).permute(0, 3, 1, 2),
                       eta=eta, generator=torch.Generator().manual_seed(seed)).prev_sample
        out = out.permute(0, 2, 3, 1).numpy()
        noise = _torch_noise(seed, (2, 3, 4, 4)).permute(0, 2, 3, 1).numpy()
        ours = ddim_step(sch, jnp.asarray(eps), jnp.asarray(x), jnp.full((2,), t, jnp.int32),
                         jnp.full((2,), t_prev, jnp.int32), jnp.asarray(noise), eta=eta, clip_x0=clip)
        np.testing.assert_allclose(ours, out, rtol=1e-4, atol=1e-4)
