"""Train and evaluate DDPM (Ho et al. 2020) with DDIM sampling (Song et al. 2020).

    python -m experiments.ddpm                       # offline MNIST default (~12 min on 2 quiet CPU cores)
    python -m experiments.ddpm --preset tiny         # seconds: smoke test
    python -m experiments.ddpm --preset cifar10 --workdir gs://bucket/ddpm   # the paper's model
    python -m experiments.ddpm --help                # presets and every key (--set key=value)

Writes to the workdir: checkpoints/ (auto-resumed), metrics.jsonl, tb/ (TensorBoard), samples/*.png
(DDIM grids of the EMA model during training, an ancestral grid at the end), curves.png, results.json.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from gen_jax.config import parse_command_line
from gen_jax.data import BatchIterator, load_images
from gen_jax.ddpm.configs import PRESETS, DDPMConfig
from gen_jax.ddpm.training import (build_unet, evaluate_bits_per_dim, make_bpd_fn, make_loss_fn, make_sampler,
                                   sample_many, schedule_of)
from gen_jax.errors import DataError
from gen_jax.images import save_curve_png, save_image_grid
from gen_jax.train import (Hook, TrainState, batch_sharded, cpu_compiler_options, make_optimizer, make_update_fn,
                           num_params, train)
from gen_jax.train.launch import start_run, summarize


def prepare_images(images: np.ndarray, cfg: DDPMConfig) -> np.ndarray:
    """Center-crop and resize (tfds sources) to the configured square size; check the channels."""
    size, channels = cfg.data.image_size, cfg.data.channels
    if images.shape[-1] != channels:
        raise DataError(f"{cfg.data.source} images have {images.shape[-1]} channels but data.channels="
                        f"{channels}; use --set data.channels={images.shape[-1]}")
    if images.shape[1:3] == (size, size):
        return images
    from PIL import Image
    h, w = images.shape[1:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    out = np.empty((len(images), size, size, channels), np.uint8)
    for i, img in enumerate(images[:, top:top + side, left:left + side]):
        pil = Image.fromarray(img[..., 0] if channels == 1 else img)
        arr = np.asarray(pil.resize((size, size), Image.BICUBIC))
        out[i] = arr.reshape(size, size, channels)
    return out


def main(argv=None) -> dict:
    cfg, args = parse_command_line(PRESETS, argv, prog="python -m experiments.ddpm", default_preset="mnist",
                                   description=__doc__.strip().splitlines()[0])
    run = start_run(cfg, args, name="ddpm")
    mesh, tc = run.mesh, cfg.train

    train_data = load_images(cfg.data.source, cfg.data.train_split, data_dir=cfg.data.data_dir)
    images = prepare_images(train_data.images, cfg)
    data = BatchIterator({"image": images}, tc.batch_size, seed=tc.seed, sharding=batch_sharded(mesh),
                         prefetch=tc.prefetch)

    schedule = schedule_of(cfg)
    graphdef, params = nnx.split(build_unet(cfg, nnx.Rngs(tc.seed)), nnx.Param)
    optimizer = make_optimizer(tc.learning_rate, warmup_steps=tc.warmup_steps, grad_clip_norm=tc.grad_clip_norm,
                               weight_decay=tc.weight_decay)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(tc.seed), use_ema=tc.ema_decay is not None)
    update_fn = make_update_fn(make_loss_fn(graphdef, schedule, cfg), optimizer, ema_decay=tc.ema_decay,
                               grad_accum_steps=tc.grad_accum_steps, compute_dtype=tc.compute_dtype)
    if run.is_main:
        print(f"  U-Net: {num_params(params):,} parameters; {len(images):,} training images "
              f"{images.shape[1:]}; {data.batches_per_epoch} steps/epoch")

    grid_sampler = make_sampler(graphdef, schedule, cfg, mesh, n=cfg.eval.grid_size, method="ddim")
    grid_key = jax.random.PRNGKey(10_000 + tc.seed)  # one key for every grid: the same noise over training

    def eval_params(s: TrainState):
        return s.ema_params if s.ema_params is not None else s.params

    def write_grid(step: int, s: TrainState):
        grid = grid_sampler(eval_params(s), grid_key)
        if run.is_main:
            save_image_grid(run.path("samples", f"ddim{cfg.eval.ddim_steps}_step{step:07d}.png"), grid,
                            value_range=(0, 255))

    hooks = [Hook(cfg.eval.sample_every or tc.num_steps, write_grid, name="samples")]
    result = train(**run.train_kwargs(), state=state, update_fn=update_fn, data=data, num_steps=tc.num_steps,
                   mesh=mesh, steps_per_call=tc.steps_per_call, log_every=tc.log_every,
                   checkpoint_every=tc.checkpoint_every, keep_checkpoints=tc.keep_checkpoints, hooks=hooks,
                   batch_size=tc.batch_size, desc="ddpm",
                   compiler_options=cpu_compiler_options(ynn_fusions=tc.cpu_ynn_fusions))
    data.close()
    if result.preempted:
        return {}

    results = evaluate(run, cfg, graphdef, schedule, eval_params(result.state), train_data.images)
    results.update(steps=result.final_step, steps_per_sec=round(result.steps_per_second, 3),
                   examples_per_sec=round(result.steps_per_second * tc.batch_size, 1),
                   train_seconds=round(result.train_seconds, 1), params=num_params(params))
    plot_curves(run)
    run.write_json("results.json", results)  # summarize() below mirrors a remote workdir
    summarize(run, {
        "steps": f"{result.final_step} ({results['steps_per_sec']} steps/s, {results['examples_per_sec']} img/s)",
        "FID (DDIM, EMA)": _fmt_fid(results),
        "bits/dim (test)": f"{results['bpd_total']:.3f}" if "bpd_total" in results else "skipped",
        "time": f"train {results['train_seconds']:.0f} s, evaluation {results['eval_seconds']:.0f} s",
        "outputs": f"{run.workdir}/ (samples/, curves.png, results.json, metrics.jsonl, tb/)",
    })
    return results


def _fmt_fid(results: dict) -> str:
    if "fid" not in results:
        return results.get("fid_note", "skipped")
    return (f"{results['fid']:.2f} on {results['fid_samples']} samples (floor: MNIST test vs train "
            f"{results['fid_floor']:.2f})")


def evaluate(run, cfg: DDPMConfig, graphdef, schedule, params, train_images: np.ndarray) -> dict:
    """Ancestral grid, FID of DDIM samples (MNIST-classifier features), bits/dim on the eval split."""
    ev, mesh = cfg.eval, run.mesh
    out: dict = {}
    key = jax.random.PRNGKey(20_000 + cfg.train.seed)
    phase = _Phases(run.is_main)
    if ev.ancestral_grid:
        phase.start(f"{cfg.diffusion.timesteps}-step ancestral grid of {ev.ancestral_grid_size} images")
        grid = make_sampler(graphdef, schedule, cfg, mesh, n=ev.ancestral_grid_size,
                            method="ancestral")(params, key)
        if run.is_main:
            save_image_grid(run.path("samples", f"ancestral{cfg.diffusion.timesteps}_final.png"), grid,
                            value_range=(0, 255))
    if ev.fid_samples and cfg.data.source == "mnist":
        from gen_jax.metrics.fid import frechet_distance, mnist_feature_statistics
        phase.start(f"FID on {ev.fid_samples} DDIM-{ev.ddim_steps} samples (eta={ev.ddim_eta})")
        sampler = make_sampler(graphdef, schedule, cfg, mesh, n=ev.sample_batch, method="ddim")
        samples = sample_many(sampler, params, jax.random.fold_in(key, 1), ev.fid_samples, ev.sample_batch)
        test = load_images("mnist", cfg.data.eval_split).images[:ev.fid_samples]
        ref = mnist_feature_statistics(train_images)
        out.update(fid=frechet_distance(*mnist_feature_statistics(samples), *ref),
                   fid_floor=frechet_distance(*mnist_feature_statistics(test), *ref),
                   fid_samples=int(ev.fid_samples), fid_sampler=f"DDIM-{ev.ddim_steps} eta={ev.ddim_eta}")
        if run.is_main:
            save_image_grid(run.path("samples", "fid_samples_first100.png"), samples[:100], value_range=(0, 255))
    elif ev.fid_samples:
        out["fid_note"] = ("FID for tfds sources needs Inception features, which gen_jax does not bundle; "
                           "sample with make_sampler and score with your FID tool")
    if ev.bpd_examples:
        phase.start(f"bits/dim of {ev.bpd_examples} test images "
                    f"({ev.bpd_timesteps or cfg.diffusion.timesteps} of {cfg.diffusion.timesteps} terms)")
        test = prepare_images(load_images(cfg.data.source, cfg.data.eval_split,
                                          data_dir=cfg.data.data_dir).images[:ev.bpd_examples], cfg)
        out.update(evaluate_bits_per_dim(make_bpd_fn(graphdef, schedule, cfg, mesh), params, test,
                                         jax.random.fold_in(key, 2), ev.sample_batch, mesh))
        out["bpd_timesteps"] = ev.bpd_timesteps or cfg.diffusion.timesteps
    phase.start(None)
    out["eval_seconds"] = round(phase.total, 1)
    return out


class _Phases:
    """Prints each evaluation phase as it starts and how long the previous one took (the samplers are single
    compiled loops, so there is no per-step progress to show)."""

    def __init__(self, verbose: bool):
        self.verbose, self.name, self.t0, self.total = verbose, None, 0.0, 0.0

    def start(self, name: str | None) -> None:
        now = time.perf_counter()
        if self.name is not None:
            self.total += now - self.t0
            if self.verbose:
                print(f"  eval: {self.name}: {now - self.t0:.0f} s", flush=True)
        elif self.verbose and name is not None:
            print("  evaluating the EMA model:", flush=True)
        self.name, self.t0 = name, now


def plot_curves(run) -> None:
    path = run.path("metrics.jsonl")
    if not run.is_main or not os.path.exists(path):
        return
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if "train/loss" in r]
    if len(rows) >= 2:
        save_curve_png(run.path("curves.png"), [r["step"] for r in rows],
                       {"train loss (L_simple)": [r["train/loss"] for r in rows]}, title="DDPM training",
                       xlabel="step", ylabel="loss", log_y=True)


if __name__ == "__main__":
    main(sys.argv[1:])
