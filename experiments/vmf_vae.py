"""Train N-VAEs and S-VAEs (vMF posterior, uniform prior) alike and report the test log-likelihood table.

    python -m experiments.vmf_vae                   # d = 2, 5, 10, 20, learned kappa (~12-15 min, 2 quiet cores)
    python -m experiments.vmf_vae --preset tiny     # seconds: smoke test
    python -m experiments.vmf_vae --preset su       # Su's S-VAE: S^7 in R^8, fixed kappa = 20, inverse-CDF sampler
    python -m experiments.vmf_vae --help            # presets and every key (--set key=value)

Davidson, Falorsi, De Cao, Kipf, Tomczak, "Hyperspherical Variational Auto-Encoders" (UAI 2018), Table 1;
Su, post 8404. For every latent dimension d and family (N-VAE: Gaussian posterior, N(0, I) prior; S-VAE:
vMF posterior with kappa = softplus + 1, uniform prior on the sphere) the same MLP is trained with the
ELBO (analytic KL) in `<workdir>/<family>_d<d>/` (resumable) and scored by the importance-weighted
log-likelihood with 500 samples. Davidson et al.'s S-VAE in column d lives on S^d in R^(d+1)
(`dim_convention="davidson"`); `dim_convention="ambient"` puts it in R^d (Su's convention).

Writes: <family>_d<d>/ (checkpoints, metrics.jsonl, eval.json), samples/<family>_d<d>_prior.png (decoder
means of prior draws: uniform on the sphere for the S-VAE), latent_<family>_d<d>.png (test digits' posterior
means colored by label; Hammer projection for S^2), results.json, results.md.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gen_jax.config import parse_command_line
from gen_jax.data import load_images
from gen_jax.train import num_params
from gen_jax.train.launch import start_run, summarize
from gen_jax.vae import vmf
from gen_jax.vae.configs import DAVIDSON_LL, VMF_PRESETS, VMFVAEConfig
from gen_jax.vae.models import GaussianVAE, SphericalVAE, make_vae_loss
from gen_jax.vae.training import (binarize_fixed, cached, evaluate_log_likelihood, hammer_projection,
                                  save_latent_plot, save_prior_samples, train_submodel)

FAMILY_NAMES = {"normal": "N-VAE", "spherical": "S-VAE"}


def build_model(cfg: VMFVAEConfig, family: str, d: int, seed: int):
    if family == "normal":
        return GaussianVAE(x_dim=784, hidden=cfg.hidden, latent_dim=d, activation=cfg.activation,
                           rngs=nnx.Rngs(seed))
    return SphericalVAE(x_dim=784, hidden=cfg.hidden, ambient_dim=cfg.ambient_dim(d), kappa=cfg.kappa,
                        activation=cfg.activation, rngs=nnx.Rngs(seed))


def main(argv=None) -> dict:
    cfg, args = parse_command_line(VMF_PRESETS, argv, prog="python -m experiments.vmf_vae", default_preset="mnist",
                                   description=__doc__.strip().splitlines()[0])
    run = start_run(cfg, args, name="vmf_vae")
    tc, ev = cfg.train, cfg.eval
    train_images = load_images(cfg.data.source, cfg.data.train_split).images
    test = load_images(cfg.data.source, cfg.data.test_split)
    n_test = ev.test_examples or len(test.images)
    x_test = binarize_fixed(test.images[:n_test], cfg.data.test_binarize_seed)
    x_plot = binarize_fixed(test.images[:ev.plot_examples], cfg.data.test_binarize_seed + 1)
    labels_plot = test.labels[:ev.plot_examples]
    steps_per_epoch = len(train_images) // tc.batch_size
    compare_paper = cfg.dim_convention == "davidson" and cfg.kappa is None
    if run.is_main:
        kappa = "learned (softplus + 1)" if cfg.kappa is None else f"fixed at {cfg.kappa} ({cfg.sampler} sampler)"
        print(f"  {len(train_images):,} training digits ({steps_per_epoch} steps/epoch at batch {tc.batch_size}); "
              f"{len(x_test):,} test digits, {ev.importance_samples} importance samples; S-VAE kappa {kappa}")

    models: dict[str, dict] = {}
    for d in cfg.dims:
        for family in cfg.families:
            name = f"{family}_d{d}"
            graphdef, params = nnx.split(build_model(cfg, family, d, tc.seed), nnx.Param)
            table, extra = None, {}
            if family == "spherical":
                m = cfg.ambient_dim(d)
                extra["ambient_dim"] = m
                if cfg.sampler == "table":
                    table = vmf.make_inverse_cdf_table(m, cfg.kappa)
                if cfg.kappa is not None:
                    extra["kl_constant"] = float(vmf.kl_to_uniform(m, jnp.float32(cfg.kappa)))
            if run.is_main:
                print(f"\n[{name}] {FAMILY_NAMES[family]}, latent d = {d}"
                      + (f" (z on S^{extra['ambient_dim'] - 1} in R^{extra['ambient_dim']})" if extra else "")
                      + (f", KL constant {extra['kl_constant']:.3f} nats" if "kl_constant" in extra else "")
                      + f": {num_params(params):,} parameters")
            trained = train_submodel(run, name, params, make_vae_loss(graphdef, table=table), train_images, tc,
                                     cfg.optim, desc=name)
            if trained.preempted:
                return {}
            rng = jax.random.PRNGKey(40_000 + tc.seed)
            key = {"step": trained.final_step, "eval": vars(ev), "data": vars(cfg.data)}
            evals = cached(run, name, key, lambda: evaluate_log_likelihood(
                run.mesh, graphdef, trained.params, x_test, (ev.importance_samples,), batch_size=ev.batch_size,
                chunk_size=ev.chunk_size, rng=rng, table=table))
            ll = evals[str(ev.importance_samples)] if str(ev.importance_samples) in evals else evals[
                ev.importance_samples]
            model = nnx.merge(graphdef, trained.params)
            post = model.encode(jnp.asarray(x_plot)) if table is None else model.encode(jnp.asarray(x_plot), table)
            if family == "spherical":
                extra["test_kappa_median"] = float(np.median(np.asarray(post.kappa)))
            if run.is_main:
                save_prior_samples(run.path("samples", f"{name}_prior.png"), graphdef, trained.params,
                                   ev.grid_size, jax.random.fold_in(rng, 1))
                plot = latent_plot(run, name, family, post, labels_plot, d)
                if plot:
                    extra["latent_plot"] = plot
            paper = DAVIDSON_LL[family].get(d) if compare_paper else None
            models[name] = {
                "family": family, "d": d, "log_likelihood": ll["log_likelihood"], "sem": ll["sem"],
                "paper_log_likelihood": paper, "steps": trained.final_step,
                "epochs": round(trained.final_step / steps_per_epoch, 2),
                "train_seconds": round(trained.train_seconds, 1),
                "train_wall_seconds": round(trained.wall_seconds, 1), "timing_complete": trained.timing_complete,
                "steps_per_sec": round(trained.steps_per_sec, 2),
                "examples_per_sec": round(trained.steps_per_sec * tc.batch_size, 1),
                "final_train_elbo": trained.last_metrics.get("elbo"),
                "eval_seconds": ll["seconds"], "params": num_params(params), **extra}
            if run.is_main:
                print(f"  [{name}] test log-likelihood {ll['log_likelihood']:.2f} +- {ll['sem']:.2f}"
                      + (f" (Davidson et al.: {paper:.2f})" if paper is not None else ""))

    results = {"models": models, "test_examples": int(len(x_test)), "importance_samples": ev.importance_samples,
               "dim_convention": cfg.dim_convention, "kappa": cfg.kappa, "sampler": cfg.sampler}
    table = markdown_table(cfg, results)
    if run.is_main:
        with open(run.path("results.md"), "w") as f:
            f.write(table + "\n")
        print("\n" + table)
    run.write_json("results.json", results)
    lines = {name: (f"LL {m['log_likelihood']:.2f} +- {m['sem']:.2f}"
                    + (f" (paper {m['paper_log_likelihood']:.2f})" if m["paper_log_likelihood"] else "")
                    + f"; {m['steps']} steps = {m['epochs']} epochs in {m['train_seconds']} s "
                    f"({m['steps_per_sec']} steps/s, {m['examples_per_sec']} img/s)")
             for name, m in models.items()}
    lines["outputs"] = f"{run.workdir}/ (results.md, results.json, samples/, latent_*.png, <model>/metrics.jsonl)"
    summarize(run, lines)
    return results


def latent_plot(run, name: str, family: str, post, labels: np.ndarray, d: int) -> str | None:
    """Posterior means of test digits in 2-d: R^2 (N-VAE d=2), S^1 (circle) or S^2 (Hammer projection)."""
    z = np.asarray(post.mean if family == "normal" else post.mu)
    path = run.path(f"latent_{name}.png")
    if z.shape[1] == 2:
        outline = "circle" if family == "spherical" else None
        title = f"{FAMILY_NAMES[family]} d={d}: " + ("posterior means in R^2" if outline is None
                                                      else "mean directions on S^1")
        return save_latent_plot(path, z, labels, title, outline=outline)
    if z.shape[1] == 3 and family == "spherical":
        return save_latent_plot(path, hammer_projection(z), labels,
                                f"S-VAE d={d}: mean directions on S^2 (Hammer projection)", outline="hammer")
    return None


def markdown_table(cfg: VMFVAEConfig, results: dict) -> str:
    dims = list(cfg.dims)
    rows = ["| model | " + " | ".join(f"d={d}" for d in dims) + " |", "|---|" + "---|" * len(dims)]
    for family in cfg.families:
        cells = []
        for d in dims:
            m = results["models"].get(f"{family}_d{d}")
            if m is None:
                cells.append("-")
                continue
            cell = f"{m['log_likelihood']:.2f}"
            if m["paper_log_likelihood"] is not None:
                cell += f" (paper {m['paper_log_likelihood']:.2f})"
            cells.append(cell)
        rows.append(f"| {FAMILY_NAMES[family]} | " + " | ".join(cells) + " |")
    any_m = next(iter(results["models"].values()))
    note = (f"\nTest log-likelihood in nats (higher is better), {results['importance_samples']} importance samples, "
            f"first {results['test_examples']} MNIST test digits (one fixed binarization); {any_m['epochs']} epochs "
            f"of batch {cfg.train.batch_size} per model. S-VAE column d: z on S^"
            + ("d in R^(d+1) (Davidson et al.)" if cfg.dim_convention == "davidson" else "(d-1) in R^d")
            + (f"; kappa fixed at {cfg.kappa}" if cfg.kappa is not None else "; kappa learned (softplus + 1)")
            + ". Paper: Davidson et al. (2018) Table 1, trained to convergence with early stopping.")
    return "\n".join(rows) + note


if __name__ == "__main__":
    main(sys.argv[1:])
