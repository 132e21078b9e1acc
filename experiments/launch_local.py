"""Run any launcher as N processes under `jax.distributed` on this machine (CPU), like a small pod.

    python -m experiments.launch_local -n 2 --devices-per-process 4 -- experiments.ddpm --preset tiny

Each process gets GEN_JAX_COORDINATOR / GEN_JAX_NUM_PROCESSES / GEN_JAX_PROCESS_ID and its own fake CPU
devices. If one process fails or is killed, the others are stopped (SIGTERM, then SIGKILL after `--grace`
seconds: a survivor blocked in a collective with a dead peer cannot stop by itself), the failure is named on
stderr, and the exit status is non-zero (128 + signal number for a process killed by a signal). Re-running
the same command resumes from the last checkpoint in the shared workdir.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _stop(procs: dict[int, subprocess.Popen], grace: float) -> None:
    """SIGTERM every live process (a clean checkpoint-and-stop where possible), SIGKILL what is left."""
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(0.05)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    for p in procs.values():
        p.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds the other processes get to stop after one fails, before SIGKILL")
    parser.add_argument("module", help="launcher module, e.g. experiments.ddpm")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the launcher")
    ns = parser.parse_args(argv)
    port = ns.port or _free_port()
    args = [a for a in ns.args if a != "--"]
    procs: dict[int, subprocess.Popen] = {}

    def forward(signum, frame):  # stop the children too when this launcher is interrupted
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(ns.num_processes):
            env = dict(os.environ, GEN_JAX_COORDINATOR=f"localhost:{port}",
                       GEN_JAX_NUM_PROCESSES=str(ns.num_processes), GEN_JAX_PROCESS_ID=str(i),
                       JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={ns.devices_per_process}")
            procs[i] = subprocess.Popen([sys.executable, "-m", ns.module, *args], env=env)
        running = dict(procs)
        while running:
            for i, p in list(running.items()):
                code = p.poll()
                if code is None:
                    continue
                del running[i]
                if code != 0:
                    print(f"launch_local: process {i} of {ns.num_processes} (pid {p.pid}) {_describe(code)}; "
                          "stopping the others. Re-run the same command to resume from the last checkpoint.",
                          file=sys.stderr, flush=True)
                    _stop(running, ns.grace)
                    return 128 - code if code < 0 else code
            time.sleep(0.1)
        return 0
    except KeyboardInterrupt:
        print("launch_local: interrupted; stopping the processes", file=sys.stderr, flush=True)
        _stop(procs, ns.grace)
        return 130
    finally:
        if any(p.poll() is None for p in procs.values()):  # an unexpected error here: leave no orphans
            _stop(procs, ns.grace)
        for sig, handler in old.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
