"""What every launcher does before and after training: distributed init, workdir, run header, summary."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Any, Mapping

import jax

from gen_jax.config import to_dict
from gen_jax.train.mesh import init_distributed, is_main_process, make_mesh


@dataclasses.dataclass
class Run:
    workdir: str
    mesh: jax.sharding.Mesh
    config: Any
    started: float

    @property
    def is_main(self) -> bool:
        return is_main_process()

    def path(self, *parts: str) -> str:
        p = os.path.join(self.workdir, *parts)
        if self.is_main:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def write_json(self, name: str, payload: Mapping) -> str:
        path = self.path(name)
        if self.is_main:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(payload, f, indent=2, default=float)
            os.replace(tmp, path)
        return path


def start_run(config: Any, args: Any, *, name: str) -> Run:
    """Initialise jax.distributed when asked, pick the workdir, and print a header (process 0)."""
    init_distributed(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                     getattr(args, "process_id", None))
    preset = getattr(args, "preset", "run")
    workdir = os.path.abspath(getattr(args, "workdir", None) or os.path.join("runs", f"{name}_{preset}"))
    run = Run(workdir=workdir, mesh=make_mesh(), config=config, started=time.time())
    if run.is_main:
        os.makedirs(workdir, exist_ok=True)
        devices = jax.devices()
        print(f"{name} [{preset}] -> {workdir}")
        print(f"  jax {jax.__version__} on {len(devices)} {devices[0].platform} device(s) "
              f"({devices[0].device_kind}) in {jax.process_count()} process(es); python "
              f"{platform.python_version()}")
        run.write_json("config.json", to_dict(config))
    return run


def summarize(run: Run, lines: Mapping[str, Any]) -> None:
    """Print the closing summary (process 0)."""
    if not run.is_main:
        return
    print("\n== summary ==")
    width = max(len(k) for k in lines)
    for key, value in lines.items():
        print(f"  {key:<{width}}  {value}")
    print(f"  {'wall time':<{width}}  {time.time() - run.started:.1f} s")
