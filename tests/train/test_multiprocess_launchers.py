"""The real launchers as several `jax.distributed` processes on one machine (`experiments/launch_local.py`).

A 2-process run (one CPU device each) must train exactly like a 1-process run on 2 devices with the same
global batch: same final checkpoint (params, EMA, optimizer state, data position) and same reported numbers.
Killing one process must end the launch promptly with a non-zero status and a message naming the process,
and re-running the same command must resume from the last checkpoint and finish with the uninterrupted
run's result.

Every run goes through `python -m experiments.launch_local ... -- experiments.<paper> --preset tiny`. The
runs inherit the test session's persistent XLA compilation cache (tests/conftest.py), so the kill and resume
runs reuse the 2-process run's compiled programs.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# FLASH alone (the tiny preset trains three models), 16 steps, a checkpoint every 4, validation at 8 and
# 16; no text samples (compiling cached decoding would add ~6 s of CPU per process).
FLASH = ["models=flash", "train.num_steps=16", "train.checkpoint_every=4", "train.log_every=4",
         "eval.every_steps=8", "sample.num_samples=0"]
# The tiny DDPM with every evaluation on but small: grids at 3 and 6, FID on 32 samples, bits/dim on 8.
DDPM = ["train.num_steps=6", "train.checkpoint_every=3", "train.log_every=3", "eval.sample_every=3",
        "eval.grid_size=4", "eval.fid_samples=32", "eval.sample_batch=16", "eval.bpd_examples=8",
        "eval.bpd_timesteps=5"]


def _command(num_processes, devices_per_process, module, workdir, sets):
    return ([sys.executable, "-m", "experiments.launch_local", "-n", str(num_processes),
             "--devices-per-process", str(devices_per_process), "--", module, "--preset", "tiny",
             "--workdir", str(workdir)] + [a for s in sets for a in ("--set", s)])


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1")


def _launch(num_processes, devices_per_process, module, workdir, sets, timeout=420):
    proc = subprocess.run(_command(num_processes, devices_per_process, module, workdir, sets), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{module} on {num_processes} process(es) failed ({proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def _checkpoint(directory):
    """The newest checkpoint under `directory` as (step, flat {path: array} of the state, data position)."""
    step = max(int(name) for name in os.listdir(directory) if name.isdigit())
    path = os.path.join(directory, str(step))
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(os.path.join(path, "state")).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = ckptr.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(restore_args=restore_args))
    with open(os.path.join(path, "data", "metadata")) as f:
        data = json.load(f)
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)}
    return step, flat, data


def _assert_same_checkpoint(a, b, tol):
    (step_a, state_a, data_a), (step_b, state_b, data_b) = a, b
    assert step_a == step_b and data_a == data_b
    assert sorted(state_a) == sorted(state_b)
    assert any("params" in k for k in state_a) and any("opt_state" in k for k in state_a)
    for key in state_a:
        np.testing.assert_allclose(state_a[key], state_b[key], rtol=tol, atol=tol, err_msg=key)


def _train_losses(metrics_path):
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


# ---------------------------------------------------------------------------------------------- FLASH

@pytest.fixture(scope="module")
def flash_two(tmp_path_factory):
    """The uninterrupted 2-process run: the reference of the parity and the kill-and-resume tests."""
    wd = tmp_path_factory.mktemp("flash2") / "run"
    proc = _launch(2, 1, "experiments.flash", wd, FLASH)
    assert "in 2 process(es)" in proc.stdout
    return wd


def _assert_same_flash_results(wd, ref, tol):
    _assert_same_checkpoint(_checkpoint(wd / "flash" / "checkpoints"), _checkpoint(ref / "flash" / "checkpoints"),
                            tol)
    got, want = (json.loads((d / "results.json").read_text()) for d in (wd, ref))
    assert got["steps"] == want["steps"] == 16
    row, ref_row = got["models"]["flash"], want["models"]["flash"]
    assert row["val_bpc"] == pytest.approx(ref_row["val_bpc"], rel=tol)
    assert row["train_bpc"] == pytest.approx(ref_row["train_bpc"], rel=tol)
    assert [p[0] for p in row["curve"]] == [p[0] for p in ref_row["curve"]] == [8, 16]
    np.testing.assert_allclose([p[1] for p in row["curve"]], [p[1] for p in ref_row["curve"]], rtol=tol)


def test_flash_two_processes_match_one_process(tmp_path, flash_two):
    one = tmp_path / "run"
    proc = _launch(1, 2, "experiments.flash", one, FLASH)
    assert "2 cpu device(s) (cpu) in 1 process(es)" in proc.stdout
    _assert_same_flash_results(one, flash_two, tol=1e-5)
    # One writer: every metrics row once (process 0 only), and the files only process 0 writes exist.
    assert _train_losses(one / "flash" / "metrics.jsonl").keys() == {4, 8, 12, 16}
    rows = [json.loads(x) for x in (flash_two / "flash" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "val/bpc" in r) for r in rows] == [(4, False), (8, False), (8, True), (12, False),
                                                          (16, False), (16, True)]
    np.testing.assert_allclose(list(_train_losses(flash_two / "flash" / "metrics.jsonl").values()),
                               list(_train_losses(one / "flash" / "metrics.jsonl").values()), rtol=1e-5)
    for name in ("comparison.md", "val_curves.png", "vocab.json", "config.json"):
        assert (flash_two / name).exists(), name


def _children(pid):
    """{GEN_JAX_PROCESS_ID: pid} of the processes launch_local started."""
    out = {}
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        for child in f.read().split():
            with open(f"/proc/{child}/environ", "rb") as env:
                for item in env.read().split(b"\0"):
                    if item.startswith(b"GEN_JAX_PROCESS_ID="):
                        out[int(item.split(b"=", 1)[1])] = int(child)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the launched processes in /proc")
def test_killing_one_process_stops_the_launch_and_a_rerun_resumes_to_the_same_result(tmp_path, flash_two):
    wd = tmp_path / "run"
    cmd = _command(2, 1, "experiments.flash", wd, FLASH)
    log = tmp_path / "killed_run.log"  # a file, not a pipe: nobody reads while we wait for the checkpoint
    with open(log, "w") as out:
        launch = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        first = wd / "flash" / "checkpoints" / "4"
        deadline = time.time() + 300
        while not first.exists() and launch.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert launch.poll() is None, "the run ended before its first checkpoint:\n" + log.read_text()[-3000:]
        assert first.exists(), "no checkpoint within 300 s"
        children = _children(launch.pid)
        assert sorted(children) == [0, 1]
        os.kill(children[1], signal.SIGKILL)
        killed = time.time()
        launch.wait(timeout=120)
        waited = time.time() - killed
    finally:
        if launch.poll() is None:  # a hang: leave no processes behind
            for pid in _children(launch.pid).values():
                os.kill(pid, signal.SIGKILL)
            launch.kill()
    err = log.read_text()
    assert launch.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert "launch_local: process 1 of 2" in err and "killed by signal SIGKILL" in err, err[-3000:]
    assert waited < 60, f"launch_local took {waited:.0f} s to stop after the kill"
    assert not (wd / "results.json").exists()

    proc = _launch(2, 1, "experiments.flash", wd, FLASH)
    out = proc.stdout + proc.stderr
    assert "resumed from" in out, out[-3000:]
    resumed_at = int(out.split("resumed from")[1].split("at step")[1].split()[0])
    assert 4 <= resumed_at <= 16
    _assert_same_flash_results(wd, flash_two, tol=1e-6)


def test_a_survivor_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    """A process blocked in a collective with a dead peer cannot act on SIGTERM: launch_local must not wait
    for it forever. Process 1 fails at once; process 0 ignores SIGTERM and sleeps."""
    (tmp_path / "stubborn.py").write_text(
        "import os, signal, sys, time\n"
        "if os.environ['GEN_JAX_PROCESS_ID'] == '1':\n"
        "    time.sleep(0.5)\n"
        "    sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "time.sleep(600)\n")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "experiments.launch_local", "-n", "2", "--grace", "1", "--",
                           "stubborn"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "process 1 of 2" in proc.stderr and "exited with status 3" in proc.stderr
    assert time.time() - start < 30


# ---------------------------------------------------------------------------------------------- DDPM

@pytest.mark.slow  # ~3-5 min on 2 CPU cores: the U-Net step compiles in ~30 s per process
def test_ddpm_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(1, 2, "experiments.ddpm", one, DDPM, timeout=900)
    proc = _launch(2, 1, "experiments.ddpm", two, DDPM, timeout=900)
    assert "in 2 process(es)" in proc.stdout
    _assert_same_checkpoint(_checkpoint(two / "checkpoints"), _checkpoint(one / "checkpoints"), tol=1e-5)
    assert any("ema_params" in k for k in _checkpoint(two / "checkpoints")[1])
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert a["steps"] == b["steps"] == 6
    for key in ("fid", "fid_floor", "bpd_total", "bpd_prior", "bpd_decoder", "bpd_kl", "bpd_examples"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), key
    np.testing.assert_allclose(list(_train_losses(two / "metrics.jsonl").values()),
                               list(_train_losses(one / "metrics.jsonl").values()), rtol=1e-5)
    assert sorted(_train_losses(two / "metrics.jsonl")) == [3, 6]
    from PIL import Image
    grids = sorted(os.listdir(one / "samples"))
    assert grids == sorted(os.listdir(two / "samples")) and "ddim10_step0000006.png" in grids
    for name in grids:  # the same samples, gathered from both processes' devices
        np.testing.assert_array_equal(np.asarray(Image.open(one / "samples" / name)),
                                      np.asarray(Image.open(two / "samples" / name)), err_msg=name)
