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


def is_remote(path: str) -> bool:
    return "://" in str(path)


@dataclasses.dataclass
class Run:
    """A run's places: `workdir` (local or gs://) and `local_dir`, where files are written first.

    For a local workdir both are the same. For a remote one (gs://...), metrics, pictures and results are
    written to a local staging folder and mirrored to the workdir by `sync()` (after every checkpoint and
    at the end); checkpoints go to `<workdir>/checkpoints` directly through Orbax.
    """
    workdir: str
    mesh: jax.sharding.Mesh
    config: Any
    started: float
    local_dir: str = ""
    _synced: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.local_dir = self.local_dir or self.workdir

    @property
    def is_main(self) -> bool:
        return is_main_process()

    @property
    def checkpoint_dir(self) -> str:
        return f"{self.workdir.rstrip('/')}/checkpoints"

    def train_kwargs(self) -> dict:
        """workdir/checkpoint_dir/after_checkpoint for `gen_jax.train.train`."""
        return dict(workdir=self.local_dir, checkpoint_dir=self.checkpoint_dir,
                    after_checkpoint=lambda step: self.sync())

    def sync(self) -> None:
        """Mirror new or changed local files to a remote workdir (process 0; a no-op for local runs)."""
        if not self.is_main or self.local_dir == self.workdir:
            return
        from etils import epath
        for root, _, files in os.walk(self.local_dir):
            for name in files:
                src = os.path.join(root, name)
                rel = os.path.relpath(src, self.local_dir)
                stamp = (os.path.getsize(src), os.path.getmtime(src))
                if self._synced.get(rel) == stamp:
                    continue
                dst = epath.Path(self.workdir) / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(open(src, "rb").read())
                self._synced[rel] = stamp

    def _pull(self) -> None:
        """Fetch the remote workdir's small files (metrics, pictures) so a resumed run appends to them."""
        from etils import epath
        remote = epath.Path(self.workdir)
        if not remote.exists():
            return
        def files(folder):
            for path in folder.iterdir():
                if path.is_dir():
                    if path.name != "checkpoints":  # Orbax reads those itself
                        yield from files(path)
                else:
                    yield path

        for path in files(remote):
            rel = str(path)[len(str(remote)):].lstrip("/")
            local = os.path.join(self.local_dir, rel)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as f:
                f.write(path.read_bytes())
            self._synced[rel] = (os.path.getsize(local), os.path.getmtime(local))

    def path(self, *parts: str) -> str:
        p = os.path.join(self.local_dir, *parts)
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
    workdir = getattr(args, "workdir", None) or os.path.join("runs", f"{name}_{preset}")
    local_dir = ""
    if is_remote(workdir):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in workdir.split("://", 1)[1])
        local_dir = os.path.join(os.path.expanduser("~"), ".cache", "gen_jax", "staging", safe)
    else:
        workdir = os.path.abspath(workdir)
    run = Run(workdir=workdir, mesh=make_mesh(), config=config, started=time.time(), local_dir=local_dir)
    if run.is_main:
        os.makedirs(run.local_dir, exist_ok=True)
        if is_remote(workdir):
            run._pull()
        devices = jax.devices()
        print(f"{name} [{preset}] -> {workdir}")
        print(f"  jax {jax.__version__} on {len(devices)} {devices[0].platform} device(s) "
              f"({devices[0].device_kind}) in {jax.process_count()} process(es); python "
              f"{platform.python_version()}")
        run.write_json("config.json", to_dict(config))
    return run


def summarize(run: Run, lines: Mapping[str, Any]) -> None:
    """Print the closing summary (process 0) and mirror the run's files to a remote workdir."""
    run.sync()
    if not run.is_main:
        return
    print("\n== summary ==")
    width = max(len(k) for k in lines)
    for key, value in lines.items():
        print(f"  {key:<{width}}  {value}")
    print(f"  {'wall time':<{width}}  {time.time() - run.started:.1f} s")
