"""Train GANs with gradient-normalized discriminators (GN-GAN, GraN-GAN) or the baselines (WGAN-GP, SN).

    python -m experiments.gngan                              # GN-GAN on offline MNIST (~10 min, 2 CPU cores)
    python -m experiments.gngan --set gan.method=gran        # gn | gran | wgan_gp | sn | none
    python -m experiments.gngan --set gan.loss=bce           # hinge | bce | wgan (default: the method's own)
    python -m experiments.gngan --preset compare             # GN vs GraN vs WGAN-GP at equal steps (~3 x 10 min)
    python -m experiments.gngan --preset cifar10_resnet      # the paper's CIFAR-10 ResNet setting (tfds:cifar10)
    python -m experiments.gngan --preset tiny                # seconds: smoke test
    python -m experiments.gngan --help                       # presets and every key (--set key=value)

Writes to the workdir (default runs/gngan_<preset>): checkpoints/ (auto-resumed), metrics.jsonl, tb/,
samples/step*.png (EMA generator on the same 64 latents through training), samples/final_random.png,
curves.png (D and G losses) and results.json (FID, precision, recall on MNIST-classifier features, and the
floor: the same scores of MNIST test images). The compare preset trains each method in <workdir>/<method>/
(resumable; a finished method is not retrained) and writes comparison.md, comparison.json and
comparison_grids.png (the methods' final grids side by side).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np

from gen_jax.config import parse_command_line, to_dict
from gen_jax.data import BatchIterator, load_images
from gen_jax.errors import DataError
from gen_jax.gan.configs import PRESETS, GNGANConfig
from gen_jax.gan.training import (MnistScorer, build_gan, generate, make_gan_update_fn, make_generate_fn,
                                  save_labeled_panels)
from gen_jax.images import image_grid, save_curve_png, save_image_grid
from gen_jax.train import Hook, batch_sharded, cpu_compiler_options, num_params, train
from gen_jax.train.launch import Run, start_run, summarize


def check_images(images: np.ndarray, cfg: GNGANConfig) -> np.ndarray:
    d = cfg.data
    if images.shape[1:] != (d.image_size, d.image_size, d.channels):
        raise DataError(f"{d.source} images are {images.shape[1:]} but the config expects "
                        f"({d.image_size}, {d.image_size}, {d.channels}); set data.image_size and data.channels "
                        "to match (28/1 for MNIST, 32/3 for CIFAR-10)")
    return images


def main(argv=None) -> dict:
    cfg, args = parse_command_line(PRESETS, argv, prog="python -m experiments.gngan", default_preset="mnist",
                                   description=__doc__.strip().splitlines()[0])
    run = start_run(cfg, args, name="gngan")
    if cfg.compare_methods:
        return compare(run, cfg)
    results = train_and_evaluate(run, cfg)
    if results:
        summarize(run, _summary_lines(run, cfg, results))
    return results


def _summary_lines(run: Run, cfg: GNGANConfig, r: dict) -> dict:
    lines = {"method": f"{cfg.gan.method} ({r['loss']} loss, n_dis={cfg.gan.n_dis})",
             "steps": f"{r['steps']} ({r['steps_per_sec']} steps/s, {r['examples_per_sec']} real img/s)"}
    if "fid" in r:
        lines["FID (EMA G)"] = (f"{r['fid']:.2f} on {r['fid_samples']} samples (floor: MNIST test vs train "
                                f"{r['fid_floor']:.2f})")
        lines["precision / recall"] = (f"{r['precision']:.3f} / {r['recall']:.3f} (floor {r['precision_floor']:.3f}"
                                       f" / {r['recall_floor']:.3f})")
    else:
        lines["FID"] = r.get("fid_note", "skipped")
    lines["paper"] = "GN-GAN (CIFAR-10, CNN/ResNet): see its tables; MNIST is this project's own check"
    lines["outputs"] = f"{run.workdir}/ (samples/, curves.png, results.json, metrics.jsonl, tb/)"
    return lines


def train_and_evaluate(run: Run, cfg: GNGANConfig, scorer: MnistScorer | None = None) -> dict:
    """Train one GAN in run.workdir (resuming), then grids and scores; returns (and writes) results.json.

    Files go through `run.path` (a staging folder for a remote workdir, mirrored by `run.sync()`)."""
    mesh, tc, g = run.mesh, cfg.train, cfg.gan
    train_data = load_images(cfg.data.source, cfg.data.train_split, data_dir=cfg.data.data_dir)
    images = check_images(train_data.images, cfg)
    data = BatchIterator({"image": images}, g.n_dis * tc.batch_size, seed=tc.seed,
                         sharding=batch_sharded(mesh), prefetch=tc.prefetch)
    setup, state = build_gan(cfg)
    update_fn = make_gan_update_fn(setup, mesh)
    if run.is_main:
        print(f"  {cfg.gan.method} ({g.resolved_loss} loss, n_dis={g.n_dis}): G {num_params(state.params['G']):,}"
              f" / D {num_params(state.params['D']):,} parameters; {len(images):,} training images "
              f"{images.shape[1:]}; {data.batches_per_epoch} steps/epoch")

    grid_gen = make_generate_fn(setup, mesh, cfg.eval.grid_size)
    grid_z = np.asarray(jax.random.normal(jax.random.PRNGKey(10_000 + tc.seed), (cfg.eval.grid_size,
                                                                                cfg.model.z_dim)))

    def g_params_of(s):
        return s.ema_params if s.ema_params is not None else s.params["G"]

    def write_grid(step: int, s):
        grid = generate(grid_gen, g_params_of(s), grid_z, cfg.eval.grid_size)
        if run.is_main:
            save_image_grid(run.path("samples", f"step{step:07d}.png"), grid)

    hooks = [Hook(cfg.eval.sample_every or tc.num_steps, write_grid, name="samples")]
    result = train(**run.train_kwargs(), state=state, update_fn=update_fn, data=data, num_steps=tc.num_steps,
                   mesh=mesh, steps_per_call=tc.steps_per_call, log_every=tc.log_every,
                   checkpoint_every=tc.checkpoint_every, keep_checkpoints=tc.keep_checkpoints, hooks=hooks,
                   batch_size=tc.batch_size * g.n_dis, desc=f"gngan/{cfg.gan.method}",
                   compiler_options=cpu_compiler_options(ynn_fusions=tc.cpu_ynn_fusions))
    data.close()
    if result.preempted:
        return {}
    g_params = g_params_of(result.state)
    if result.start_step == result.final_step and not os.path.exists(
            run.path("samples", f"step{result.final_step:07d}.png")):
        write_grid(result.final_step, result.state)  # a resumed, already finished run ran no hooks

    results = {"method": g.method, "loss": g.resolved_loss, "n_dis": g.n_dis, "steps": result.final_step,
               "params_G": num_params(result.state.params["G"]), "params_D": num_params(result.state.params["D"])}
    ev = cfg.eval
    key = jax.random.PRNGKey(20_000 + tc.seed)
    if ev.fid_samples:
        sample_gen = make_generate_fn(setup, mesh, ev.sample_batch)
        z = np.asarray(jax.random.normal(key, (ev.fid_samples, cfg.model.z_dim)))
        samples = generate(sample_gen, g_params, z, ev.sample_batch)
        if run.is_main:
            save_image_grid(run.path("samples", "final_random.png"), samples[:100])
        if cfg.data.source == "mnist":
            if scorer is None:
                scorer = MnistScorer(images, load_images("mnist", cfg.data.eval_split).images, ev.fid_samples,
                                     pr_k=ev.pr_k, seed=tc.seed)
            score, floor = scorer.score(samples), scorer.floor(ev.fid_samples)
            results.update(fid=score["fid"], precision=score["precision"], recall=score["recall"],
                           fid_floor=floor["fid"], precision_floor=floor["precision"],
                           recall_floor=floor["recall"], fid_samples=ev.fid_samples,
                           fid_reference=f"MNIST {cfg.data.train_split} split (classifier features)")
        else:
            results["fid_note"] = ("FID for tfds sources needs Inception features, which gen_jax does not "
                                   "bundle; score samples (make_generate_fn) with your FID tool")
    results.update(steps_per_sec=round(result.steps_per_second, 3),
                   examples_per_sec=round(result.steps_per_second * tc.batch_size * g.n_dis, 1),
                   train_seconds=round(result.train_seconds, 1), resumed_from=result.start_step)
    previous = _read_json(run.path("results.json"))
    if result.start_step == result.final_step and previous.get("steps") == result.final_step:
        for name in ("steps_per_sec", "examples_per_sec", "train_seconds"):  # keep the timed run's numbers
            results[name] = previous.get(name, results[name])
    plot_curves(run)
    run.write_json("results.json", results)
    return results


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def plot_curves(run: Run) -> None:
    path = run.path("metrics.jsonl")
    if not run.is_main or not os.path.exists(path):
        return
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if "train/d_loss" in r]
    if len(rows) >= 2:
        save_curve_png(run.path("curves.png"), [r["step"] for r in rows],
                       {"D loss": [r["train/d_loss"] for r in rows], "G loss": [r["train/g_loss"] for r in rows]},
                       title="GAN training", xlabel="step", ylabel="loss")


def compare(run: Run, cfg: GNGANConfig) -> dict:
    """Each method of cfg.compare_methods trained in <workdir>/<method> with otherwise equal settings.

    A method whose results.json already has the configured steps (and whose config matches) is not retrained;
    an interrupted one resumes from its checkpoint. The MNIST scorer is built once and shared.
    """
    methods = cfg.compare_methods
    scorer = None
    table = {}
    for method in methods:
        sub_cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, method=method), compare_methods=())
        sub = run.sub(method, config=sub_cfg)  # staged and mirrored with the parent run
        previous = _read_json(sub.path("results.json"))
        same_config = _read_json(sub.path("config.json")) == to_dict(sub_cfg)
        if same_config and previous.get("steps") == cfg.train.num_steps:
            if run.is_main:
                print(f"\n== {method}: finished earlier, reusing {sub.workdir}/results.json ==")
            table[method] = previous
            continue
        if run.is_main:
            print(f"\n== {method} ({sub_cfg.gan.resolved_loss} loss) -> {sub.workdir} ==")
            sub.write_json("config.json", to_dict(sub_cfg))
        if scorer is None and cfg.eval.fid_samples and cfg.data.source == "mnist":
            scorer = MnistScorer(load_images("mnist", cfg.data.train_split).images,
                                 load_images("mnist", cfg.data.eval_split).images, cfg.eval.fid_samples,
                                 pr_k=cfg.eval.pr_k, seed=cfg.train.seed)
        results = train_and_evaluate(sub, sub_cfg, scorer)
        if not results:  # preempted: re-run to resume
            return {}
        table[method] = results
    out = {"methods": list(methods), "steps": cfg.train.num_steps, "results": table}
    first = table[methods[0]]
    if "fid_floor" in first:
        out["floor"] = {k: first[f"{k}_floor"] for k in ("fid", "precision", "recall")}
    if run.is_main:
        run.write_json("comparison.json", out)
        with open(run.path("comparison.md"), "w") as f:
            f.write(comparison_markdown(out))
        panels = {}
        for method in methods:
            path = run.path(method, "samples", f"step{cfg.train.num_steps:07d}.png")
            if os.path.exists(path):
                from PIL import Image
                panels[f"{method} ({table[method]['loss']})"] = np.asarray(Image.open(path))
        if panels:
            save_labeled_panels(run.path("comparison_grids.png"), panels)
        print("\n" + comparison_markdown(out))
    summarize(run, {
        "methods": ", ".join(f"{m}: FID {table[m]['fid']:.2f}" if "fid" in table[m] else m for m in methods),
        "steps": f"{cfg.train.num_steps} G steps each (n_dis={cfg.gan.n_dis})",
        "outputs": f"{run.workdir}/ (comparison.md, comparison.json, comparison_grids.png, <method>/)",
    })
    return out


def comparison_markdown(out: dict) -> str:
    lines = [f"GANs on MNIST at {out['steps']} generator steps each (EMA generator; FID, precision, recall on "
             "MNIST-classifier features vs the train split)", "",
             "| method | loss | FID | precision | recall | steps/s | train s |", "|---|---|---|---|---|---|---|"]
    for method, r in out["results"].items():
        fid = f"{r['fid']:.2f}" if "fid" in r else "-"
        prec = f"{r['precision']:.3f}" if "precision" in r else "-"
        rec = f"{r['recall']:.3f}" if "recall" in r else "-"
        lines.append(f"| {method} | {r['loss']} | {fid} | {prec} | {rec} | {r['steps_per_sec']} | "
                     f"{r['train_seconds']} |")
    if "floor" in out:
        f = out["floor"]
        lines.append(f"| MNIST test images (floor) | - | {f['fid']:.2f} | {f['precision']:.3f} | "
                     f"{f['recall']:.3f} | - | - |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
