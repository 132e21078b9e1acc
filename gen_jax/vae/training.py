"""VAEs on the shared training core: optimizers, training one model per sub-workdir, the test log-likelihood,
and the pictures (sample and reconstruction grids, 2-d latent scatter plots).

Used by `experiments/vae_likelihood.py` and `experiments/vmf_vae.py`; usable on its own:

    graphdef, params = nnx.split(GaussianVAE(rngs=nnx.Rngs(0)), nnx.Param)
    trained = train_submodel(run, "iwae_k5", params, make_iwae_loss(graphdef, num_samples=5), images,
                             cfg.train, cfg.optim)
    x_test = binarize_fixed(test_images, seed=1234)
    nll = evaluate_log_likelihood(run.mesh, graphdef, trained.params, x_test, ks=(1, 5000), batch_size=100,
                                  chunk_size=250, rng=jax.random.key(0))   # {K: {"log_likelihood": ...}}

A launcher may be re-run with the same workdir: each sub-model resumes from its checkpoint, its training
time is carried over in `<sub>/timing.json`, and its evaluation is reused from `<sub>/eval.json` when the
step and the evaluation settings are unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image, ImageDraw

from gen_jax.config import TrainConfig
from gen_jax.data import BatchIterator
from gen_jax.errors import ConfigError, ShapeError
from gen_jax.images import save_image_grid
from gen_jax.train import Hook, TrainState, batch_sharded, cpu_compiler_options, make_update_fn, train
from gen_jax.train.mesh import replicated
from gen_jax.vae.configs import OptimConfig
from gen_jax.vae.models import make_log_likelihood_fn

__all__ = ["make_lr_schedule", "make_vae_optimizer", "binarize_fixed", "TrainedModel", "train_submodel",
           "largest_divisor_at_most", "evaluate_log_likelihood", "cached", "decoder_means",
           "save_prior_samples", "save_reconstructions", "save_latent_plot", "hammer_projection"]


# --------------------------------------------------------------------------------------------- optimizer
def make_lr_schedule(optim: OptimConfig, learning_rate: float, num_steps: int) -> optax.Schedule:
    """constant; cosine decay to lr * final_lr_fraction; or the IWAE paper's stages scaled to num_steps
    (stage i of S lasts a 3^i / sum_j 3^j share of training at lr * 10^(-i/7), Burda et al. sec. 5)."""
    if optim.schedule == "constant":
        return optax.constant_schedule(learning_rate)
    if optim.schedule == "cosine":
        return optax.cosine_decay_schedule(learning_rate, max(num_steps, 1), alpha=optim.final_lr_fraction)
    if optim.schedule == "iwae_stages":
        lengths = np.array([3.0 ** i for i in range(optim.iwae_stages)])
        bounds = jnp.asarray(np.cumsum(lengths)[:-1] / lengths.sum() * num_steps)

        def schedule(step):
            stage = jnp.sum(step >= bounds)
            return learning_rate * 10.0 ** (-stage / 7.0)

        return schedule
    raise ConfigError(f"unknown learning-rate schedule {optim.schedule!r}")


def make_vae_optimizer(optim: OptimConfig, tc: TrainConfig) -> optax.GradientTransformation:
    """Adam (both papers) with the configured schedule and optional global-norm clipping."""
    opt = optax.adam(make_lr_schedule(optim, tc.learning_rate, tc.num_steps))
    if tc.grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip_norm), opt)
    return opt


def binarize_fixed(images: np.ndarray, seed: int) -> np.ndarray:
    """One Bernoulli draw of uint8 images [N, H, W, C] -> float32 {0, 1} [N, H*W*C] (a fixed test set)."""
    p = np.asarray(images, np.float32).reshape(len(images), -1) / 255.0
    return (np.random.default_rng(seed).random(p.shape, dtype=np.float32) < p).astype(np.float32)


# ------------------------------------------------------------------------------------------------ training
@dataclasses.dataclass
class TrainedModel:
    params: Any
    start_step: int
    final_step: int
    train_seconds: float  # timed steps over every launch that trained this model (compiles excluded)
    steps_per_sec: float
    wall_seconds: float  # wall time of train() over every launch, compiles and checkpoints included
    timing_complete: bool  # False when a resumed run lost the earlier launch's timing
    preempted: bool
    last_metrics: dict


def train_submodel(run, name: str, params: Any, loss_fn: Callable, images: np.ndarray, tc: TrainConfig,
                   optim: OptimConfig, *, hooks: Sequence[Hook] = (), desc: str | None = None) -> TrainedModel:
    """Train one model in `<workdir>/<name>/` (metrics, checkpoints; resumed when present) on uint8 images."""
    sub = run.sub(name)  # staged and mirrored with the launcher's run for a remote workdir
    local = sub.path("timing.json")
    data = BatchIterator({"images": images}, tc.batch_size, seed=tc.seed, sharding=batch_sharded(run.mesh),
                         prefetch=tc.prefetch)
    optimizer = make_vae_optimizer(optim, tc)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(tc.seed), use_ema=False)
    update_fn = make_update_fn(loss_fn, optimizer, grad_accum_steps=tc.grad_accum_steps,
                               compute_dtype=tc.compute_dtype)
    t0 = time.time()
    try:
        result = train(**sub.train_kwargs(), state=state, update_fn=update_fn, data=data,
                       num_steps=tc.num_steps, mesh=run.mesh, steps_per_call=tc.steps_per_call,
                       log_every=tc.log_every, checkpoint_every=tc.checkpoint_every,
                       keep_checkpoints=tc.keep_checkpoints, hooks=list(hooks), batch_size=tc.batch_size,
                       desc=desc or name,
                       compiler_options=cpu_compiler_options(ynn_fusions=tc.cpu_ynn_fusions))
    finally:
        data.close()
    wall = time.time() - t0
    prev = _read_json(local)
    carried = prev is not None and prev.get("step") == result.start_step
    train_s = result.train_seconds + (prev["train_seconds"] if carried else 0.0)
    wall_s = wall + (prev["wall_seconds"] if carried else 0.0)
    complete = result.start_step == 0 or (carried and prev.get("complete", False))
    timed_steps = result.steps_per_second * result.train_seconds + (prev.get("timed_steps", 0) if carried else 0)
    if run.is_main and (result.final_step != result.start_step or prev is None):
        _write_json(local, {"step": result.final_step, "train_seconds": train_s, "wall_seconds": wall_s,
                            "timed_steps": timed_steps, "complete": complete})
    return TrainedModel(params=result.state.params, start_step=result.start_step, final_step=result.final_step,
                        train_seconds=train_s, steps_per_sec=timed_steps / train_s if train_s > 0 else 0.0,
                        wall_seconds=wall_s, timing_complete=complete, preempted=result.preempted,
                        last_metrics=result.last_metrics)


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: str, payload: Mapping) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    os.replace(tmp, path)


def cached(run, name: str, key: Mapping, compute: Callable[[], dict]) -> dict:
    """`compute()` unless `<workdir>/<name>/eval.json` holds a result computed with the same `key`."""
    path = run.path(name, "eval.json")
    key = json.loads(json.dumps(key, default=float))
    prev = _read_json(path)
    if prev is not None and prev.get("key") == key:
        return prev["result"]
    result = json.loads(json.dumps(compute(), default=float))
    if run.is_main:
        _write_json(path, {"key": key, "result": result})
    return result


# -------------------------------------------------------------------------------------------- evaluation
def largest_divisor_at_most(k: int, limit: int) -> int:
    """The chunk size for K importance samples: the largest divisor of K not above `limit`."""
    return max(c for c in range(1, min(k, limit) + 1) if k % c == 0)


def evaluate_log_likelihood(mesh: jax.sharding.Mesh, graphdef: nnx.GraphDef, params: Any, x_NxD: np.ndarray,
                            ks: Sequence[int], *, batch_size: int, chunk_size: int, rng: jax.Array,
                            table: np.ndarray | None = None) -> dict[int, dict[str, float]]:
    """Importance-sampled log p(x) of binarized test digits for each K in `ks`, batched over the mesh.

    Returns {K: {"log_likelihood": mean, "sem": standard error over examples, "examples": n,
    "seconds": time}}. The same key is used for every K, so the K draws of a larger K extend nothing:
    each K is an independent estimate. Uses the largest multiple of the (mesh-rounded) batch <= N.
    """
    if x_NxD.ndim != 2:
        raise ShapeError(f"x must be binarized, flattened test digits [N, D], got shape {x_NxD.shape}")
    batch = -(-batch_size // mesh.size) * mesh.size
    n = len(x_NxD) // batch * batch
    if n == 0:
        raise ConfigError(f"{len(x_NxD)} test examples do not fill one evaluation batch of {batch}; lower "
                          "eval.batch_size or raise eval.test_examples")
    sh = batch_sharded(mesh)
    out: dict[int, dict[str, float]] = {}
    for k in ks:
        fn = make_log_likelihood_fn(graphdef, num_samples=int(k), chunk_size=largest_divisor_at_most(k, chunk_size),
                                    table=table)
        fn = jax.jit(fn, in_shardings=(replicated(mesh), sh, replicated(mesh)), out_shardings=sh)
        t0 = time.time()
        values = []
        for i in range(n // batch):
            chunk = x_NxD[i * batch:(i + 1) * batch]
            local = chunk.reshape(jax.process_count(), -1, chunk.shape[1])[jax.process_index()]
            x = jax.make_array_from_process_local_data(sh, local, chunk.shape)
            ll = fn(params, x, jax.random.fold_in(rng, i))
            values.append(np.asarray(multihost_utils.process_allgather(ll, tiled=True)))
        v = np.concatenate(values).astype(np.float64)
        out[int(k)] = {"log_likelihood": float(v.mean()), "sem": float(v.std(ddof=1) / math.sqrt(len(v)))
                       if len(v) > 1 else 0.0, "examples": int(len(v)), "seconds": round(time.time() - t0, 2)}
    return out


# ---------------------------------------------------------------------------------------------- pictures
def decoder_means(graphdef: nnx.GraphDef, params: Any, z: jax.Array, image_shape=(28, 28, 1)) -> np.ndarray:
    """Bernoulli means sigmoid(logits) of the decoder as float images [N, H, W, C] in [0, 1]."""
    model = nnx.merge(graphdef, params)
    probs = jax.nn.sigmoid(model.decode_logits(z))
    return np.asarray(probs).reshape(len(z), *image_shape)


def save_prior_samples(path: str, graphdef: nnx.GraphDef, params: Any, n: int, rng: jax.Array) -> str:
    """Decoder means of n latents drawn from the model's prior (N(0, I), or uniform on the sphere)."""
    model = nnx.merge(graphdef, params)
    z = model.sample_prior(rng, n)
    return save_image_grid(path, decoder_means(graphdef, params, z), value_range=(0.0, 1.0))


def save_reconstructions(path: str, graphdef: nnx.GraphDef, params: Any, x_NxD: np.ndarray, rng: jax.Array,
                         table: np.ndarray | None = None, per_row: int = 8) -> str:
    """Rows of binarized test digits, each followed by a row of reconstructions (decoder means of one
    z ~ q(z|x))."""
    model = nnx.merge(graphdef, params)
    x = jnp.asarray(x_NxD)
    post = model.encode(x) if table is None else model.encode(x, table)
    recon = decoder_means(graphdef, params, post.sample(rng, 1)[0])
    orig = np.asarray(x_NxD).reshape(recon.shape)
    n = len(orig) // per_row * per_row
    rows = []
    for i in range(0, n, per_row):
        rows += [orig[i:i + per_row], recon[i:i + per_row]]
    return save_image_grid(path, np.concatenate(rows), nrow=per_row, value_range=(0.0, 1.0))


def hammer_projection(z_Nx3: np.ndarray) -> np.ndarray:
    """Equal-area Hammer projection of unit vectors in R^3 -> [N, 2] in the ellipse |x| <= 2 sqrt 2, |y| <= sqrt 2."""
    z = np.asarray(z_Nx3, np.float64)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    lon, lat = np.arctan2(z[:, 1], z[:, 0]), np.arcsin(np.clip(z[:, 2], -1.0, 1.0))
    den = np.sqrt(1.0 + np.cos(lat) * np.cos(lon / 2.0))
    return np.stack([2.0 * math.sqrt(2.0) * np.cos(lat) * np.sin(lon / 2.0) / den,
                     math.sqrt(2.0) * np.sin(lat) / den], axis=-1)


_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def save_latent_plot(path: str, points_Nx2: np.ndarray, labels_N: np.ndarray, title: str = "",
                     size: int = 520, outline: str | None = None) -> str:
    """Scatter plot of 2-d latents colored by digit label (legend 0-9), drawn with Pillow.

    outline: "circle" (unit circle, for S^1) or "hammer" (the projection's ellipse, for S^2) or None.
    """
    pts = np.asarray(points_Nx2, np.float64)
    labels = np.asarray(labels_N)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) != len(labels):
        raise ShapeError(f"points must be [N, 2] with N labels, got {pts.shape} and {labels.shape}")
    finite = np.all(np.isfinite(pts), axis=1)
    pts, labels = pts[finite], labels[finite]
    if outline == "hammer":
        lo, hi = np.array([-2.9, -1.45]), np.array([2.9, 1.45])
    elif outline == "circle":
        lo, hi = np.array([-1.1, -1.1]), np.array([1.1, 1.1])
    else:
        lo, hi = (np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)) if len(pts) else (
            np.array([-1.0, -1.0]), np.array([1.0, 1.0]))
        pad = 0.05 * (hi - lo) + 1e-6
        lo, hi = lo - pad, hi + pad
    span = float(np.max(hi - lo))
    center = (hi + lo) / 2.0
    top, margin, legend = 24, 10, 60
    w, h = size + legend, size + top
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    scale = (size - 2 * margin) / span

    def to_px(p):
        return (margin + (p[..., 0] - center[0]) * scale + (size - 2 * margin) / 2,
                top + margin + (center[1] - p[..., 1]) * scale + (size - 2 * margin) / 2)

    if outline is not None:
        t = np.linspace(0, 2 * np.pi, 200)
        ring = (np.stack([np.cos(t), np.sin(t)], -1) if outline == "circle"
                else np.stack([2 * math.sqrt(2) * np.cos(t), math.sqrt(2) * np.sin(t)], -1))
        xs, ys = to_px(ring)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(180, 180, 180), width=1)
    xs, ys = to_px(pts)
    for x, y, c in zip(xs.tolist(), ys.tolist(), labels.tolist()):
        draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=_COLORS[int(c) % 10])
    draw.text((margin, 6), title, fill=(0, 0, 0))
    for digit in range(10):
        y = top + margin + 18 * digit
        draw.rectangle([size + 8, y, size + 18, y + 10], fill=_COLORS[digit])
        draw.text((size + 24, y - 1), str(digit), fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
    return path
