"""Train the IWAE paper's VAE with the VAE and IWAE objectives and report the test NLL at K importance samples.

    python -m experiments.vae_likelihood                  # MNIST default (~8-10 min on 2 quiet CPU cores)
    python -m experiments.vae_likelihood --preset tiny    # seconds: smoke test
    python -m experiments.vae_likelihood --preset paper   # batch 20, 3280 epochs in 8 stages (accelerator)
    python -m experiments.vae_likelihood --help           # presets and every key (--set key=value)

Burda, Grosse, Salakhutdinov, "Importance Weighted Autoencoders" (2015), Table 1 (one stochastic layer);
Su, post 8791. The same 784-200-200-50 tanh model, Bernoulli decoder, dynamically binarized MNIST, is trained
once per objective (each in `<workdir>/<objective>_k<k>/`, resumable), then log p(x) of a fixed binarization
of the test digits is estimated with K = 1, 5, 50, 5000 importance samples (chunked, `gen_jax.vae`).

Writes to the workdir: <objective>_k<k>/ (checkpoints, metrics.jsonl, tb/, eval.json), samples/*.png
(prior samples and reconstructions per model), curves.png, results.json, results.md.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from flax import nnx

from gen_jax.config import parse_command_line
from gen_jax.data import load_images
from gen_jax.images import save_curve_png
from gen_jax.train import num_params
from gen_jax.train.launch import start_run, summarize
from gen_jax.vae.configs import IWAE_PAPER_EPOCHS, IWAE_PAPER_NLL, LIKELIHOOD_PRESETS, VAELikelihoodConfig
from gen_jax.vae.models import GaussianVAE, make_iwae_loss, make_vae_loss
from gen_jax.vae.training import (binarize_fixed, cached, evaluate_log_likelihood, save_prior_samples,
                                  save_reconstructions, train_submodel)


def build_model(cfg: VAELikelihoodConfig, seed: int) -> GaussianVAE:
    m = cfg.model
    return GaussianVAE(x_dim=784, hidden=m.hidden, latent_dim=m.latent_dim, activation=m.activation,
                       rngs=nnx.Rngs(seed))


def main(argv=None) -> dict:
    cfg, args = parse_command_line(LIKELIHOOD_PRESETS, argv, prog="python -m experiments.vae_likelihood",
                                   default_preset="mnist", description=__doc__.strip().splitlines()[0])
    run = start_run(cfg, args, name="vae_likelihood")
    tc, ev = cfg.train, cfg.eval
    train_images = load_images(cfg.data.source, cfg.data.train_split).images
    test = load_images(cfg.data.source, cfg.data.test_split).images
    test = test[:ev.test_examples] if ev.test_examples else test
    x_test = binarize_fixed(test, cfg.data.test_binarize_seed)
    steps_per_epoch = len(train_images) // tc.batch_size
    if run.is_main:
        print(f"  {len(train_images):,} training digits ({steps_per_epoch} steps/epoch at batch {tc.batch_size}); "
              f"{len(x_test):,} test digits for K = {', '.join(map(str, ev.ks))}")

    models: dict[str, dict] = {}
    for objective in cfg.objectives:
        k = cfg.samples_of(objective)
        name = f"{objective}_k{k}"
        graphdef, params = nnx.split(build_model(cfg, tc.seed), nnx.Param)  # same init for every objective
        loss_fn = (make_vae_loss(graphdef, num_samples=k) if objective == "vae"
                   else make_iwae_loss(graphdef, num_samples=k))
        if run.is_main:
            print(f"\n[{name}] {objective.upper()} objective with k = {k}: {num_params(params):,} parameters")
        trained = train_submodel(run, name, params, loss_fn, train_images, tc, cfg.optim, desc=name)
        if trained.preempted:
            return {}
        key = {"step": trained.final_step, "eval": vars(ev) | {"ks": list(ev.ks)}, "data": vars(cfg.data)}
        rng = jax.random.PRNGKey(30_000 + tc.seed)
        evals = cached(run, name, key, lambda: evaluate_log_likelihood(
            run.mesh, graphdef, trained.params, x_test, ev.ks, batch_size=ev.batch_size,
            chunk_size=ev.chunk_size, rng=rng))
        if run.is_main:
            save_prior_samples(run.path("samples", f"{name}_prior.png"), graphdef, trained.params, ev.grid_size,
                               jax.random.fold_in(rng, 1))
            save_reconstructions(run.path("samples", f"{name}_reconstructions.png"), graphdef, trained.params,
                                 x_test[:32], jax.random.fold_in(rng, 2))
        nll = {str(kk): -v["log_likelihood"] for kk, v in evals.items()}
        models[name] = {
            "objective": objective, "train_samples": k, "steps": trained.final_step,
            "epochs": round(trained.final_step / steps_per_epoch, 2),
            "train_seconds": round(trained.train_seconds, 1), "train_wall_seconds": round(trained.wall_seconds, 1),
            "timing_complete": trained.timing_complete, "steps_per_sec": round(trained.steps_per_sec, 2),
            "examples_per_sec": round(trained.steps_per_sec * tc.batch_size, 1),
            "test_nll": nll, "test_nll_sem": {str(kk): v["sem"] for kk, v in evals.items()},
            "eval_seconds": {str(kk): v["seconds"] for kk, v in evals.items()},
            "paper_nll_k5000": IWAE_PAPER_NLL.get((objective, k)),
            "params": num_params(params),
        }
        if run.is_main:
            print(f"  [{name}] test NLL " + ", ".join(f"K={kk}: {v:.2f}" for kk, v in nll.items()))

    results = {"models": models, "test_examples": int(len(x_test)), "ks": list(ev.ks),
               "paper": {"epochs": IWAE_PAPER_EPOCHS, "nll_k5000_by_objective_and_k":
                         {f"{o}_k{k}": v for (o, k), v in IWAE_PAPER_NLL.items()}},
               "direction": direction_checks(models, ev.ks)}
    plot_curves(run, list(models))
    table = markdown_table(results)
    if run.is_main:
        with open(run.path("results.md"), "w") as f:
            f.write(table + "\n")
        print("\n" + table)
    run.write_json("results.json", results)
    lines = {}
    kmax = str(max(ev.ks))
    for name, m in models.items():
        paper = f" (paper {m['paper_nll_k5000']:.2f} after {IWAE_PAPER_EPOCHS} epochs)" if m["paper_nll_k5000"] else ""
        lines[name] = (f"NLL(K={kmax}) {m['test_nll'][kmax]:.2f} +- {m['test_nll_sem'][kmax]:.2f} nats{paper}; "
                       f"{m['steps']} steps = {m['epochs']} epochs in {m['train_seconds']} s "
                       f"({m['steps_per_sec']} steps/s, {m['examples_per_sec']} img/s)")
    lines["direction"] = ", ".join(f"{k}: {v}" for k, v in results["direction"].items())
    lines["outputs"] = f"{run.workdir}/ (results.md, results.json, samples/, curves.png, <model>/metrics.jsonl)"
    summarize(run, lines)
    return results


def direction_checks(models: dict, ks) -> dict:
    """The paper's qualitative claims on our numbers: NLL falls with K; IWAE <= VAE at the largest K."""
    out = {}
    for name, m in models.items():
        v = [m["test_nll"][str(k)] for k in sorted(ks)]
        out[f"{name} NLL decreasing in K"] = bool(all(a >= b for a, b in zip(v, v[1:])))
    vae = [m for m in models.values() if m["objective"] == "vae"]
    iwae = [m for m in models.values() if m["objective"] == "iwae"]
    if vae and iwae:
        k = str(max(ks))
        out["IWAE <= VAE at K=" + k] = bool(iwae[0]["test_nll"][k] <= vae[0]["test_nll"][k])
    return out


def markdown_table(results: dict) -> str:
    ks = results["ks"]
    head = ("| model (objective, train k) | epochs | train time | " + " | ".join(f"K={k}" for k in ks)
            + f" | paper, K=5000 ({results['paper']['epochs']} epochs) |")
    rows = [head, "|" + "---|" * (4 + len(ks))]
    for name, m in results["models"].items():
        cells = [f"{m['test_nll'][str(k)]:.2f}" + (f" ± {m['test_nll_sem'][str(k)]:.2f}" if k == max(ks) else "")
                 for k in ks]
        paper = f"{m['paper_nll_k5000']:.2f}" if m["paper_nll_k5000"] else "-"
        rows.append(f"| {m['objective'].upper()}, k={m['train_samples']} | {m['epochs']} | {m['train_seconds']:.0f} s"
                    f" | " + " | ".join(cells) + f" | {paper} |")
    note = (f"\nTest NLL in nats (lower is better) on the first {results['test_examples']} MNIST test digits, one "
            "fixed binarization; ± is the standard error over digits (the models are compared on the same "
            "digits, so their difference is far more precise). Train time: timed steps, compiles excluded.")
    return "\n".join(rows) + note


def plot_curves(run, names: list[str]) -> None:
    if not run.is_main:
        return
    xs, ys = {}, {}
    for name in names:
        path = run.path(name, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        rows = [json.loads(line) for line in open(path) if line.strip()]
        rows = [r for r in rows if "train/loss" in r]
        if len(rows) >= 2:
            label = f"{name}: -ELBO" if name.startswith("vae") else f"{name}: -L_k"
            xs[label], ys[label] = [r["step"] for r in rows], [r["train/loss"] for r in rows]
    if ys:
        save_curve_png(run.path("curves.png"), xs, ys, title="training loss (nats, train batches)",
                       xlabel="step", ylabel="loss")


if __name__ == "__main__":
    main(sys.argv[1:])
