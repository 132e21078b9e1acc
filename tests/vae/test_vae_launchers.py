"""The VAE launchers end to end (tiny presets on 8 fake devices) and their helpers."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gen_jax.vae.configs import OptimConfig, VMFVAEConfig, likelihood_mnist, vmf_mnist
from gen_jax.vae.training import (binarize_fixed, hammer_projection, largest_divisor_at_most, make_lr_schedule)


def test_iwae_stage_schedule_follows_the_paper_scaled_to_the_run():
    # 8 stages of 3^i epochs out of 3280 at lr 1e-3 * 10^(-i/7): stage 0 is the first 1/3280 of training
    sched = make_lr_schedule(OptimConfig(schedule="iwae_stages"), 1e-3, 3280)
    starts = np.cumsum([0] + [3 ** i for i in range(7)])
    for i, s in enumerate(starts):
        assert math.isclose(float(sched(int(s))), 1e-3 * 10 ** (-i / 7), rel_tol=1e-5)
    assert math.isclose(float(sched(3279)), 1e-3 * 10 ** (-1), rel_tol=1e-5)


def test_chunk_size_divides_k_and_binarization_is_a_fixed_bernoulli_draw():
    assert [largest_divisor_at_most(k, 250) for k in (1, 5, 50, 5000, 7)] == [1, 5, 50, 250, 7]
    images = np.full((400, 28, 28, 1), 64, np.uint8)
    x = binarize_fixed(images, seed=3)
    assert x.shape == (400, 784) and set(np.unique(x)) <= {0.0, 1.0}
    assert abs(x.mean() - 64 / 255) < 0.005 and np.array_equal(x, binarize_fixed(images, seed=3))


def test_hammer_projection_is_equal_area():
    # uniform points on S^2 stay uniform: equal shares in the two halves split by the projected x = 0 and
    # inside / outside the image of the polar caps |lat| > 30 deg (area share 1/2 each)
    g = np.random.default_rng(0).normal(size=(40000, 3))
    p = hammer_projection(g)
    assert np.all(p[:, 0] ** 2 / 8 + p[:, 1] ** 2 / 2 <= 1 + 1e-9)
    lat = np.arcsin(g[:, 2] / np.linalg.norm(g, axis=1))
    assert abs(np.mean(np.abs(lat) > np.pi / 6) - 0.5) < 0.01


def test_presets_follow_the_papers_settings():
    lk = likelihood_mnist()
    assert (lk.model.hidden, lk.model.latent_dim, lk.model.activation) == ((200, 200), 50, "tanh")
    assert lk.objectives == ("vae", "iwae") and 5000 in lk.eval.ks
    vm = vmf_mnist()
    assert vm.dims == (2, 5, 10, 20) and vm.eval.importance_samples == 500
    assert [vm.ambient_dim(d) for d in vm.dims] == [3, 6, 11, 21]  # Davidson et al.: S^d in R^(d+1)
    with pytest.raises(Exception, match="fixed kappa"):
        VMFVAEConfig(sampler="table").validate()


@pytest.mark.slow
def test_vae_likelihood_tiny_trains_both_objectives_evaluates_and_resumes(tmp_path):
    from experiments import vae_likelihood
    workdir = tmp_path / "run"
    args = ["--preset", "tiny", "--workdir", str(workdir)]
    first = vae_likelihood.main(args + ["--set", "train.num_steps=10"])
    assert set(first["models"]) == {"vae_k1", "iwae_k5"} and first["ks"] == [1, 10]
    for m in first["models"].values():
        assert m["steps"] == 10 and m["steps_per_sec"] > 0
        nll = m["test_nll"]
        assert np.isfinite(nll["1"]) and nll["10"] < nll["1"]  # the bound rises with K (Burda et al. Thm 1)
    for name in ("vae_k1_prior", "iwae_k5_reconstructions"):
        assert np.asarray(Image.open(workdir / "samples" / f"{name}.png")).std() > 0
    assert "| VAE, k=1 |" in (workdir / "results.md").read_text()

    second = vae_likelihood.main(args + ["--set", "train.num_steps=20"])  # resumes each model from step 10
    saved = json.loads((workdir / "results.json").read_text())
    assert saved == json.loads(json.dumps(second))
    for name, m in saved["models"].items():
        rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "train/loss" in r] == [10, 20]  # no step trained twice
        assert m["steps"] == 20 and m["timing_complete"]
        assert m["train_seconds"] >= first["models"][name]["train_seconds"]
        assert json.loads((workdir / name / "eval.json").read_text())["key"]["step"] == 20


@pytest.mark.slow
def test_vmf_vae_tiny_reports_both_families_and_draws_latent_plots(tmp_path):
    from experiments import vmf_vae
    workdir = tmp_path / "run"
    results = vmf_vae.main(["--preset", "tiny", "--workdir", str(workdir), "--set", "dims=2",
                            "--set", "train.num_steps=10"])
    models = results["models"]
    assert set(models) == {"normal_d2", "spherical_d2"}
    assert models["spherical_d2"]["ambient_dim"] == 3 and models["spherical_d2"]["test_kappa_median"] >= 1
    for m in models.values():
        assert np.isfinite(m["log_likelihood"]) and m["log_likelihood"] < 0 and m["paper_log_likelihood"] < 0
    for name in ("latent_normal_d2.png", "latent_spherical_d2.png", "samples/spherical_d2_prior.png"):
        img = np.asarray(Image.open(workdir / name))
        assert img.std() > 0
    assert "| S-VAE |" in (workdir / "results.md").read_text()
