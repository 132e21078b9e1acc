"""TPU pod scripts (experiments.tpu.pod): the exact gcloud commands their --dry-run prints, the errors for bad
arguments, and the remote shell scripts themselves, run here in bash with a fake worker home directory.

Nothing here reaches Google Cloud: every call is --dry-run, and the one non-dry-run call finds no gcloud.
"""
from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from experiments.tpu import pod
from gen_jax.errors import ConfigError

TPU = ["--name", "gen-jax-v4", "--zone", "us-central2-b"]
SSH_ALL = "gcloud compute tpus tpu-vm ssh gen-jax-v4 --zone=us-central2-b --worker=all --command "


@pytest.fixture(autouse=True)
def _no_tpu_env(monkeypatch):
    for var in ("GEN_JAX_TPU_NAME", "GEN_JAX_TPU_ZONE", "GEN_JAX_TPU_PROJECT"):
        monkeypatch.delenv(var, raising=False)


def dry_run(*argv: str) -> list[str]:
    """The printed command lines of `pod ARGV --dry-run` (comment lines dropped); fails if it errors."""
    out = io.StringIO()
    assert pod.main([argv[0], "--dry-run", *argv[1:]], out=out) == 0
    return [line for line in _logical_lines(out.getvalue()) if not line.startswith("#")]


def _logical_lines(text: str) -> list[str]:
    """Join physical lines that belong to one shell-quoted command (scripts span several lines)."""
    lines, buf = [], ""
    for physical in text.splitlines(keepends=True):
        if not buf and physical.startswith("#"):  # a step's note
            lines.append(physical.rstrip("\n"))
            continue
        buf += physical
        try:
            shlex.split(buf)
        except ValueError:  # an open quote: the command continues on the next line
            continue
        lines.append(buf.rstrip("\n"))
        buf = ""
    assert not buf, f"unterminated quote in dry-run output: {buf!r}"
    return lines


def pod_error(capsys, *argv: str) -> str:
    """Run `pod ARGV --dry-run`, assert it fails with status 2, and return its error message."""
    assert pod.main([argv[0], "--dry-run", *argv[1:]], out=io.StringIO()) == 2
    return capsys.readouterr().err


def remote_script(line: str) -> str:
    argv = shlex.split(line)
    return argv[argv.index("--command") + 1]


# --- create / delete / ssh -----------------------------------------------------------------------------------

def test_create_prints_the_gcloud_create_command_with_the_jax_runtime_for_the_generation():
    assert dry_run("create", *TPU, "--accelerator-type", "v4-32", "--spot") == [
        "gcloud compute tpus tpu-vm create gen-jax-v4 --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --spot"]
    # v5e is called v5litepod by gcloud; --project and --preemptible pass through
    assert dry_run("create", "--name", "pod5e", "--zone", "us-west4-a", "--project", "my-proj",
                   "--accelerator-type", "v5e-16", "--preemptible") == [
        "gcloud compute tpus tpu-vm create pod5e --zone=us-west4-a --project=my-proj "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --preemptible"]


def test_name_and_zone_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("GEN_JAX_TPU_NAME", "from-env")
    monkeypatch.setenv("GEN_JAX_TPU_ZONE", "europe-west4-a")
    assert dry_run("delete", "--yes") == [
        "gcloud compute tpus tpu-vm delete from-env --zone=europe-west4-a --quiet"]


def test_delete_asks_for_confirmation_unless_yes():
    assert dry_run("delete", *TPU) == ["gcloud compute tpus tpu-vm delete gen-jax-v4 --zone=us-central2-b"]


def test_ssh_to_one_worker_or_a_command_on_all():
    assert dry_run("ssh", *TPU) == ["gcloud compute tpus tpu-vm ssh gen-jax-v4 --zone=us-central2-b --worker=0"]
    assert dry_run("ssh", *TPU, "--worker", "all", "--command", "df -h") == [SSH_ALL + "'df -h'"]


def test_spot_and_preemptible_exclude_each_other():
    with pytest.raises(SystemExit):
        pod.main(["create", *TPU, "--accelerator-type", "v4-8", "--spot", "--preemptible", "--dry-run"])


@pytest.mark.parametrize("accel, hosts", [("v4-8", 1), ("v4-16", 2), ("v4-32", 4), ("v5p-128", 16), ("v3-32", 4),
                                          ("v5e-8", 1), ("v5litepod-16", 4), ("v6e-256", 64), ("v2-8", 1)])
def test_workers_per_slice_follow_cloud_tpu_slice_shapes(accel, hosts):
    # v2/v3/v4/v5p count TensorCores (8 per host); v5e/v6e count chips (<= 8 on one host, else 4 per host)
    assert pod.hosts_of(accel) == hosts


# --- install ------------------------------------------------------------------------------------------------

def test_install_copies_this_checkout_to_all_workers_and_pip_installs_the_tpu_extra():
    lines = dry_run("install", *TPU)
    tarball = os.path.join(tempfile.gettempdir(), "gen_jax-gen-jax-v4.tar.gz")
    assert lines[0].startswith("bash -c ") and "git ls-files" in lines[0] and tarball in lines[0]
    assert lines[1] == (f"gcloud compute tpus tpu-vm scp {tarball} gen-jax-v4:gen_jax-src.tar.gz "
                        "--zone=us-central2-b --worker=all")
    assert lines[2].startswith(SSH_ALL)
    script = remote_script(lines[2])
    assert 'tar -xzf "$HOME/gen_jax-src.tar.gz"' in script
    assert "uv pip install --python \"$HOME/gen_jax_venv/bin/python\" -e '.[tpu]'" in script
    assert lines[3].startswith(SSH_ALL) and "jax.distributed.initialize()" in remote_script(lines[3])
    assert len(lines) == 4
    assert len(dry_run("install", *TPU, "--no-check")) == 3


def test_install_from_git_clones_the_given_repository_on_every_worker():
    lines = dry_run("install", *TPU, "--source", "git", "--repo-url", "https://github.com/me/gen_jax.git",
                    "--ref", "v0.1", "--no-check")
    assert len(lines) == 1 and lines[0].startswith(SSH_ALL)
    script = remote_script(lines[0])
    assert 'git clone --quiet https://github.com/me/gen_jax.git "$HOME/gen_jax"' in script
    assert 'git -C "$HOME/gen_jax" checkout --quiet v0.1' in script
    assert "-e '.[tpu]'" in script


def test_install_from_git_without_a_url_says_how_to_fix_it(capsys, monkeypatch):
    monkeypatch.setattr(pod, "_git_origin_url", lambda: None)
    assert "--repo-url" in pod_error(capsys, "install", *TPU, "--source", "git")


def test_the_packing_step_packs_tracked_files_and_leaves_out_ignored_ones(tmp_path):
    if shutil.which("git") is None or not (pod.REPO_ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    args = pod.build_parser().parse_args(["install", *TPU])
    pack = pod.plan_install(args)[0]
    tarball = next(a for a in shlex.split(pack.argv[2]) if a.endswith(".tar.gz"))
    command = pack.argv[2].replace(shlex.quote(tarball), shlex.quote(str(tmp_path / "src.tar.gz")))
    subprocess.run(["bash", "-c", command], check=True, timeout=60)
    names = subprocess.run(["tar", "-tzf", str(tmp_path / "src.tar.gz")], check=True, capture_output=True,
                           text=True).stdout.split()
    assert "pyproject.toml" in names and "experiments/tpu/pod.py" in names
    assert not any(n.startswith(".venv/") or "__pycache__" in n for n in names)


# --- launch -------------------------------------------------------------------------------------------------

def test_launch_runs_the_launcher_on_all_workers_detached_with_distributed_auto_and_the_shared_workdir():
    lines = dry_run("launch", *TPU, "--workdir", "gs://my-bucket/ddpm", "--env", "TFDS_DATA_DIR=gs://my-bucket/tfds",
                    "experiments.ddpm", "--preset", "cifar10", "--set", "train.num_steps=100")
    assert len(lines) == 1 and lines[0].startswith(SSH_ALL)
    script = remote_script(lines[0])
    assert "export GEN_JAX_DISTRIBUTED=auto" in script
    assert "export TFDS_DATA_DIR=gs://my-bucket/tfds" in script
    assert ('setsid nohup python -m experiments.ddpm --preset cifar10 --set train.num_steps=100 '
            '--workdir gs://my-bucket/ddpm >> "$HOME/gen_jax_logs/ddpm.log" 2>&1 < /dev/null &') in script


def test_printed_commands_are_exactly_what_runs():
    args = pod.build_parser().parse_args(["launch", *TPU, "--workdir", "gs://my-bucket/r", "--dry-run", "ddpm",
                                          "--set", "model.channels='64 words'"])
    (step,) = pod.plan_launch(args)
    out = io.StringIO()
    pod.execute([step], dry_run=True, out=out)
    assert [tuple(shlex.split(line)) for line in dry_run_lines(out.getvalue())] == [step.argv]


def dry_run_lines(text: str) -> list[str]:
    return [line for line in _logical_lines(text) if not line.startswith("#")]


def test_launch_accepts_the_short_launcher_name_and_a_local_workdir_on_one_host():
    (line,) = dry_run("launch", *TPU, "--accelerator-type", "v4-8", "--workdir", "/home/me/runs/ddpm",
                      "--run-name", "trial1", "ddpm", "--", "--preset", "tiny")
    script = remote_script(line)
    assert "python -m experiments.ddpm --preset tiny --workdir /home/me/runs/ddpm" in script
    assert '"$HOME/gen_jax_logs/trial1.log"' in script


def test_logs_status_and_stop_address_every_worker_or_the_chosen_one():
    (logs,) = dry_run("logs", *TPU, "--worker", "0", "-n", "20", "--run-name", "ddpm")
    assert logs.startswith("gcloud compute tpus tpu-vm ssh gen-jax-v4 --zone=us-central2-b --worker=0 --command ")
    assert 'tail -n 20 "$LOG"' in remote_script(logs)
    describe, status = dry_run("status", *TPU)
    assert describe == ("gcloud compute tpus tpu-vm describe gen-jax-v4 --zone=us-central2-b "
                        "'--format=value(state,health,acceleratorType)'")
    assert status.startswith(SSH_ALL)
    (stop,) = dry_run("stop", *TPU)
    assert stop.startswith(SSH_ALL)


# --- errors -------------------------------------------------------------------------------------------------

def test_missing_zone_is_a_clear_error(capsys):
    err = pod_error(capsys, "create", "--name", "gen-jax-v4", "--accelerator-type", "v4-8")
    assert "missing zone" in err and "--zone" in err and "GEN_JAX_TPU_ZONE" in err


def test_missing_name_is_a_clear_error(capsys):
    assert "--name" in pod_error(capsys, "status", "--zone", "us-central2-b")


def test_unknown_launcher_module_lists_the_real_ones(capsys):
    err = pod_error(capsys, "launch", *TPU, "--workdir", "gs://my-bucket/r", "experiments.nope")
    assert "unknown launcher module 'experiments.nope'" in err and "experiments.ddpm" in err
    assert "unknown launcher" in pod_error(capsys, "launch", *TPU, "--workdir", "gs://my-bucket/r", "launch_local")


def test_local_workdir_on_a_multi_host_slice_is_refused(capsys):
    err = pod_error(capsys, "launch", *TPU, "--accelerator-type", "v4-32", "--workdir", "/tmp/run", "ddpm")
    assert "4-worker slice" in err and "gs://" in err
    # size unknown (a dry run does not ask gcloud): the strict rule applies
    assert "gs://" in pod_error(capsys, "launch", *TPU, "--workdir", "/tmp/run", "ddpm")
    assert "absolute path" in pod_error(capsys, "launch", *TPU, "--accelerator-type", "v4-8", "--workdir", "runs/x",
                                        "ddpm")
    assert "missing --workdir" in pod_error(capsys, "launch", *TPU, "ddpm")
    assert "not a valid bucket" in pod_error(capsys, "launch", *TPU, "--workdir", "gs://", "ddpm")


def test_flags_that_belong_to_the_pod_script_are_refused_after_the_launcher(capsys):
    assert "--workdir gs://BUCKET/PATH before" in pod_error(capsys, "launch", *TPU, "--workdir", "gs://my-bucket/r", "ddpm",
                                                             "--workdir", "gs://my-bucket/other")
    assert "put it before the module" in pod_error(capsys, "launch", *TPU, "--workdir", "gs://my-bucket/r", "ddpm",
                                                   "--dry-run")
    assert "GEN_JAX_DISTRIBUTED=auto" in pod_error(capsys, "launch", *TPU, "--workdir", "gs://my-bucket/r", "ddpm",
                                                   "--num-processes", "2")


@pytest.mark.parametrize("argv, needle", [
    (["create", *TPU, "--accelerator-type", "v9-32"], "unknown accelerator type 'v9-32'"),
    (["create", "--name", "Bad_Name", "--zone", "us-central2-b", "--accelerator-type", "v4-8"], "not valid"),
    (["create", "--name", "t", "--zone", "central", "--accelerator-type", "v4-8"], "zone 'central'"),
    (["launch", *TPU, "--workdir", "gs://my-bucket/r", "--env", "NOEQUALS", "ddpm"], "KEY=VALUE"),
    (["logs", *TPU, "--worker", "first"], "--worker 'first'"),
    (["ssh", *TPU, "--worker", "all"], "needs --command"),
])
def test_other_bad_arguments_name_the_problem(capsys, argv, needle):
    assert needle in pod_error(capsys, *argv)


def test_without_dry_run_a_missing_gcloud_is_reported_before_anything_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no gcloud
    assert pod.main(["delete", *TPU, "--yes"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "gcloud was not found" in err and "--dry-run" in err


def test_hosts_of_rejects_unknown_types():
    with pytest.raises(ConfigError, match="v4-32 or v5e-16"):
        pod.hosts_of("tpu-32")


# --- the remote scripts, run on a fake worker ----------------------------------------------------------------

@pytest.fixture
def fake_worker(tmp_path):
    """A home directory laid out like an installed worker, whose venv `python` records its env and args."""
    if shutil.which("bash") is None or shutil.which("setsid") is None:
        pytest.skip("needs bash and setsid")
    home = tmp_path / "home"
    (home / "gen_jax").mkdir(parents=True)
    py = home / "gen_jax_venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text('#!/bin/sh\necho "cwd=$(pwd) DIST=$GEN_JAX_DISTRIBUTED DATA=$TFDS_DATA_DIR args=$*"\n'
                  "exec sleep 60\n")
    py.chmod(0o755)
    started: list[int] = []
    yield home, started
    for pid in started:  # never leave a sleeper behind
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def _run_remote(home: Path, script: str) -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=90)


def _wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie left by the exited bash counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_launched_run_is_detached_logged_guarded_and_stoppable(fake_worker):
    home, started = fake_worker
    (launch,) = dry_run("launch", *TPU, "--workdir", "gs://my-bucket/ddpm", "--env", "TFDS_DATA_DIR=gs://my-bucket/tfds",
                        "ddpm", "--preset", "cifar10", "--set", 'eval.label="a $b"')
    done = _run_remote(home, remote_script(launch))
    assert done.returncode == 0, done.stderr
    pid = int((home / "gen_jax_logs" / "ddpm.pid").read_text())
    started.append(pid)
    assert _alive(pid)  # it outlived the shell that started it
    log = home / "gen_jax_logs" / "ddpm.log"
    assert _wait_for(lambda: "args=" in log.read_text())
    assert (f"cwd={home}/gen_jax DIST=auto DATA=gs://my-bucket/tfds args=-m experiments.ddpm --preset cifar10 "
            '--set eval.label="a $b" --workdir gs://my-bucket/ddpm') in log.read_text()  # quotes and $ arrive intact

    again = _run_remote(home, remote_script(launch))  # a second launch must not start a duplicate
    assert again.returncode == 1 and "already running" in again.stderr
    assert int((home / "gen_jax_logs" / "ddpm.pid").read_text()) == pid

    status = _run_remote(home, remote_script(dry_run("status", *TPU)[1]))  # default: the latest run
    assert f"ddpm running (pid {pid})" in status.stdout
    (logs,) = dry_run("logs", *TPU, "-n", "5")
    assert "] cwd=" in _run_remote(home, remote_script(logs)).stdout  # lines carry the worker's hostname

    stop = _run_remote(home, remote_script(dry_run("stop", *TPU, "--run-name", "ddpm")[0]))
    assert "stopped ddpm" in stop.stdout
    assert _wait_for(lambda: not _alive(pid))
    assert "not running" in _run_remote(home, remote_script(dry_run("status", *TPU)[1])).stdout


def test_restart_replaces_a_running_run(fake_worker):
    home, started = fake_worker
    (launch,) = dry_run("launch", *TPU, "--workdir", "gs://my-bucket/r", "--restart", "ddpm")
    assert _run_remote(home, remote_script(launch)).returncode == 0
    first = int((home / "gen_jax_logs" / "ddpm.pid").read_text())
    started.append(first)
    assert _run_remote(home, remote_script(launch)).returncode == 0
    second = int((home / "gen_jax_logs" / "ddpm.pid").read_text())
    started.append(second)
    assert second != first and _wait_for(lambda: not _alive(first)) and _alive(second)


def test_install_refuses_to_replace_the_code_under_a_live_run(fake_worker):
    home, started = fake_worker
    (launch,) = dry_run("launch", *TPU, "--workdir", "gs://my-bucket/r", "ddpm")
    assert _run_remote(home, remote_script(launch)).returncode == 0
    started.append(int((home / "gen_jax_logs" / "ddpm.pid").read_text()))
    install = dry_run("install", *TPU, "--no-check")[2]
    done = _run_remote(home, remote_script(install))
    assert done.returncode == 1 and "stop it first" in done.stderr
    assert (home / "gen_jax").is_dir()  # untouched


def test_launch_on_a_worker_without_the_install_says_so(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    (launch,) = dry_run("launch", *TPU, "--workdir", "gs://my-bucket/r", "ddpm")
    done = _run_remote(tmp_path, remote_script(launch))
    assert done.returncode == 1 and "run pod install first" in done.stderr
    assert not (tmp_path / "gen_jax_logs" / "ddpm.pid").exists()
