"""GAN training on the shared core: models, the alternating D/G update, sampling, MNIST scoring, loading.

Used by `experiments/gngan.py` and `experiments/hubness.py`; usable on its own:

    cfg = gen_jax.gan.configs.mnist()
    setup, state = build_gan(cfg)                       # state.params = {"G": ..., "D": ...}
    update_fn = make_gan_update_fn(setup, mesh)         # for gen_jax.train.train
    images_uint8 = generate(setup, state.ema_params, z_NxZ, mesh)

One train step (the unit of `train.num_steps`) is n_dis discriminator updates followed by one generator update
(Goodfellow et al. 2014, Alg. 1; GN-GAN's and SNGAN's training loops). The batch handed in by the loop holds
n_dis * train.batch_size real images: one batch of train.batch_size per D update.

D update (GN-GAN official code): the real and a fresh fake batch are concatenated and scored in ONE call of
the (normalized) discriminator, split, and fed to the D loss; GN/GraN need per-example input gradients, which
is why discriminators here have no batch-coupled layers. WGAN-GP adds lambda * E[(||grad f(x_hat)|| - 1)^2]
(Gulrajani et al. eq. 3); SN advances its power-iteration vectors once per D update, before the loss.
G update: a fresh batch of latents, loss of the normalized D on G(z); for GN/GraN this differentiates through
grad_x f (double backprop) unless gan.g_stop_norm_gradient. EMA of G only, with decay
min(decay, (1 + t) / (10 + t)) when gan.ema_warmup (so that early grids are not dominated by the init).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from gen_jax.errors import CheckpointError, ConfigError, DataError
from gen_jax.gan.configs import GNGANConfig, config_from_dict
from gen_jax.gan.gradient_norm import gradient_normalize, gradient_penalty, gran_normalize
from gen_jax.gan.losses import get_loss
from gen_jax.gan.models import (DCGANDiscriminator, DCGANGenerator, ResNetDiscriminator, ResNetGenerator,
                                as_function)
from gen_jax.gan.spectral_norm import SNState, update_sn_state
from gen_jax.train.mesh import batch_sharded, replicated
from gen_jax.train.state import TrainState, ema_update
from gen_jax.train.step import make_optimizer

__all__ = ["GANSetup", "build_gan", "make_gan_update_fn", "discriminator_scores", "make_generate_fn",
           "generate", "uint8_to_model", "MnistScorer", "load_generator", "save_labeled_panels"]


def uint8_to_model(images: jax.Array) -> jax.Array:
    """uint8 0..255 -> float32 in [-1, 1] (the models' image range)."""
    return images.astype(jnp.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class GANSetup:
    """Everything static about a GAN run: config, split model definitions, the two optimizers."""
    cfg: GNGANConfig
    g_graphdef: nnx.GraphDef
    d_graphdef: nnx.GraphDef
    opt_g: optax.GradientTransformation
    opt_d: optax.GradientTransformation

    @property
    def spectral_norm(self) -> bool:
        return self.cfg.gan.method == "sn"

    @property
    def g_batch_size(self) -> int:
        return self.cfg.gan.g_batch_size or self.cfg.train.batch_size


def _build_models(cfg: GNGANConfig, rngs: nnx.Rngs) -> tuple[nnx.Module, nnx.Module]:
    m, d = cfg.model, cfg.data
    sn = cfg.gan.method == "sn"
    if m.arch == "dcgan":
        G = DCGANGenerator(m.z_dim, resolution=d.image_size, channels=d.channels, width=m.g_width,
                           norm=m.g_norm, rngs=rngs)
        D = DCGANDiscriminator(resolution=d.image_size, channels=d.channels, width=m.d_width,
                               spectral_norm=sn, rngs=rngs)
    else:
        G = ResNetGenerator(m.z_dim, resolution=d.image_size, channels=d.channels, width=m.g_width,
                            norm=m.g_norm, rngs=rngs)
        D = ResNetDiscriminator(resolution=d.image_size, channels=d.channels, width=m.d_width,
                                spectral_norm=sn, rngs=rngs)
    return G, D


def build_gan(cfg: GNGANConfig, seed: int | None = None) -> tuple[GANSetup, TrainState]:
    """Models, optimizers and the initial TrainState.

    params = {"G": G's Params, "D": D's Params}; opt_state = {"G": Adam state, "D": Adam state} plus
    "sn": D's power-iteration vectors when gan.method == "sn" (advanced by each D update, not by Adam);
    ema_params = a copy of G's Params (the EMA covers G only).
    """
    t, g = cfg.train, cfg.gan
    seed = t.seed if seed is None else seed
    G, D = _build_models(cfg, nnx.Rngs(seed))
    g_graphdef, g_params = nnx.split(G, nnx.Param)
    if cfg.gan.method == "sn":
        d_graphdef, d_params, sn_state = nnx.split(D, nnx.Param, SNState)
    else:
        d_graphdef, d_params = nnx.split(D, nnx.Param)
        sn_state = None
    opt_g = make_optimizer(t.learning_rate, warmup_steps=t.warmup_steps, grad_clip_norm=t.grad_clip_norm,
                           weight_decay=t.weight_decay, b1=g.beta1, b2=g.beta2)
    opt_d = make_optimizer(g.lr_d or t.learning_rate, warmup_steps=t.warmup_steps,
                           grad_clip_norm=t.grad_clip_norm, weight_decay=t.weight_decay, b1=g.beta1, b2=g.beta2)
    params = {"G": g_params, "D": d_params}
    opt_state = {"G": opt_g.init(g_params), "D": opt_d.init(d_params)}
    if sn_state is not None:
        opt_state["sn"] = sn_state
    state = TrainState.create(params, None, jax.random.PRNGKey(seed), use_ema=False, opt_state=opt_state)
    if t.ema_decay is not None:
        state = state.replace(ema_params=jax.tree.map(jnp.array, g_params))
    return GANSetup(cfg, g_graphdef, d_graphdef, opt_g, opt_d), state


def _discriminator(setup: GANSetup, sn_state: Any) -> Callable[[Any, jax.Array], jax.Array]:
    return as_function(setup.d_graphdef, sn_state) if sn_state is not None else as_function(setup.d_graphdef)


def discriminator_scores(setup: GANSetup, sn_state: Any = None, *, for_generator: bool = False
                         ) -> Callable[[Any, jax.Array], jax.Array]:
    """The D output the losses see, f_hat(d_params, x) -> [B]: GN, GraN, or the raw f (wgan_gp, sn, none)."""
    f, g = _discriminator(setup, sn_state), setup.cfg.gan
    stop = for_generator and g.g_stop_norm_gradient
    if g.method == "gn":
        return gradient_normalize(f, stop_norm_gradient=stop)
    if g.method == "gran":
        return gran_normalize(f, eps=g.gran_eps, K=g.gran_k, stop_norm_gradient=stop)
    return f


def _constrain(x: jax.Array, sharding: Any) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def make_gan_update_fn(setup: GANSetup, mesh: jax.sharding.Mesh | None = None
                       ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """`update_fn(state, batch) -> (state, metrics)` for `gen_jax.train.train`: n_dis D updates, one G update.

    `batch["image"]` holds n_dis * train.batch_size uint8 images. With `mesh`, latents and fakes are split
    over its devices like the real batch. metrics["loss"] is the D loss (what the loop watches for NaN).
    """
    cfg = setup.cfg
    g, t = cfg.gan, cfg.train
    n_dis, batch, g_batch, z_dim = g.n_dis, t.batch_size, setup.g_batch_size, cfg.model.z_dim
    devices = 1 if mesh is None else mesh.size
    if batch % devices or g_batch % devices:
        raise ConfigError(f"train.batch_size={batch} and the G batch {g_batch} must be divisible by the "
                          f"{devices} devices; change train.batch_size or gan.g_batch_size")
    sharding = None if mesh is None else batch_sharded(mesh)
    d_loss_of, g_loss_of = get_loss(g.resolved_loss)
    G = as_function(setup.g_graphdef)

    def d_loss_fn(d_params, g_params, sn_state, real, rng):
        z_key, gp_key = jax.random.split(rng)
        z = _constrain(jax.random.normal(z_key, (batch, z_dim)), sharding)
        fake = jax.lax.stop_gradient(G(g_params, z))
        scores = discriminator_scores(setup, sn_state)(d_params, jnp.concatenate([real, fake], axis=0))
        s_real, s_fake = scores[:batch], scores[batch:]
        loss = d_loss_of(s_real, s_fake)
        metrics = {"d_real": s_real.mean(), "d_fake": s_fake.mean()}
        if g.method == "wgan_gp":
            gp = gradient_penalty(_discriminator(setup, sn_state), d_params, real, fake, gp_key)
            metrics["gp"] = gp
            loss = loss + g.gp_weight * gp
        return loss, metrics

    def g_loss_fn(g_params, d_params, sn_state, rng):
        z = _constrain(jax.random.normal(rng, (g_batch, z_dim)), sharding)
        fake = G(g_params, z)
        return g_loss_of(discriminator_scores(setup, sn_state, for_generator=True)(d_params, fake))

    d_grad = jax.value_and_grad(d_loss_fn, has_aux=True)
    g_grad = jax.value_and_grad(g_loss_fn)

    def update_fn(state: TrainState, batch_in: Any) -> tuple[TrainState, dict]:
        rng = state.step_rng()
        d_key, g_key = jax.random.split(rng)
        images = uint8_to_model(batch_in["image"])
        if images.shape[0] != n_dis * batch:
            raise ConfigError(f"the batch has {images.shape[0]} images; the GAN step needs n_dis * batch_size "
                              f"= {n_dis * batch} (build the BatchIterator with that global batch)")
        # [n_dis * B] -> [n_dis, B], every n_dis-th row, so each device keeps its own rows.
        real_NxB = jnp.swapaxes(images.reshape(batch, n_dis, *images.shape[1:]), 0, 1)
        g_params = state.params["G"]
        sn0 = state.opt_state.get("sn")

        def d_step(carry, xs):
            d_params, d_opt, sn_state = carry
            real, key = xs
            if sn_state is not None:
                sn_state = update_sn_state(setup.d_graphdef, d_params, sn_state)
            (loss, metrics), grads = d_grad(d_params, g_params, sn_state, _constrain(real, sharding), key)
            updates, d_opt = setup.opt_d.update(grads, d_opt, d_params)
            metrics = {**metrics, "d_loss": loss, "grad_norm_d": optax.tree.norm(grads)}
            return (optax.apply_updates(d_params, updates), d_opt, sn_state), metrics

        (d_params, d_opt, sn_state), d_metrics = jax.lax.scan(
            d_step, (state.params["D"], state.opt_state["D"], sn0),
            (real_NxB, jax.random.split(d_key, n_dis)))
        d_metrics = jax.tree.map(jnp.mean, d_metrics)

        g_loss, grads = g_grad(g_params, d_params, sn_state, g_key)
        updates, g_opt = setup.opt_g.update(grads, state.opt_state["G"], g_params)
        g_params = optax.apply_updates(g_params, updates)
        grad_norm_g = optax.tree.norm(grads)

        ema = state.ema_params
        if ema is not None:
            decay = jnp.asarray(t.ema_decay, jnp.float32)
            if g.ema_warmup:
                step = state.step.astype(jnp.float32)
                decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
            ema = ema_update(ema, g_params, decay)

        opt_state = {"G": g_opt, "D": d_opt}
        if sn_state is not None:
            opt_state["sn"] = sn_state
        finite = (jnp.isfinite(d_metrics["d_loss"]) & jnp.isfinite(g_loss) & jnp.isfinite(grad_norm_g)
                  & jnp.isfinite(d_metrics["grad_norm_d"]))
        new = state.replace(step=state.step + 1, params={"G": g_params, "D": d_params}, opt_state=opt_state,
                            ema_params=ema)
        # A non-finite step changes nothing but the counter (the loop then stops with NonFiniteLossError).
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state.replace(step=state.step + 1))
        metrics = {**d_metrics, "loss": d_metrics["d_loss"], "g_loss": g_loss, "grad_norm_g": grad_norm_g,
                   "finite": finite.astype(jnp.float32)}
        return new, metrics

    return update_fn


def make_generate_fn(setup: GANSetup, mesh: jax.sharding.Mesh, batch: int
                     ) -> Callable[[Any, np.ndarray], np.ndarray]:
    """A compiled `(g_params, z [batch, z_dim]) -> float images [batch, H, W, C] in [-1, 1]` on the host.

    Latents come in replicated (the same numpy array on every process); the work is split over the mesh
    when `batch` divides evenly, and the result is gathered to every process.
    """
    G = as_function(setup.g_graphdef)
    split = batch % mesh.size == 0
    out_sharding = batch_sharded(mesh) if split else replicated(mesh)

    def gen(g_params, z):
        return G(g_params, _constrain(z, out_sharding if split else None))

    compiled = jax.jit(gen, in_shardings=(replicated(mesh), replicated(mesh)), out_shardings=out_sharding)

    def run(g_params, z_BxZ):
        out = compiled(g_params, np.asarray(z_BxZ, np.float32))
        return np.asarray(multihost_utils.process_allgather(out, tiled=True)) if split else np.asarray(out)

    return run


def generate(generate_fn: Callable, g_params: Any, z_NxZ: np.ndarray, batch: int) -> np.ndarray:
    """uint8 images G(z) for any number of latents, in batches of `batch` (the last one padded)."""
    from gen_jax.images import to_uint8
    z_NxZ = np.asarray(z_NxZ, np.float32)
    n = len(z_NxZ)
    out = []
    for start in range(0, n, batch):
        chunk = z_NxZ[start:start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), np.float32)])
        out.append(to_uint8(generate_fn(g_params, chunk)[:batch - pad]))
    return np.concatenate(out) if out else np.zeros((0,), np.uint8)


class MnistScorer:
    """FID, precision and recall of uint8 MNIST samples on the project classifier's features.

    FID is against the statistics of the whole train split; precision/recall (Kynkaanniemi et al. 2019, k-NN
    manifolds) against a fixed random subset of `num_reference` train images. `floor()` scores as many test
    images the same way: the best a perfect generator can expect at that sample size.
    """

    def __init__(self, train_uint8: np.ndarray, test_uint8: np.ndarray, num_reference: int, *, pr_k: int = 3,
                 seed: int = 0):
        from gen_jax.metrics.classifier import get_mnist_feature_extractor
        from gen_jax.metrics.fid import feature_statistics
        if train_uint8.shape[1:] != (28, 28, 1):
            raise DataError(f"MNIST scoring needs 28 x 28 x 1 images, got {train_uint8.shape[1:]}")
        self.features_fn, _ = get_mnist_feature_extractor()
        self.pr_k = pr_k
        self.num_reference = int(min(num_reference, len(train_uint8)))
        self.train_stats = feature_statistics(self.features_fn(train_uint8))
        subset = np.random.default_rng(seed).permutation(len(train_uint8))[:self.num_reference]
        self.reference_features = self.features_fn(train_uint8[np.sort(subset)])
        self.test_uint8 = test_uint8
        self._floor: dict | None = None

    def score(self, images_uint8: np.ndarray) -> dict[str, float]:
        from gen_jax.metrics.fid import feature_statistics, frechet_distance
        from gen_jax.metrics.precision_recall import improved_precision_recall
        feats = self.features_fn(images_uint8)
        precision, recall = improved_precision_recall(self.reference_features, feats, k=self.pr_k)
        return {"fid": float(frechet_distance(*feature_statistics(feats), *self.train_stats)),
                "precision": float(precision), "recall": float(recall), "num_samples": int(len(images_uint8))}

    def floor(self, n: int) -> dict[str, float]:
        """Scores of n test images (cached for the first n asked)."""
        if self._floor is None or self._floor["num_samples"] != min(n, len(self.test_uint8)):
            self._floor = self.score(self.test_uint8[:n])
        return self._floor


def load_generator(workdir: str, mesh: jax.sharding.Mesh | None = None
                   ) -> tuple[GANSetup, Any, GNGANConfig, int]:
    """(setup, G params (EMA when the run kept one), config, step) of the newest checkpoint of a gngan run.

    Reads `<workdir>/config.json` to rebuild the exact models and train state, then restores
    `<workdir>/checkpoints/<newest step>` through `gen_jax.train.Checkpointer` (read only). The workdir may be
    local or remote (gs://...).
    """
    from etils import epath

    from gen_jax.train.checkpoint import Checkpointer
    workdir = str(workdir).rstrip("/") if "://" in str(workdir) else os.path.expanduser(str(workdir))
    config_path = epath.Path(workdir) / "config.json"
    ckpt_dir = f"{workdir}/checkpoints" if "://" in workdir else os.path.join(workdir, "checkpoints")
    if not config_path.exists() or not epath.Path(ckpt_dir).is_dir():
        raise CheckpointError(f"{workdir} is not a gngan run directory (needs config.json and checkpoints/); "
                              "train one with `python -m experiments.gngan --preset mnist` or pass "
                              "--checkpoint WORKDIR")
    cfg = config_from_dict(GNGANConfig, json.loads(config_path.read_text()))
    if cfg.compare_methods:
        raise CheckpointError(f"{workdir} is a compare run; pass one method's run, e.g. "
                              f"{workdir.rstrip('/')}/{cfg.compare_methods[0]}")
    setup, template = build_gan(cfg)
    if mesh is not None:
        template = jax.device_put(template, replicated(mesh))
    checkpointer = Checkpointer(ckpt_dir, async_save=False)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise CheckpointError(f"{ckpt_dir} has no checkpoint yet; let the gngan run save one "
                                  "(train.checkpoint_every) or finish")
        try:
            state, _, _ = checkpointer.restore(step, template)
        except Exception as e:  # noqa: BLE001 - report any restore failure with the fix
            raise CheckpointError(f"cannot restore step {step} from {ckpt_dir} with the models of its "
                                  f"config.json ({type(e).__name__}: {str(e)[:300]})") from e
    finally:
        checkpointer.close()
    g_params = state.ema_params if state.ema_params is not None else state.params["G"]
    return setup, g_params, cfg, step


def save_labeled_panels(path: str, panels: Mapping[str, np.ndarray], *, gap: int = 8) -> str:
    """Write image grids (uint8 H x W x C, e.g. from `gen_jax.images.image_grid`) side by side, each with its
    label above it, as one PNG."""
    from PIL import Image, ImageDraw
    from gen_jax.images import _atomic_save
    if not panels:
        raise ValueError("save_labeled_panels needs at least one panel")
    grids = [np.asarray(p) for p in panels.values()]
    grids = [g[..., None] if g.ndim == 2 else g for g in grids]
    channels = max(g.shape[-1] for g in grids)
    grids = [np.repeat(g, channels, axis=-1) if g.shape[-1] != channels else g for g in grids]
    label_h = 14
    height = max(g.shape[0] for g in grids) + label_h
    width = sum(g.shape[1] for g in grids) + gap * (len(grids) - 1)
    canvas = np.full((height, width, channels), 255, np.uint8)
    left = 0
    for grid in grids:
        canvas[label_h:label_h + grid.shape[0], left:left + grid.shape[1]] = grid
        left += grid.shape[1] + gap
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    image = Image.fromarray(canvas[..., 0] if channels == 1 else canvas, mode=mode)
    draw = ImageDraw.Draw(image)
    left = 0
    for label, grid in zip(panels, grids):
        draw.text((left + 2, 1), str(label), fill=0 if channels == 1 else (0,) * channels)
        left += grid.shape[1] + gap
    return _atomic_save(path, image)
