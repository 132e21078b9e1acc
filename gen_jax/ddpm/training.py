"""DDPM on the shared training core: the loss, compiled samplers, and evaluation (grids, FID, bits/dim).

Used by `experiments/ddpm.py`; usable on its own:

    cfg = gen_jax.ddpm.configs.mnist()
    graphdef, params = nnx.split(build_unet(cfg, nnx.Rngs(0)), nnx.Param)
    loss_fn = make_loss_fn(graphdef, schedule_of(cfg), cfg)        # for gen_jax.train.make_update_fn
    sample = make_sampler(graphdef, schedule_of(cfg), cfg, mesh, n=64, method="ddim")
    images_uint8 = sample(ema_params, jax.random.key(0))
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from gen_jax.ddpm.configs import DDPMConfig
from gen_jax.ddpm.diffusion import diffusion_loss
from gen_jax.ddpm.likelihood import bits_per_dim, model_to_uint8, uint8_to_model
from gen_jax.ddpm.samplers import ddim_sample, ddpm_sample, eps_fn_from_model
from gen_jax.ddpm.schedules import Schedule, make_schedule
from gen_jax.ddpm.unet import UNet
from gen_jax.train.mesh import batch_sharded, replicated
from gen_jax.train.step import resolve_dtype


def schedule_of(cfg: DDPMConfig) -> Schedule:
    """The noise schedule of `cfg.diffusion` (linear or cosine, `timesteps` steps)."""
    return make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)


def build_unet(cfg: DDPMConfig, rngs: nnx.Rngs) -> UNet:
    """The U-Net of `cfg.model` for `cfg.data` images, computing in `cfg.train.compute_dtype`."""
    m = cfg.model
    return UNet(in_channels=cfg.data.channels, ch=m.ch, ch_mult=m.ch_mult, num_res_blocks=m.num_res_blocks,
                attn_resolutions=m.attn_resolutions, dropout=m.dropout, resolution=cfg.data.image_size,
                num_groups=m.num_groups, dtype=resolve_dtype(cfg.train.compute_dtype), rngs=rngs)


def make_loss_fn(graphdef: nnx.GraphDef, schedule: Schedule, cfg: DDPMConfig):
    """`loss_fn(params, batch, rng) -> (loss, metrics)` with L_simple (Ho et al. eq. 14) on batch["image"]."""
    dtype = resolve_dtype(cfg.train.compute_dtype)

    def loss_fn(params, batch, rng):
        model = nnx.merge(graphdef, params)
        loss_rng, dropout_rng = jax.random.split(rng)
        x0 = uint8_to_model(batch["image"]).astype(dtype)
        model_fn = lambda x_t, t: model(x_t, t, deterministic=False, rngs=dropout_rng)  # noqa: E731
        per_example = diffusion_loss(schedule, model_fn, x0, loss_rng, prediction=cfg.diffusion.prediction,
                                     reduction=cfg.diffusion.loss_reduction)
        return per_example.mean(), {}

    return loss_fn


def make_eps_fn(graphdef: nnx.GraphDef, params: Any, schedule: Schedule, cfg: DDPMConfig,
                sharding: jax.sharding.NamedSharding | None = None) -> Callable:
    """The deterministic denoiser eps(x_t, t) of a (usually EMA) parameter set, for samplers and the bound."""
    model = nnx.merge(graphdef, params)

    def model_fn(x_t, t):
        if sharding is not None:  # keep the sampling batch split over devices through the loop
            x_t = jax.lax.with_sharding_constraint(x_t, sharding)
        return model(x_t, t, deterministic=True).astype(jnp.float32)

    return eps_fn_from_model(schedule, model_fn, cfg.diffusion.prediction)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def make_sampler(graphdef: nnx.GraphDef, schedule: Schedule, cfg: DDPMConfig, mesh: jax.sharding.Mesh, *,
                 n: int, method: str = "ddim") -> Callable[[Any, jax.Array], np.ndarray]:
    """A compiled sampler `(params, rng) -> uint8 images [n, H, W, C]` on the host (all processes).

    The whole reverse process is one `lax.scan` inside one `jax.jit`; the batch is split over the mesh.
    `method`: "ddim" (cfg.eval.ddim_steps, eta) or "ancestral" (all T steps, cfg.diffusion.sample_variance).
    """
    size = _round_up(n, mesh.size)
    shape = (size, cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
    out_sharding = batch_sharded(mesh)

    def sample(params, rng):
        eps_fn = make_eps_fn(graphdef, params, schedule, cfg, out_sharding)
        if method == "ddim":
            x = ddim_sample(schedule, eps_fn, shape, rng, num_steps=cfg.eval.ddim_steps, eta=cfg.eval.ddim_eta)
        elif method == "ancestral":
            x = ddpm_sample(schedule, eps_fn, shape, rng, variance=cfg.diffusion.sample_variance)
        else:
            raise ValueError(f"unknown sampling method {method!r}: use 'ddim' or 'ancestral'")
        return model_to_uint8(x)

    compiled = jax.jit(sample, in_shardings=(replicated(mesh), replicated(mesh)), out_shardings=out_sharding)

    def run(params, rng):
        images = compiled(params, rng)
        return np.asarray(multihost_utils.process_allgather(images, tiled=True))[:n]

    return run


def sample_many(sampler: Callable, params: Any, rng: jax.Array, total: int, batch: int) -> np.ndarray:
    """`total` samples from a sampler built with n=batch, in batches with independent keys."""
    out = [sampler(params, jax.random.fold_in(rng, i)) for i in range(-(-total // batch))]
    return np.concatenate(out)[:total]


def make_bpd_fn(graphdef: nnx.GraphDef, schedule: Schedule, cfg: DDPMConfig, mesh: jax.sharding.Mesh):
    """A compiled `(params, images_uint8, rng) -> per-example bits/dim dict` over the mesh."""
    sh = batch_sharded(mesh)
    k = cfg.eval.bpd_timesteps or None

    @functools.partial(jax.jit, in_shardings=(replicated(mesh), sh, replicated(mesh)), out_shardings=sh)
    def bpd(params, images, rng):
        eps_fn = make_eps_fn(graphdef, params, schedule, cfg, sh)
        return bits_per_dim(schedule, eps_fn, images, rng, num_timesteps_eval=k,
                            variance=cfg.diffusion.sample_variance)

    return bpd


def evaluate_bits_per_dim(bpd_fn: Callable, params: Any, images_uint8: np.ndarray, rng: jax.Array,
                          batch: int, mesh: jax.sharding.Mesh) -> dict[str, float]:
    """Mean of each term of the bound over `images_uint8` (full batches of a multiple of the mesh size)."""
    batch = _round_up(batch, mesh.size)
    usable = len(images_uint8) // batch * batch or len(images_uint8) // mesh.size * mesh.size
    batch = min(batch, usable)
    totals: dict[str, list] = {}
    for i in range(usable // batch):
        chunk = images_uint8[i * batch:(i + 1) * batch]
        local = chunk.reshape(jax.process_count(), -1, *chunk.shape[1:])[jax.process_index()]
        x = jax.make_array_from_process_local_data(batch_sharded(mesh), local, chunk.shape)
        out = bpd_fn(params, x, jax.random.fold_in(rng, i))
        for name, v in out.items():
            totals.setdefault(name, []).append(np.asarray(multihost_utils.process_allgather(v, tiled=True)))
    return {f"bpd_{name}": float(np.concatenate(vs).mean()) for name, vs in totals.items()} | {
        "bpd_examples": usable}
