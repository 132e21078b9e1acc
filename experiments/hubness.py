"""Hubness-prior latent sampling (Liang et al., ICML 2022) on a trained GAN: hubs vs random vs truncation.

    python -m experiments.hubness                                   # the generator of runs/gngan_mnist
    python -m experiments.hubness --checkpoint runs/gngan_compare/gran
    python -m experiments.hubness --checkpoint gs://BUCKET/gngan --workdir gs://BUCKET/hubness
    python -m experiments.hubness --set hub.threshold=40 --set hub.strict=true
    python -m experiments.hubness --set hub.hub_fraction=0.015      # threshold calibrated for small z_dim
    python -m experiments.hubness --preset tiny --checkpoint RUN    # seconds: smoke test
    python -m experiments.hubness --help                            # presets and every key

Loads the newest checkpoint of a `python -m experiments.gngan` run (its EMA generator), draws the same number
of latents from each sampler and compares FID, precision and recall (MNIST-classifier features, vs the train
split; the floor row scores MNIST test images):
  - random: z ~ N(0, I);
  - hubs: z ~ N(0, I) with k-occurrence N_k >= t among batches of hub.batch_size latents (k=5, t=50 and
    batches of 10^4 as in the paper; `gen_jax.hubness.sample_hub_latents`), generated without truncation;
  - truncation psi: z <- psi z, the truncation trick in z space (w_avg = 0 for a Gaussian z; the paper
    applies it in StyleGAN2's W space).
Threshold and latent dimension: t = 50 was set for 512-d latents; N_k is less skewed in fewer dimensions
(measured here over 10^4 Gaussian latents, k=5: 1.5% of latents reach 50 at d=128, 1.0% at d=64, 0.4% at
d=32). The mnist GAN has z_dim 128, so t = 50 is used as is; `hub.hub_fraction` instead picks t as the N_k
that about that fraction of a calibration batch reaches (the tiny preset's 500-latent batches need this).
Writes to the workdir (default runs/hubness_<preset>): hubness.md (the table), results.json and
grids_side_by_side.png (first grid_size samples of each sampler, labelled).
"""
from __future__ import annotations

import math
import sys

import jax
import numpy as np

from gen_jax.config import apply_overrides, build_parser, get_preset
from gen_jax.data import load_images
from gen_jax.errors import ConfigError
from gen_jax.gan.configs import HUBNESS_PRESETS, HubnessConfig
from gen_jax.gan.training import MnistScorer, generate, load_generator, make_generate_fn, save_labeled_panels
from gen_jax.hubness import k_occurrence, sample_hub_latents
from gen_jax.images import image_grid
from gen_jax.train.launch import start_run, summarize

DEFAULT_CHECKPOINT = "runs/gngan_mnist"


def calibrated_threshold(rng: jax.Array, cfg: HubnessConfig, dim: int, mesh=None) -> int:
    """The N_k value that about `hub.hub_fraction` of one batch of Gaussian latents reaches (>=)."""
    h = cfg.hub
    z = jax.random.normal(rng, (h.batch_size, dim))
    counts = np.asarray(k_occurrence(z, h.k, include_self=h.include_self, mesh=mesh))
    t = int(np.quantile(counts, 1.0 - h.hub_fraction, method="higher"))
    return t - 1 if h.strict else t  # '>' t-1 keeps the same latents as '>=' t


def main(argv=None) -> dict:
    parser = build_parser(HUBNESS_PRESETS, prog="python -m experiments.hubness", default_preset="mnist",
                          description=__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"workdir of a gngan run, local or gs:// (default {DEFAULT_CHECKPOINT}); its newest "
                        "checkpoint")
    args = parser.parse_args(argv)
    try:
        cfg = apply_overrides(get_preset(HUBNESS_PRESETS, args.preset), args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    run = start_run(cfg, args, name="hubness")
    mesh = run.mesh
    setup, g_params, gan_cfg, step = load_generator(args.checkpoint, mesh)
    if gan_cfg.data.source != "mnist":
        raise ConfigError(f"{args.checkpoint} was trained on {gan_cfg.data.source}; this comparison scores "
                          "with MNIST-classifier features, so it needs an MNIST gngan run")
    z_dim, n, h = gan_cfg.model.z_dim, cfg.num_samples, cfg.hub
    if run.is_main:
        print(f"  generator: {args.checkpoint} at step {step} ({gan_cfg.gan.method}, z_dim {z_dim}, "
              f"{'EMA' if gan_cfg.train.ema_decay is not None else 'raw'} weights)")

    key = jax.random.PRNGKey(cfg.seed)
    rand_key, hub_key, calib_key = jax.random.split(key, 3)
    threshold = calibrated_threshold(calib_key, cfg, z_dim, mesh) if h.hub_fraction else h.threshold
    z_random = np.asarray(jax.random.normal(rand_key, (n, z_dim)))
    latents = {"random": z_random}
    latents["hubs"] = np.asarray(sample_hub_latents(
        hub_key, n, dim=z_dim, k=h.k, threshold=threshold, batch_size=h.batch_size, strict=h.strict,
        include_self=h.include_self, mesh=mesh))
    for psi in cfg.truncation_psi:
        latents[f"psi={psi:g}"] = psi * z_random  # the same latents as "random", pulled to the mean

    train_images = load_images("mnist", gan_cfg.data.train_split).images
    test_images = load_images("mnist", gan_cfg.data.eval_split).images
    scorer = MnistScorer(train_images, test_images, n, pr_k=cfg.pr_k, seed=cfg.seed)
    gen_fn = make_generate_fn(setup, mesh, cfg.sample_batch)
    rows, panels = {}, {}
    for name, z in latents.items():
        images = generate(gen_fn, g_params, z, cfg.sample_batch)
        rows[name] = {**scorer.score(images), "mean_z_norm": float(np.linalg.norm(z, axis=1).mean())}
        panels[name] = image_grid(images[:cfg.grid_size])
        if run.is_main:
            print(f"  {name:<10} FID {rows[name]['fid']:8.2f}  precision {rows[name]['precision']:.3f}  "
                  f"recall {rows[name]['recall']:.3f}  mean |z| {rows[name]['mean_z_norm']:.2f}")
    floor = scorer.floor(n)
    hub_rule = f"N_k {'>' if h.strict else '>='} {threshold}"
    results = {
        "checkpoint": args.checkpoint, "checkpoint_step": step, "gan_method": gan_cfg.gan.method,
        "z_dim": z_dim, "num_samples": n, "hub_k": h.k, "hub_threshold": threshold, "hub_rule": hub_rule,
        "hub_batch_size": h.batch_size, "hub_include_self": h.include_self,
        "threshold_calibrated_fraction": h.hub_fraction, "expected_mean_z_norm": math.sqrt(z_dim),
        "samplers": rows, "floor": {k: floor[k] for k in ("fid", "precision", "recall")},
    }
    if run.is_main:
        run.write_json("results.json", results)
        with open(run.path("hubness.md"), "w") as f:
            f.write(markdown_table(results))
        save_labeled_panels(run.path("grids_side_by_side.png"), panels)
        print("\n" + markdown_table(results))
    best = min(rows, key=lambda name: rows[name]["fid"])
    summarize(run, {
        "generator": f"{args.checkpoint} step {step}",
        "hub latents": f"k={h.k}, {hub_rule} over batches of {h.batch_size} (self "
                       f"{'included' if h.include_self else 'excluded'})",
        "FID random / hubs": f"{rows['random']['fid']:.2f} / {rows['hubs']['fid']:.2f} (floor {floor['fid']:.2f}; "
                             f"lowest: {best})",
        "paper": "hub latents give lower FID and higher precision than random latents (StyleGAN2, BigGAN)",
        "outputs": f"{run.workdir}/ (hubness.md, results.json, grids_side_by_side.png)",
    })
    return results


def markdown_table(r: dict) -> str:
    lines = [f"Latent samplers on {r['checkpoint']} (step {r['checkpoint_step']}, {r['gan_method']}, z_dim "
             f"{r['z_dim']}); {r['num_samples']} samples each; hubs: k={r['hub_k']}, {r['hub_rule']} over batches "
             f"of {r['hub_batch_size']}. FID, precision and recall on MNIST-classifier features vs the train split.",
             "", "| sampler | FID | precision | recall | mean ‖z‖ |", "|---|---|---|---|---|"]
    for name, row in r["samplers"].items():
        lines.append(f"| {name} | {row['fid']:.2f} | {row['precision']:.3f} | {row['recall']:.3f} | "
                     f"{row['mean_z_norm']:.2f} |")
    f = r["floor"]
    lines.append(f"| MNIST test images (floor) | {f['fid']:.2f} | {f['precision']:.3f} | {f['recall']:.3f} | - |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
