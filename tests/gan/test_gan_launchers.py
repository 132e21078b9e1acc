"""The GAN trainer (alternating D/G updates on the shared core) and the gngan / hubness launchers.

Runs on the 8 fake CPU devices of tests/conftest.py. The end-to-end tests compile a GN-GAN step with double
backprop (tens of seconds on a loaded 2-core machine) and are marked slow.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from gen_jax.config import to_dict
from gen_jax.errors import CheckpointError, ConfigError
from gen_jax.gan.configs import (HUBNESS_PRESETS, PRESETS, GANConfig, GNGANConfig, HubnessConfig, ModelConfig,
                                 config_from_dict, tiny)
from gen_jax.gan.training import build_gan, load_generator, make_gan_update_fn, save_labeled_panels
from gen_jax.images import image_grid
from gen_jax.train import make_mesh


def _count(opt_state) -> int:
    return int(optax.tree_utils.tree_get(opt_state, "count"))


# ------------------------------------------------------------------------------------------ fast checks

@pytest.mark.parametrize("factory", [*PRESETS.values()])
def test_every_preset_validates_and_round_trips_through_config_json(factory):
    cfg = factory()
    cfg.validate()
    assert config_from_dict(GNGANConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_hubness_presets_validate():
    for factory in HUBNESS_PRESETS.values():
        factory().validate()
    with pytest.raises(ConfigError, match="psi"):
        HubnessConfig(truncation_psi=(0.5, 1.5)).validate()


def test_bad_settings_raise_config_errors_that_name_the_fix():
    with pytest.raises(ConfigError, match="gan.method='lsgan'"):
        dataclasses.replace(tiny(), gan=GANConfig(method="lsgan")).validate()
    with pytest.raises(ConfigError, match="n_dis"):
        dataclasses.replace(tiny(), gan=GANConfig(n_dis=0)).validate()
    with pytest.raises(ConfigError, match="unknown|no fields"):
        config_from_dict(GNGANConfig, {"gan": {"nonsense": 1}})
    assert GANConfig(method="wgan_gp").resolved_loss == "wgan" and GANConfig(loss="bce").resolved_loss == "bce"


def test_load_generator_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="not a gngan run"):
        load_generator(str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # nothing created in someone else's directory


def test_labeled_panels_place_each_grid_unchanged_side_by_side(tmp_path):
    rng = np.random.default_rng(0)
    a = image_grid(rng.integers(0, 256, (4, 5, 5, 1), dtype=np.uint8))
    b = image_grid(rng.integers(0, 256, (9, 5, 5, 1), dtype=np.uint8))
    path = save_labeled_panels(str(tmp_path / "p.png"), {"a": a, "b": b}, gap=8)
    out = np.asarray(Image.open(path))
    assert out.shape == (14 + max(a.shape[0], b.shape[0]), a.shape[1] + 8 + b.shape[1])
    np.testing.assert_array_equal(out[14:14 + a.shape[0], :a.shape[1]], a[..., 0])
    np.testing.assert_array_equal(out[14:14 + b.shape[0], a.shape[1] + 8:], b[..., 0])


# ------------------------------------------------------------------------------------- the update step

def _small(method: str, n_dis: int = 2) -> GNGANConfig:
    cfg = tiny()
    return dataclasses.replace(cfg, model=ModelConfig(z_dim=8, g_width=4, d_width=4),
                               gan=dataclasses.replace(cfg.gan, method=method, n_dis=n_dis))


@pytest.mark.slow
def test_gn_step_does_n_dis_d_updates_one_g_update_and_an_ema_of_g_only():
    cfg = _small("gn", n_dis=2)
    mesh = make_mesh()
    setup, state = build_gan(cfg)
    g0 = state.params["G"]
    update = jax.jit(make_gan_update_fn(setup, mesh))
    images = np.random.default_rng(0).integers(0, 256, (2 * cfg.train.batch_size, 28, 28, 1), dtype=np.uint8)
    new, metrics = update(state, {"image": jnp.asarray(images)})
    # Two Adam steps for D, one for G, per train step.
    assert _count(new.opt_state["D"]) == 2 and _count(new.opt_state["G"]) == 1 and int(new.step) == 1
    # EMA of G with the warm-up decay min(0.9, (1 + 0) / (10 + 0)) = 0.1 at step 0.
    expected = jax.tree.map(lambda e, p: 0.1 * e + 0.9 * p, g0, new.params["G"])
    for got, want in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert jax.tree.structure(new.ema_params) == jax.tree.structure(g0)  # G only, no D in the EMA
    # GN scores are bounded by 1, so the hinge D loss lies in [0, 4]; every metric is finite.
    m = {k: float(v) for k, v in metrics.items()}
    assert abs(m["d_real"]) <= 1 and abs(m["d_fake"]) <= 1 and 0 <= m["d_loss"] <= 4
    assert m["finite"] == 1.0 and np.isfinite(m["g_loss"]) and m["loss"] == m["d_loss"]
    # Both networks moved.
    assert not np.allclose(jax.tree.leaves(new.params["D"])[0], jax.tree.leaves(state.params["D"])[0])
    assert not np.allclose(jax.tree.leaves(new.params["G"])[0], jax.tree.leaves(g0)[0])


@pytest.mark.slow
def test_wgan_gp_reports_its_penalty_and_sn_advances_its_power_iteration():
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8))
    setup, state = build_gan(_small("wgan_gp", n_dis=1))
    _, metrics = jax.jit(make_gan_update_fn(setup))(state, {"image": images})
    assert float(metrics["gp"]) >= 0 and setup.cfg.gan.resolved_loss == "wgan"
    assert float(metrics["finite"]) == 1.0

    setup, state = build_gan(_small("sn", n_dis=1))
    new, metrics = jax.jit(make_gan_update_fn(setup))(state, {"image": images})
    u0, u1 = jax.tree.leaves(state.opt_state["sn"]), jax.tree.leaves(new.opt_state["sn"])
    assert len(u0) == 8  # 7 convs + the final linear layer
    assert any(not np.allclose(a, b) for a, b in zip(u0, u1))
    np.testing.assert_allclose([np.linalg.norm(u) for u in u1], 1.0, rtol=1e-5)  # unit vectors


# ----------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from experiments import gngan
    workdir = tmp_path_factory.mktemp("gngan") / "run"
    results = gngan.main(["--preset", "tiny", "--workdir", str(workdir), "--set", "train.num_steps=10"])
    return workdir, results


@pytest.mark.slow
def test_gngan_tiny_trains_writes_grids_and_scores_and_resumes(tiny_run):
    from experiments import gngan
    workdir, results = tiny_run
    saved = json.loads((workdir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["method"] == "gn" and saved["loss"] == "hinge" and saved["n_dis"] == 2
    assert saved["steps"] == 10 and saved["resumed_from"] == 0 and saved["steps_per_sec"] > 0
    assert np.isfinite(saved["fid"]) and saved["fid_floor"] < saved["fid"]  # 10 steps are far from MNIST
    assert 0 <= saved["precision"] <= 1 and 0 <= saved["recall"] <= 1 and saved["recall_floor"] > 0.5
    grid = np.asarray(Image.open(workdir / "samples" / "step0000010.png"))
    assert grid.ndim == 2 and grid.std() > 0
    assert (workdir / "samples" / "final_random.png").exists() and (workdir / "curves.png").exists()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/d_loss" in r] == [5, 10]
    # Re-running with more steps resumes from the checkpoint at step 10.
    more = gngan.main(["--preset", "tiny", "--workdir", str(workdir), "--set", "train.num_steps=12"])
    assert more["resumed_from"] == 10 and more["steps"] == 12
    assert (workdir / "checkpoints" / "12").exists()


@pytest.mark.slow
def test_hubness_tiny_compares_samplers_on_the_trained_generator(tiny_run, tmp_path):
    from experiments import hubness
    workdir, _ = tiny_run
    out = tmp_path / "hub"
    r = hubness.main(["--preset", "tiny", "--checkpoint", str(workdir), "--workdir", str(out)])
    assert set(r["samplers"]) == {"random", "hubs", "psi=0.5", "psi=0.8"}
    rows = r["samplers"]
    # Truncation scales the random latents exactly; hubs lie nearer the centre than random latents (the
    # paper's observation that N_k and |z| are anti-correlated).
    for psi in (0.5, 0.8):
        assert rows[f"psi={psi:g}"]["mean_z_norm"] == pytest.approx(psi * rows["random"]["mean_z_norm"], rel=1e-5)
    assert rows["hubs"]["mean_z_norm"] < rows["random"]["mean_z_norm"]
    assert all(np.isfinite(row["fid"]) and row["num_samples"] == 100 for row in rows.values())
    assert r["hub_rule"].startswith("N_k >=") and r["hub_threshold"] > r["hub_k"]  # above the mean N_k = k
    assert json.loads((out / "results.json").read_text())["samplers"] == json.loads(json.dumps(rows))
    table = (out / "hubness.md").read_text()
    assert "| hubs |" in table and "floor" in table
    panel = np.asarray(Image.open(out / "grids_side_by_side.png"))
    assert panel.shape[1] > 4 * 4 * 28  # four 4x4 grids of 28-pixel digits side by side


@pytest.mark.slow
def test_compare_mode_trains_each_method_in_its_own_workdir_and_reuses_finished_ones(tmp_path):
    from experiments import gngan
    workdir = tmp_path / "cmp"
    args = ["--preset", "tiny_compare", "--workdir", str(workdir), "--set", "train.num_steps=2",
            "--set", "eval.sample_every=0", "--set", "train.log_every=1"]
    out = gngan.main(args)
    assert out["methods"] == ["gn", "gran", "wgan_gp"]
    assert {m: out["results"][m]["loss"] for m in out["methods"]} == {"gn": "hinge", "gran": "hinge",
                                                                       "wgan_gp": "wgan"}
    for method in out["methods"]:
        assert json.loads((workdir / method / "results.json").read_text())["steps"] == 2
    table = (workdir / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in out["methods"]) and "floor" in table
    assert (workdir / "comparison_grids.png").exists()
    stamp = os.path.getmtime(workdir / "gn" / "results.json")
    again = gngan.main(args)  # everything finished: nothing is retrained or rescored
    assert again["results"] == out["results"] and os.path.getmtime(workdir / "gn" / "results.json") == stamp
