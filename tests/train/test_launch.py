"""Run staging: a remote (gs://) workdir is written locally first and mirrored after each checkpoint."""
import os

from gen_jax.train import make_mesh
from gen_jax.train.launch import Run, is_remote


def test_staged_run_mirrors_files_and_pulls_them_back(tmp_path):
    remote, staging = tmp_path / "bucket", tmp_path / "staging"
    run = Run(workdir=str(remote), mesh=make_mesh(), config=None, started=0.0, local_dir=str(staging))
    run.write_json("results.json", {"fid": 1.5})
    with open(run.path("samples", "grid.png"), "wb") as f:
        f.write(b"png")
    run.sync()
    assert (remote / "results.json").exists() and (remote / "samples" / "grid.png").read_bytes() == b"png"
    assert run.train_kwargs()["checkpoint_dir"] == f"{remote}/checkpoints"
    # A resumed run on another machine starts from an empty staging folder and gets the files back.
    fresh = Run(workdir=str(remote), mesh=make_mesh(), config=None, started=0.0, local_dir=str(tmp_path / "s2"))
    fresh._pull()
    assert open(fresh.path("samples", "grid.png"), "rb").read() == b"png"
    # Unchanged files are not uploaded again.
    os.remove(remote / "results.json")
    fresh.sync()
    assert not (remote / "results.json").exists()


def test_remote_paths_are_recognised():
    assert is_remote("gs://bucket/run") and not is_remote("/data/run") and not is_remote("runs/x")
