"""Run any launcher as N processes under `jax.distributed` on this machine (CPU), like a small pod.

    python -m experiments.launch_local -n 2 --devices-per-process 4 -- experiments.ddpm --preset tiny

Each process gets GEN_JAX_COORDINATOR / GEN_JAX_NUM_PROCESSES / GEN_JAX_PROCESS_ID and its own fake CPU
devices. If one process dies, the others are stopped and the exit status is non-zero; re-running the same
command resumes from the last checkpoint in the shared workdir.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("module", help="launcher module, e.g. experiments.ddpm")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the launcher")
    ns = parser.parse_args(argv)
    port = ns.port or _free_port()
    procs = []
    for i in range(ns.num_processes):
        env = dict(os.environ, GEN_JAX_COORDINATOR=f"localhost:{port}",
                   GEN_JAX_NUM_PROCESSES=str(ns.num_processes), GEN_JAX_PROCESS_ID=str(i),
                   JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={ns.devices_per_process}")
        args = [a for a in ns.args if a != "--"]
        procs.append(subprocess.Popen([sys.executable, "-m", ns.module, *args], env=env))
    status = 0
    while procs:
        for p in list(procs):
            code = p.poll()
            if code is None:
                continue
            procs.remove(p)
            if code != 0 and status == 0:
                status = code
                print(f"launch_local: a process exited with status {code}; stopping the others",
                      file=sys.stderr)
                for q in procs:
                    q.terminate()
        time.sleep(0.2)
    return status


if __name__ == "__main__":
    sys.exit(main())
