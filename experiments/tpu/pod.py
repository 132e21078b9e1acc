"""Create a Cloud TPU VM slice, install gen_jax on every worker, and run any paper's launcher on all of them.

    python -m experiments.tpu.pod create  --name my-tpu --zone us-central2-b --accelerator-type v4-32 [--spot]
    python -m experiments.tpu.pod install --name my-tpu --zone us-central2-b      # copies this checkout
    python -m experiments.tpu.pod launch  --name my-tpu --zone us-central2-b --workdir gs://BUCKET/ddpm \\
        experiments.ddpm --preset cifar10
    python -m experiments.tpu.pod status | logs | stop | ssh | delete  --name my-tpu --zone us-central2-b

Every subcommand takes --dry-run: it prints each command (gcloud, and the local packing step) instead of
running it. --name/--zone/--project fall back to GEN_JAX_TPU_NAME / GEN_JAX_TPU_ZONE / GEN_JAX_TPU_PROJECT.

On the workers: the code lives in ~/gen_jax, a Python 3.11 virtual environment (made with uv, since TPU VM
images ship Python 3.10) in ~/gen_jax_venv, and each run's log and pid in ~/gen_jax_logs/RUN.{log,pid}.
`launch` starts the launcher detached (setsid nohup) on every worker at once with GEN_JAX_DISTRIBUTED=auto,
so `gen_jax.train.mesh.init_distributed` calls `jax.distributed.initialize()`, which discovers the pod.
Re-running the same `launch` (same --workdir) after a preemption resumes from the last checkpoint there.
Walk-through: docs/tpu.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence, TextIO

from gen_jax.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
REMOTE_REPO = "$HOME/gen_jax"
REMOTE_VENV = "$HOME/gen_jax_venv"
REMOTE_LOGS = "$HOME/gen_jax_logs"
REMOTE_TARBALL = "gen_jax-src.tar.gz"  # relative to the worker's home directory (where scp puts it)
NOT_LAUNCHERS = {"launch_local"}  # modules in experiments/ that are tools, not paper launchers

# Generation -> (name gcloud expects, runtime image for JAX, how to count hosts). The number in
# "v4-32" counts TensorCores for v2/v3/v4/v5p (8 per host) and chips for v5e/v6e (up to 8 on a single-host
# slice, 4 per host on multi-host slices).
_GENERATIONS = {
    "v2": ("v2", "tpu-ubuntu2204-base", "cores"),
    "v3": ("v3", "tpu-ubuntu2204-base", "cores"),
    "v4": ("v4", "tpu-ubuntu2204-base", "cores"),
    "v5p": ("v5p", "v2-alpha-tpuv5", "cores"),
    "v5e": ("v5litepod", "v2-alpha-tpuv5-lite", "chips"),
    "v5litepod": ("v5litepod", "v2-alpha-tpuv5-lite", "chips"),
    "v6e": ("v6e", "v2-alpha-tpuv6e", "chips"),
}


# ---------------------------------------------------------------------------------------------------------
# Validation helpers (pure functions; the tests call them directly too)

def _parse_accelerator(accelerator_type: str) -> tuple[str, int]:
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", accelerator_type.strip().lower())
    if not m or m.group(1) not in _GENERATIONS or int(m.group(2)) < 1:
        raise ConfigError(f"unknown accelerator type {accelerator_type!r}; use GENERATION-SIZE with generation "
                          f"one of {', '.join(_GENERATIONS)}, e.g. v4-32 or v5e-16")
    return m.group(1), int(m.group(2))


def gcloud_accelerator_type(accelerator_type: str) -> str:
    """The name gcloud expects: "v5e-16" -> "v5litepod-16"; others unchanged (lower-cased)."""
    gen, size = _parse_accelerator(accelerator_type)
    return f"{_GENERATIONS[gen][0]}-{size}"


def default_runtime_version(accelerator_type: str) -> str:
    """The TPU software version Google recommends for JAX on this generation."""
    return _GENERATIONS[_parse_accelerator(accelerator_type)[0]][1]


def hosts_of(accelerator_type: str) -> int:
    """Number of TPU VM workers (= JAX processes) in a slice: v4-8 -> 1, v4-32 -> 4, v5e-8 -> 1, v5e-16 -> 4."""
    gen, size = _parse_accelerator(accelerator_type)
    if _GENERATIONS[gen][2] == "cores":
        return max(1, size // 8)
    return 1 if size <= 8 else size // 4


def resolve_launcher(module: str, repo_root: Path = REPO_ROOT) -> str:
    """"ddpm" or "experiments.ddpm" -> "experiments.ddpm", if experiments/ddpm.py exists in this checkout."""
    name = module[len("experiments."):] if module.startswith("experiments.") else module
    available = sorted(p.stem for p in (repo_root / "experiments").glob("*.py")
                       if not p.stem.startswith("_") and p.stem not in NOT_LAUNCHERS)
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name) or name not in available:
        raise ConfigError(f"unknown launcher module {module!r}; the launchers in this checkout are "
                          f"{', '.join('experiments.' + a for a in available) or '(none)'}")
    return f"experiments.{name}"


def check_workdir(workdir: str, hosts: int | None) -> str:
    """A multi-host run (or one whose size is unknown) needs a workdir every worker sees: a gs:// bucket path."""
    if workdir.startswith("gs://"):
        if not re.fullmatch(r"gs://[a-z0-9][a-z0-9._-]{1,221}[a-z0-9](/[^\s]*)?", workdir):
            raise ConfigError(f"--workdir {workdir!r} is not a valid bucket path; use gs://BUCKET/PATH")
        return workdir.rstrip("/")
    if hosts is None or hosts > 1:
        what = f"a {hosts}-worker slice" if hosts else "a slice whose size is not known (pass --accelerator-type)"
        raise ConfigError(f"--workdir {workdir!r} is not shared between workers: {what} needs a Cloud Storage "
                          f"path every worker can reach, e.g. --workdir gs://BUCKET/{Path(workdir).name or 'run'}")
    if not workdir.startswith("/"):
        raise ConfigError(f"--workdir {workdir!r} would be relative to an unknown directory on the worker; "
                          f"use an absolute path (e.g. /home/USER/runs/ddpm) or gs://BUCKET/PATH")
    return workdir


def _check_name(name: str | None) -> str:
    if not name:
        raise ConfigError("missing TPU name: pass --name my-tpu or set GEN_JAX_TPU_NAME")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise ConfigError(f"TPU name {name!r} is not valid: lower-case letters, digits and '-', starting with a "
                          "letter (e.g. --name gen-jax-v4)")
    return name


def _check_zone(zone: str | None) -> str:
    if not zone:
        raise ConfigError("missing zone: pass --zone (where the slice lives, e.g. --zone us-central2-b for v4, "
                          "us-west4-a for v5e) or set GEN_JAX_TPU_ZONE")
    if not re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", zone):
        raise ConfigError(f"zone {zone!r} does not look like a Compute Engine zone such as us-central2-b")
    return zone


def _check_worker(worker: str) -> str:
    if not re.fullmatch(r"all|\d+(,\d+)*", worker):
        raise ConfigError(f"--worker {worker!r}: use 'all', one index (0) or a list (0,2)")
    return worker


def _check_run_name(run: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", run):
        raise ConfigError(f"run name {run!r}: use letters, digits, '_', '.' and '-' only")
    return run


def _parse_env(assignments: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for a in assignments:
        key, sep, value = a.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {a!r}: use KEY=VALUE, e.g. --env TFDS_DATA_DIR=gs://BUCKET/tfds")
        pairs.append((key, value))
    return pairs


# ---------------------------------------------------------------------------------------------------------
# Commands

@dataclasses.dataclass(frozen=True)
class Step:
    """One command to run locally: argv, run without a shell (so the printed form is exactly what runs)."""
    note: str
    argv: tuple[str, ...]

    def line(self) -> str:
        return shlex.join(self.argv)


def _tpu_target(args) -> list[str]:
    return [args.name, f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _gcloud(verb: str, args, *extra: str) -> tuple[str, ...]:
    return ("gcloud", "compute", "tpus", "tpu-vm", verb, *_tpu_target(args), *extra)


def _ssh(args, worker: str, script: str) -> tuple[str, ...]:
    return _gcloud("ssh", args, f"--worker={worker}", "--command", script)


def _run_paths(run: str) -> tuple[str, str]:
    return f"{REMOTE_LOGS}/{run}.log", f"{REMOTE_LOGS}/{run}.pid"


def plan_create(args) -> list[Step]:
    accel = gcloud_accelerator_type(args.accelerator_type)
    version = args.version or default_runtime_version(args.accelerator_type)
    extra = [f"--accelerator-type={accel}", f"--version={version}"]
    extra += ["--spot"] if args.spot else ["--preemptible"] if args.preemptible else []
    hosts = hosts_of(args.accelerator_type)
    return [Step(f"create {accel} ({hosts} worker{'s' * (hosts > 1)}) with runtime {version}",
                 _gcloud("create", args, *extra))]


def _install_script(source: str, repo_url: str | None, ref: str | None, python: str, extras: str) -> str:
    lines = ["set -e",
             # Replacing the code under a live run would change it mid-run.
             f'for p in "{REMOTE_LOGS}"/*.pid; do [ -f "$p" ] && kill -0 "$(cat "$p")" 2>/dev/null && '
             f'{{ echo "$(hostname): run $(basename "$p" .pid) is running; stop it first (pod stop)" >&2; exit 1; }}; '
             'done',
             # uv fetches a Python >= 3.11 (TPU VM images have 3.10) and installs fast.
             'export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"',
             "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh",
             'export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"',
             f'rm -rf "{REMOTE_REPO}"']
    if source == "copy":
        lines += [f'mkdir -p "{REMOTE_REPO}"', f'tar -xzf "$HOME/{REMOTE_TARBALL}" -C "{REMOTE_REPO}"']
    else:
        lines += [f'git clone --quiet {shlex.quote(repo_url)} "{REMOTE_REPO}"']
        if ref:
            lines += [f'git -C "{REMOTE_REPO}" checkout --quiet {shlex.quote(ref)}']
    lines += [f'[ -x "{REMOTE_VENV}/bin/python" ] || uv venv --python {shlex.quote(python)} "{REMOTE_VENV}"',
              f'cd "{REMOTE_REPO}"',
              f'uv pip install --python "{REMOTE_VENV}/bin/python" -e {shlex.quote(f".[{extras}]")}',
              'echo "$(hostname): gen_jax installed in $HOME/gen_jax, Python in $HOME/gen_jax_venv"']
    return "\n".join(lines)


CHECK_CODE = ("import jax; jax.distributed.initialize(); "
              "print(\"process\", jax.process_index(), \"of\", jax.process_count(), \"sees\", jax.local_device_count(), "
              "\"local and\", jax.device_count(), \"global devices:\", jax.devices()[0].device_kind)")


def _git_origin_url() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "remote", "get-url", "origin"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def plan_install(args) -> list[Step]:
    steps = []
    repo_url = None
    if args.source == "copy":
        if not (REPO_ROOT / ".git").exists():
            raise ConfigError(f"--source copy packs the files git tracks, but {REPO_ROOT} is not a git checkout; "
                              "use --source git --repo-url URL")
        tarball = os.path.join(tempfile.gettempdir(), f"gen_jax-{args.name}.tar.gz")
        # Tracked and untracked-but-not-ignored files that exist (a deleted tracked file would stop tar).
        pack = (f"cd {shlex.quote(str(REPO_ROOT))} && git ls-files -z --cached --others --exclude-standard | "
                "while IFS= read -r -d \"\" f; do [ -f \"$f\" ] && printf \"%s\\0\" \"$f\"; done | "
                f"tar -czf {shlex.quote(tarball)} --null -T -")
        steps.append(Step("pack this checkout (git-tracked and untracked, not ignored)", ("bash", "-c", pack)))
        steps.append(Step("copy it to every worker",
                          ("gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:{REMOTE_TARBALL}",
                           f"--zone={args.zone}", *([f"--project={args.project}"] if args.project else []),
                           "--worker=all")))
    else:
        repo_url = args.repo_url or _git_origin_url()
        if not repo_url:
            raise ConfigError("--source git needs a repository the workers can clone: pass --repo-url URL "
                              "(this checkout has no 'origin' remote), or use --source copy")
    script = _install_script(args.source, repo_url, args.ref, args.python, args.extras)
    steps.append(Step(f"install gen_jax[{args.extras}] on every worker", _ssh(args, "all", script)))
    if not args.no_check:
        check = f'cd "$HOME" && "{REMOTE_VENV}/bin/python" -c {shlex.quote(CHECK_CODE)}'
        steps.append(Step("check that every worker's JAX sees the whole pod", _ssh(args, "all", check)))
    return steps


def _launch_script(module: str, launcher_args: Sequence[str], workdir: str, run: str,
                   env: Sequence[tuple[str, str]], restart: bool) -> str:
    log, pid = _run_paths(run)
    command = shlex.join(["python", "-m", module, *launcher_args, "--workdir", workdir])
    running = f'[ -f "{pid}" ] && kill -0 "$(cat "{pid}")" 2>/dev/null'
    if restart:
        guard = (f'if {running}; then kill "$(cat "{pid}")"; for i in $(seq 120); do {running} || break; sleep 0.5; '
                 f'done; {running} && kill -9 "$(cat "{pid}")"; fi')
    else:
        guard = (f'if {running}; then echo "$(hostname): run {run} is already running (pid $(cat "{pid}")); '
                 f'pass --restart to replace it or stop it first" >&2; exit 1; fi')
    exports = ["export GEN_JAX_DISTRIBUTED=auto"] + [f"export {k}={shlex.quote(v)}" for k, v in env]
    return "\n".join([
        "set -e",
        f'mkdir -p "{REMOTE_LOGS}"',
        f'[ -x "{REMOTE_VENV}/bin/python" ] || {{ echo "$(hostname): gen_jax is not installed here; run '
        f'pod install first" >&2; exit 1; }}',
        guard,
        f'cd "{REMOTE_REPO}"',
        *exports,
        f'echo "=== $(date -u +%FT%TZ) $(hostname): "{shlex.quote(command)} >> "{log}"',
        # setsid + nohup: the run outlives this ssh session; `python` is the venv's.
        f'PATH="{REMOTE_VENV}/bin:$PATH" setsid nohup {command} >> "{log}" 2>&1 < /dev/null &',
        f'echo $! > "{pid}"',
        f'echo "$(hostname): started {run} (pid $!); log {log}"',
    ])


def _describe_accelerator(args) -> str | None:
    argv = _gcloud("describe", args, "--format=value(acceleratorType)")
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"could not describe TPU {args.name!r} in {args.zone} (does it exist?): "
                          f"{out.stderr.strip()[-500:]}")
    value = out.stdout.strip().rsplit("/", 1)[-1]
    return value or None


def plan_launch(args) -> list[Step]:
    module = resolve_launcher(args.module)
    launcher_args = list(args.launcher_args)
    if launcher_args[:1] == ["--"]:
        launcher_args = launcher_args[1:]
    for a in launcher_args:
        if a == "--dry-run":
            raise ConfigError("--dry-run after the launcher module would go to the launcher: put it before the "
                              "module (launch --dry-run ... experiments.ddpm ...)")
        if a == "--workdir" or a.startswith("--workdir="):
            raise ConfigError("pass the workdir to the pod script (--workdir gs://BUCKET/PATH before the launcher "
                              "module), not to the launcher: every worker gets the same one")
        if a in ("--coordinator", "--num-processes", "--process-id") or a.startswith(
                ("--coordinator=", "--num-processes=", "--process-id=")):
            raise ConfigError(f"{a}: on a TPU pod jax.distributed.initialize() finds the coordinator and process "
                              "ids itself (GEN_JAX_DISTRIBUTED=auto); drop this flag")
    if not args.workdir:
        raise ConfigError("missing --workdir: the run's checkpoints and metrics go there and a re-launch resumes "
                          "from it; use --workdir gs://BUCKET/PATH")
    if args.accelerator_type:
        hosts = hosts_of(args.accelerator_type)
    else:  # ask gcloud; a type this script does not know counts as multi-host (the strict check)
        described = None if args.dry_run else _describe_accelerator(args)
        try:
            hosts = hosts_of(described) if described else None
        except ConfigError:
            hosts = None
    workdir = check_workdir(args.workdir, hosts)
    run = _check_run_name(args.run_name or module.split(".")[-1])
    env = _parse_env(args.env)
    script = _launch_script(module, launcher_args, workdir, run, env, args.restart)
    where = f"{hosts} worker{'s' * (hosts > 1)}" if hosts else "every worker"
    return [Step(f"start {module} on {where} (detached), workdir {workdir}", _ssh(args, "all", script))]


def _select_run(run_name: str | None) -> str:
    """Shell lines setting R (the run) and its log/pid paths; by default the worker's most recent launch."""
    if run_name:
        pick = f"R={shlex.quote(_check_run_name(run_name))}"
    else:
        pick = f'R=$(ls -t "{REMOTE_LOGS}"/*.pid 2>/dev/null | head -n 1 | xargs -r -n 1 basename | sed "s/[.]pid$//")'
    return (f'{pick}; if [ -z "$R" ]; then echo "$(hostname): no run launched here"; exit 0; fi; '
            f'LOG="{REMOTE_LOGS}/$R.log"; PID="{REMOTE_LOGS}/$R.pid"')


_ALIVE = '[ -f "$PID" ] && kill -0 "$(cat "$PID")" 2>/dev/null'


def plan_status(args) -> list[Step]:
    script = (f'{_select_run(args.run_name)}; if {_ALIVE}; then S="running (pid $(cat "$PID"))"; '
              'else S="not running"; fi; echo "$(hostname): $R $S | $(tail -n 1 "$LOG" 2>/dev/null)"')
    return [Step("state of the slice", _gcloud("describe", args, "--format=value(state,health,acceleratorType)")),
            Step(f"state of run {args.run_name or '(latest)'} on every worker", _ssh(args, "all", script))]


def plan_logs(args) -> list[Step]:
    if args.lines < 0:
        raise ConfigError(f"--lines {args.lines}: use a count >= 0")
    follow = " -F" if args.follow else ""
    script = f'{_select_run(args.run_name)}; tail -n {args.lines}{follow} "$LOG" | sed -u "s/^/[$(hostname)] /"'
    return [Step(f"last {args.lines} lines of run {args.run_name or '(latest)'} on worker(s) {args.worker}",
                 _ssh(args, _check_worker(args.worker), script))]


def plan_stop(args) -> list[Step]:
    script = (f'{_select_run(args.run_name)}; if {_ALIVE}; then kill "$(cat "$PID")"; '
              f'for i in $(seq 120); do {_ALIVE} || break; sleep 0.5; done; {_ALIVE} && kill -9 "$(cat "$PID")"; '
              'echo "$(hostname): stopped $R"; else echo "$(hostname): $R was not running"; fi')
    return [Step(f"stop run {args.run_name or '(latest)'} on every worker", _ssh(args, "all", script))]


def plan_ssh(args) -> list[Step]:
    worker = _check_worker(args.worker)
    if not args.command and not worker.isdigit():
        raise ConfigError(f"an interactive shell needs one worker (--worker 0); --worker {worker} needs --command")
    extra = [f"--worker={worker}"] + (["--command", args.command] if args.command else [])
    return [Step(f"ssh to worker(s) {worker}", _gcloud("ssh", args, *extra))]


def plan_delete(args) -> list[Step]:
    return [Step(f"delete TPU {args.name}", _gcloud("delete", args, *(["--quiet"] if args.yes else [])))]


PLANS = {"create": plan_create, "install": plan_install, "launch": plan_launch, "status": plan_status,
         "logs": plan_logs, "stop": plan_stop, "ssh": plan_ssh, "delete": plan_delete}


def execute(steps: Sequence[Step], *, dry_run: bool, out: TextIO = sys.stdout) -> int:
    """Run each step in order (stop at the first failure), or with dry_run print them, one per line."""
    if not dry_run and shutil.which("gcloud") is None:
        raise ConfigError("gcloud was not found on PATH: install the Google Cloud CLI "
                          "(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`, or use --dry-run")
    for step in steps:
        if dry_run:
            print(f"# {step.note}\n{step.line()}", file=out)
            continue
        print(f"# {step.note}", file=out, flush=True)
        code = subprocess.run(list(step.argv)).returncode
        if code != 0:
            print(f"pod: this step failed with status {code}: {step.line()}", file=sys.stderr)
            return code
    return 0


# ---------------------------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=os.environ.get("GEN_JAX_TPU_NAME"),
                        help="TPU VM name (default $GEN_JAX_TPU_NAME)")
    common.add_argument("--zone", default=os.environ.get("GEN_JAX_TPU_ZONE"),
                        help="zone, e.g. us-central2-b (default $GEN_JAX_TPU_ZONE)")
    common.add_argument("--project", default=os.environ.get("GEN_JAX_TPU_PROJECT"),
                        help="Google Cloud project (default $GEN_JAX_TPU_PROJECT, else gcloud's configured one)")
    common.add_argument("--dry-run", action="store_true", help="print every command instead of running it")

    parser = argparse.ArgumentParser(prog="python -m experiments.tpu.pod", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")

    p = sub.add_parser("create", parents=[common], help="create a TPU VM slice")
    p.add_argument("--accelerator-type", required=True, help="e.g. v4-8, v4-32, v5e-16 (= v5litepod-16), v6e-16")
    p.add_argument("--version", default=None, help="TPU software version (default: the one for JAX on this "
                                                   "generation, e.g. tpu-ubuntu2204-base for v4)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="a Spot slice: cheaper, can be preempted any time")
    kind.add_argument("--preemptible", action="store_true", help="a preemptible slice (older Spot variant)")

    p = sub.add_parser("install", parents=[common], help="install gen_jax on every worker")
    p.add_argument("--source", choices=["copy", "git"], default="copy",
                   help="copy: pack this checkout and scp it (default); git: clone --repo-url on each worker")
    p.add_argument("--repo-url", default=None, help="for --source git (default: this checkout's origin)")
    p.add_argument("--ref", default=None, help="for --source git: branch, tag or commit to check out")
    p.add_argument("--python", default="3.11", help="Python version for the workers' venv (default 3.11)")
    p.add_argument("--extras", default="tpu", help="pip extras to install (default tpu -> jax[tpu])")
    p.add_argument("--no-check", action="store_true", help="skip the jax.distributed device check")

    p = sub.add_parser("launch", parents=[common], help="start a launcher on every worker (detached)",
                       description="Start `python -m MODULE ARGS... --workdir WORKDIR` on every worker with "
                                   "GEN_JAX_DISTRIBUTED=auto. Re-running it resumes from the workdir.")
    p.add_argument("--workdir", default=None, help="shared run directory, gs://BUCKET/PATH (local paths only on "
                                                   "a single-host slice)")
    p.add_argument("--accelerator-type", default=None,
                   help="the slice's type, to check the workdir (default: asked from gcloud describe)")
    p.add_argument("--run-name", default=None, help="names the log/pid files (default: the launcher, e.g. ddpm)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the run; repeatable")
    p.add_argument("--restart", action="store_true", help="stop a run of the same name first, if one is running")
    p.add_argument("module", help="launcher module, e.g. experiments.ddpm (or just ddpm)")
    p.add_argument("launcher_args", nargs=argparse.REMAINDER, help="arguments for the launcher, e.g. "
                                                                    "--preset cifar10 --set train.num_steps=1000")

    for name, help_ in [("status", "slice state and whether the run is alive on each worker"),
                        ("logs", "tail each worker's log"), ("stop", "stop the run on every worker")]:
        p = sub.add_parser(name, parents=[common], help=help_)
        p.add_argument("--run-name", default=None,
                       help="the run (see launch --run-name; default: the worker's most recent launch)")
        if name == "logs":
            p.add_argument("--worker", default="all", help="all (default), an index, or a list like 0,2")
            p.add_argument("-n", "--lines", type=int, default=50)
            p.add_argument("-f", "--follow", action="store_true", help="keep following (Ctrl-C to stop)")

    p = sub.add_parser("ssh", parents=[common], help="ssh to a worker (or run --command on them)")
    p.add_argument("--worker", default="0", help="an index (default 0), a list like 0,2, or all")
    p.add_argument("--command", default=None, help="run this instead of an interactive shell")

    p = sub.add_parser("delete", parents=[common], help="delete the slice")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.name = _check_name(args.name)
        args.zone = _check_zone(args.zone)
        steps = PLANS[args.command_name](args)
        return execute(steps, dry_run=args.dry_run, out=out)
    except ConfigError as e:
        print(f"pod {args.command_name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
