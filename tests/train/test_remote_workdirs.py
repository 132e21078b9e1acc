"""Every launcher with a remote (gs://) workdir, end to end and offline.

A fake bucket stands in for Cloud Storage: `gs://` paths opened through `etils.epath` (the launchers' sync
and pull, `load_generator`, `--init`) and the checkpoint folders handed to `gen_jax.train.Checkpointer`
(Orbax) map to a local folder. The launchers see a real `gs://...` string, so a file written under it with
`open`/`os` lands in a literal `gs:` folder of the working directory, which must stay empty. Each launcher's
tiny preset runs once with one staging folder, then again with a fresh, empty one (another machine, a
preempted job restarted): it must find its checkpoint (no step is trained twice) and get its files back.

Cost: the default run (flash, roformer_sim, vae_likelihood, vmf_vae and the pieces) takes ~150 s of CPU; gngan
(~75 s), hubness on it (~10 s more), gngan's compare mode (~70 s) and ddpm (~145 s) are marked slow.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from etils import epath
from etils.epath import register as epath_register

from gen_jax.train.checkpoint import Checkpointer

BUCKET = "gs://test-bucket"


@dataclasses.dataclass
class FakeBucket:
    root: Path  # gs://test-bucket/x <-> root/x
    cwd: Path  # the launchers' working directory
    staging: Path  # one fresh staging root per launch under here
    launches: int = 0

    def local(self, url: str) -> Path:
        assert url.startswith(BUCKET), url
        return self.root / url[len(BUCKET):].strip("/")

    def launch(self, module: str, *argv: str) -> tuple[dict, Path]:
        """`python -m experiments.<module> *argv` in-process with an empty staging root; (results, staging)."""
        import importlib
        self.launches += 1
        staging = self.staging / f"launch{self.launches}"
        os.environ["GEN_JAX_STAGING"] = str(staging)
        results = importlib.import_module(f"experiments.{module}").main(list(argv))
        assert not (self.cwd / "gs:").exists(), "a launcher wrote under the gs:// string as a local path"
        assert sorted(os.listdir(self.cwd)) == [], sorted(os.listdir(self.cwd))
        return results, staging


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    base = tmp_path_factory.mktemp("remote")
    fake = FakeBucket(root=base / "bucket", cwd=base / "cwd", staging=base / "staging")
    fake.root.mkdir()
    fake.cwd.mkdir()

    def to_local(path):
        return str(fake.local(str(path))) if str(path).startswith("gs://") else path

    init = Checkpointer.__init__

    def checkpointer_init(self, directory, **kwargs):
        init(self, to_local(directory), **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(epath_register._URI_PREFIXES_TO_CLS, "gs://", lambda path: epath.Path(to_local(path)))
        mp.setattr(Checkpointer, "__init__", checkpointer_init)
        mp.setenv("GEN_JAX_STAGING", str(fake.staging / "unused"))
        mp.chdir(fake.cwd)
        yield fake


def _files(folder: Path, skip_checkpoints: bool = True) -> dict[str, bytes]:
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not (skip_checkpoints and "checkpoints" in rel.parts):
            out[str(rel)] = path.read_bytes()
    return out


def _staging_of(staging_root: Path, url: str) -> Path:
    from gen_jax.train.launch import staging_dir
    old = os.environ.get("GEN_JAX_STAGING")
    os.environ["GEN_JAX_STAGING"] = str(staging_root)
    try:
        return Path(staging_dir(url))
    finally:
        os.environ["GEN_JAX_STAGING"] = old or ""


def _check_mirrored(bucket: FakeBucket, url: str, staging_root: Path, expected: list[str]) -> dict[str, bytes]:
    """The remote workdir holds exactly the staged files (and the expected ones); returns them."""
    remote = _files(bucket.local(url))
    staged = _files(_staging_of(staging_root, url))
    assert set(remote) == set(staged), (set(remote) ^ set(staged))
    changed = [name for name in remote if remote[name] != staged[name]]
    assert not changed, f"not synced after their last change: {changed}"
    missing = [name for name in expected if name not in remote]
    assert not missing, f"missing in {url}: {missing}; has {sorted(remote)}"
    return remote


def _train_steps(metrics: bytes) -> list[int]:
    rows = [json.loads(line) for line in metrics.decode().splitlines() if line.strip()]
    return [r["step"] for r in rows if any(k.startswith("train/") for k in r)]


def _checkpoints(bucket: FakeBucket, url: str) -> list[int]:
    folder = bucket.local(url) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _relaunch_resumes(bucket, module, url, argv, first_files, metrics_files):
    """A second launch from an empty staging folder: the files come back and no step is trained again."""
    results, staging = bucket.launch(module, *argv)
    again = _check_mirrored(bucket, url, staging, list(first_files))
    for name in metrics_files:
        assert _train_steps(again[name]) == _train_steps(first_files[name]), name  # resumed at the end
        assert again[name].startswith(first_files[name])  # pulled back, then appended to
    return results, again


# ------------------------------------------------------------------------------------------- the pieces

@dataclasses.dataclass(frozen=True)
class _Cfg:
    seed: int = 0


def test_start_run_stages_a_remote_workdir_afresh_and_pulls_it(bucket):
    from gen_jax.train.launch import start_run
    url = f"{BUCKET}/pieces/run"
    (bucket.local(url) / "a" / "checkpoints" / "3").mkdir(parents=True)
    (bucket.local(url) / "a" / "metrics.jsonl").write_text('{"step": 3}\n')
    os.environ["GEN_JAX_STAGING"] = str(bucket.staging / "pieces")
    staging = _staging_of(bucket.staging / "pieces", url)
    (staging / "stale").mkdir(parents=True)  # an earlier launch's leftovers are not mirrored back
    args = dataclasses.make_dataclass("Args", [("workdir", str), ("preset", str)])(url + "/", "x")
    run = start_run(_Cfg(), args, name="pieces")
    assert run.workdir == url and run.staged and run.local_dir == str(staging)
    assert sorted(_files(staging)) == ["a/metrics.jsonl", "config.json"]  # checkpoints are left to Orbax
    sub = run.sub("a")
    assert (sub.workdir, sub.local_dir, sub.checkpoint_dir) == (f"{url}/a", str(staging / "a"), f"{url}/a/checkpoints")
    assert sub.train_kwargs()["workdir"] == str(staging / "a") and sub.is_main and sub.config == run.config
    with open(sub.path("samples", "x.png"), "wb") as f:
        f.write(b"png")
    sub.sync()  # through the parent: one mirror for the whole staging folder
    assert (bucket.local(url) / "a" / "samples" / "x.png").read_bytes() == b"png"
    assert (bucket.local(url) / "config.json").exists() and not (bucket.local(url) / "stale").exists()
    # A file another process wrote during the launch is fetched on demand; a local run's paths are as given.
    (bucket.local(url) / "vocab.txt").write_text("v")
    assert open(run.fetch("vocab.txt")).read() == "v"
    nested = sub.sub("b")
    assert nested.staged and nested.workdir == f"{url}/a/b" and nested.local_dir == str(staging / "a" / "b")
    assert not (bucket.cwd / "gs:").exists()


def test_local_runs_and_sub_runs_stay_unstaged(tmp_path):
    from gen_jax.train import make_mesh
    from gen_jax.train.launch import Run, local_copy, staging_dir
    run = Run(workdir=str(tmp_path), mesh=make_mesh(), config=None, started=0.0)
    sub = run.sub("m")
    assert not run.staged and not sub.staged and sub.workdir == sub.local_dir == str(tmp_path / "m")
    assert sub.checkpoint_dir == f"{tmp_path}/m/checkpoints" and run.fetch("x") == str(tmp_path / "x")
    sub.sync()  # a no-op
    assert local_copy(str(tmp_path)) == str(tmp_path)
    assert staging_dir("gs://b/r", 0) != staging_dir("gs://b/r", 1)  # processes sharing a host


def test_train_refuses_a_remote_workdir():
    from gen_jax.train import train
    with pytest.raises(ValueError, match="train_kwargs"):
        train(workdir=f"{BUCKET}/x", state=None, update_fn=None, data=None, num_steps=1)


def test_remote_inputs_are_downloaded_and_non_runs_refused(bucket):
    from gen_jax.errors import CheckpointError
    from gen_jax.gan.training import load_generator
    from gen_jax.train.launch import local_copy
    folder = bucket.local(f"{BUCKET}/inputs/model")
    (folder / "sub").mkdir(parents=True)
    (folder / "vocab.txt").write_text("v")
    (folder / "weights.bin").write_bytes(b"w")
    copy = local_copy(f"{BUCKET}/inputs/model", ["vocab.txt", "missing.txt"])
    assert sorted(os.listdir(copy)) == ["vocab.txt"] and not copy.startswith("gs:")
    assert open(local_copy(f"{BUCKET}/inputs/model/weights.bin"), "rb").read() == b"w"
    with pytest.raises(CheckpointError, match="not a gngan run"):
        load_generator(f"{BUCKET}/inputs/model")


# ------------------------------------------------------------------------------------------------ launchers

@pytest.fixture(scope="module")
def gngan_run(bucket):
    url = f"{BUCKET}/gngan"
    argv = ["--preset", "tiny", "--workdir", url, "--set", "train.num_steps=4", "--set", "train.checkpoint_every=2",
            "--set", "eval.sample_every=2", "--set", "train.log_every=2", "--set", "eval.fid_samples=100"]
    first, staging = bucket.launch("gngan", *argv)
    return url, argv, first, staging


@pytest.mark.slow  # ~75 s of CPU (GN-GAN's double backprop compiles), most in gngan_run
def test_gngan_writes_to_the_bucket_and_resumes_from_it(bucket, gngan_run):
    url, argv, first, staging = gngan_run
    files = _check_mirrored(bucket, url, staging, ["results.json", "config.json", "metrics.jsonl", "curves.png",
                                                   "samples/step0000002.png", "samples/step0000004.png",
                                                   "samples/final_random.png"])
    assert json.loads(files["results.json"])["steps"] == 4 and _checkpoints(bucket, url) == [2, 4]
    assert _train_steps(files["metrics.jsonl"]) == [2, 4]
    again, _ = _relaunch_resumes(bucket, "gngan", url, argv, files, ["metrics.jsonl"])
    assert again["resumed_from"] == 4 and again["steps_per_sec"] == first["steps_per_sec"]


@pytest.mark.slow  # ~10 s of CPU after gngan_run
def test_hubness_reads_a_remote_gngan_run_and_writes_to_the_bucket(bucket, gngan_run):
    gngan_url = gngan_run[0]
    url = f"{BUCKET}/hubness"
    r, staging = bucket.launch("hubness", "--preset", "tiny", "--checkpoint", gngan_url, "--workdir", url)
    assert r["checkpoint"] == gngan_url and r["checkpoint_step"] == 4
    files = _check_mirrored(bucket, url, staging, ["results.json", "hubness.md", "grids_side_by_side.png",
                                                   "config.json"])
    assert json.loads(files["results.json"])["checkpoint_step"] == 4


@pytest.mark.slow  # ~70 s of CPU (three methods)
def test_gngan_compare_stages_every_method_and_reuses_them_after_a_restart(bucket):
    url = f"{BUCKET}/gngan_compare"
    argv = ["--preset", "tiny_compare", "--workdir", url, "--set", "train.num_steps=2", "--set",
            "eval.sample_every=0", "--set", "train.log_every=1", "--set", "eval.fid_samples=100"]
    out, staging = bucket.launch("gngan", *argv)
    methods = out["methods"]
    per_method = [f"{m}/{name}" for m in methods for name in ("results.json", "config.json", "metrics.jsonl",
                                                               "samples/step0000002.png")]
    files = _check_mirrored(bucket, url, staging, ["comparison.json", "comparison.md", "comparison_grids.png",
                                                   *per_method])
    for m in methods:
        assert _checkpoints(bucket, f"{url}/{m}") == [2]
    assert not (bucket.local(url) / "checkpoints").exists()
    # A restart on a fresh machine: every method is found finished (its pulled results.json), none retrained.
    again, files2 = _relaunch_resumes(bucket, "gngan", url, argv, files, [f"{m}/metrics.jsonl" for m in methods])
    assert again["results"] == json.loads(json.dumps(out["results"]))
    assert all(files2[f"{m}/results.json"] == files[f"{m}/results.json"] for m in methods)


def test_flash_stages_each_model_and_resumes_from_the_bucket(bucket):
    url = f"{BUCKET}/flash"
    argv = ["--preset", "tiny", "--workdir", url, "--set", "models=flash", "--set",
            "train.num_steps=4", "--set", "train.checkpoint_every=2", "--set", "eval.every_steps=2"]
    first, staging = bucket.launch("flash", *argv)
    models = ["flash"]
    files = _check_mirrored(bucket, url, staging, [
        "results.json", "comparison.md", "vocab.json", "val_curves.png", "samples.txt", "config.json",
        *[f"{m}/{name}" for m in models for name in ("results.json", "metrics.jsonl")]])
    for m in models:
        assert _checkpoints(bucket, f"{url}/{m}") == [2, 4]
        assert _train_steps(files[f"{m}/metrics.jsonl"])[-1] == 4
    again, _ = _relaunch_resumes(bucket, "flash", url, argv, files, [f"{m}/metrics.jsonl" for m in models])
    assert again["val_bpc"] == first["val_bpc"]  # restored models, reused per-model results


@pytest.mark.slow  # ~145 s of CPU: the U-Net step and sampler compile slowly
def test_ddpm_writes_to_the_bucket_and_resumes_from_it(bucket):
    url = f"{BUCKET}/ddpm"

    def argv(steps):
        return ["--preset", "tiny", "--workdir", url, "--set", f"train.num_steps={steps}", "--set",
                "train.checkpoint_every=2", "--set", "eval.sample_every=2", "--set", "train.log_every=2",
                "--set", "eval.fid_samples=0", "--set", "eval.bpd_examples=0", "--set", "eval.ancestral_grid=false"]

    _, staging = bucket.launch("ddpm", *argv(4))
    files = _check_mirrored(bucket, url, staging, ["results.json", "config.json", "metrics.jsonl", "curves.png",
                                                   "samples/ddim10_step0000004.png"])
    assert _checkpoints(bucket, url) == [2, 4] and _train_steps(files["metrics.jsonl"]) == [2, 4]
    # Stopped at step 4 of 6: a fresh machine resumes there and appends to the pulled metrics.
    results, staging2 = bucket.launch("ddpm", *argv(6))
    assert results["steps"] == 6 and _checkpoints(bucket, url) == [2, 4, 6]
    files2 = _check_mirrored(bucket, url, staging2, [*files, "samples/ddim10_step0000006.png"])
    assert _train_steps(files2["metrics.jsonl"]) == [2, 4, 6]
    assert files2["metrics.jsonl"].startswith(files["metrics.jsonl"])


def test_roformer_sim_stages_its_vocab_and_export_and_init_reads_the_bucket(bucket):
    url = f"{BUCKET}/roformer_sim"
    argv = ["--preset", "tiny", "--workdir", url, "--set", "train.num_steps=4", "--set", "train.checkpoint_every=2",
            "--set", "eval.every=2"]
    first, staging = bucket.launch("roformer_sim", *argv)
    files = _check_mirrored(bucket, url, staging, ["results.json", "config.json", "metrics.jsonl", "vocab.txt",
                                                   "curves.png", "generated.jsonl", "export/model.safetensors",
                                                   "export/config.json", "export/vocab.txt"])
    assert _checkpoints(bucket, url) == [2, 4]
    again, files2 = _relaunch_resumes(bucket, "roformer_sim", url, argv, files, ["metrics.jsonl"])
    assert again["start_step"] == 4 and files2["vocab.txt"] == files["vocab.txt"]  # the same ids
    # --init gs://...: a remote gen_jax workdir means its export/, downloaded first.
    from gen_jax.roformer_sim.training import fetch_pretrained, load_pretrained
    for path in (url, f"{url}/export"):  # a workdir or an HF-style folder
        model, vocab = load_pretrained(path)
        assert not vocab.startswith("gs:") and open(vocab, "rb").read() == files["export/vocab.txt"]
        assert model.config.hidden_size == 32 and model.config.vocab_size == first["vocab_size"]
    weights = fetch_pretrained(f"{url}/export/model.safetensors")  # a weight file comes with what is beside it
    assert open(weights, "rb").read() == files["export/model.safetensors"]
    assert sorted(os.listdir(os.path.dirname(weights))) == ["config.json", "model.safetensors", "vocab.txt"]


def _vae_argv(module: str, url: str, steps: int) -> list[str]:
    argv = ["--preset", "tiny", "--workdir", url, "--set", f"train.num_steps={steps}", "--set",
            "train.checkpoint_every=5", "--set", "train.log_every=5"]
    return argv + (["--set", "dims=2", "--set", "families=spherical"] if module == "vmf_vae" else [])


@pytest.mark.parametrize("module, models, pictures", [
    ("vae_likelihood", ["vae_k1", "iwae_k5"], ["samples/vae_k1_prior.png", "samples/iwae_k5_reconstructions.png",
                                              "results.md", "curves.png"]),
    ("vmf_vae", ["spherical_d2"], ["samples/spherical_d2_prior.png", "latent_spherical_d2.png", "results.md"]),
])
def test_vae_launchers_stage_each_model_and_resume_from_the_bucket(bucket, module, models, pictures):
    url = f"{BUCKET}/{module}"
    first, staging = bucket.launch(module, *_vae_argv(module, url, 10))
    assert sorted(first["models"]) == sorted(models)
    files = _check_mirrored(bucket, url, staging, ["results.json", "config.json", *pictures,
                                                   *[f"{m}/{n}" for m in models
                                                     for n in ("metrics.jsonl", "eval.json", "timing.json")]])
    for m in models:
        assert _checkpoints(bucket, f"{url}/{m}") == [5, 10] and _train_steps(files[f"{m}/metrics.jsonl"]) == [5, 10]
    # Stopped at step 10 of 15: a fresh machine resumes each model there and appends to the pulled files.
    again, staging2 = bucket.launch(module, *_vae_argv(module, url, 15))
    files2 = _check_mirrored(bucket, url, staging2, list(files))
    for m in models:
        assert _checkpoints(bucket, f"{url}/{m}") == [5, 10, 15] and again["models"][m]["steps"] == 15
        assert _train_steps(files2[f"{m}/metrics.jsonl"]) == [5, 10, 15]
        assert files2[f"{m}/metrics.jsonl"].startswith(files[f"{m}/metrics.jsonl"])
        timing = json.loads(files2[f"{m}/timing.json"])  # carried over from the pulled one: still complete
        assert timing["step"] == 15 and timing["complete"] and again["models"][m]["timing_complete"]
