"""What every launcher does before and after training: distributed init, workdir, run header, summary."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from typing import Any, Mapping, Sequence

import jax

from gen_jax.config import to_dict
from gen_jax.data.assets import cache_dir
from gen_jax.train.compilation_cache import enable_compilation_cache
from gen_jax.train.mesh import init_distributed, is_main_process, make_mesh


def is_remote(path: str) -> bool:
    return "://" in str(path)


STAGING_ENV = "GEN_JAX_STAGING"


def staging_dir(workdir: str, process_index: int = 0) -> str:
    """The local folder a remote workdir is written to first: `$GEN_JAX_STAGING/<bucket_path>` (default
    `$GEN_JAX_CACHE/staging` or `~/.cache/gen_jax/staging`), one per process (`.process<k>` for k > 0), so
    that processes sharing a host do not write over each other."""
    root = os.environ.get(STAGING_ENV) or os.path.join(cache_dir(), "staging")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(workdir).split("://", 1)[-1]) or "_"
    return os.path.join(os.path.expanduser(root), safe + (f".process{process_index}" if process_index else ""))


def _download(remote: Any, local: str) -> None:
    """Copy one remote file (an `epath.Path`) to a local path atomically (concurrent copies are safe)."""
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    tmp = f"{local}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(remote.read_bytes())
    os.replace(tmp, local)


def local_copy(path: str, names: Sequence[str] | None = None) -> str:
    """A local path to read a (finished run's) file or folder from: a remote one (gs://...) is downloaded to a
    fresh folder next to the staging ones (a file keeps its name; of a folder, its files only, or those of
    `names` that are present); a local path is returned as is."""
    if not is_remote(path):
        return path
    from etils import epath
    path = path.rstrip("/")
    remote = epath.Path(path)
    if not remote.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    local = staging_dir(path, jax.process_index()) + ".copy"
    shutil.rmtree(local, ignore_errors=True)
    if not remote.is_dir():
        _download(remote, os.path.join(local, remote.name))
        return os.path.join(local, remote.name)
    os.makedirs(local, exist_ok=True)
    for name in names if names is not None else [p.name for p in remote.iterdir()]:
        if (remote / name).exists() and not (remote / name).is_dir():
            _download(remote / name, os.path.join(local, name))
    return local


@dataclasses.dataclass
class Run:
    """A run's places: `workdir` (local or gs://) and `local_dir`, where files are written first.

    For a local workdir both are the same. For a remote one (gs://...), metrics, pictures and results are
    written to a local staging folder and mirrored to the workdir by `sync()` (after every checkpoint and
    at the end); checkpoints go to `<workdir>/checkpoints` directly through Orbax. Write every file through
    `path()` / `write_json()` and train with `train(**run.train_kwargs(), ...)`, never under `workdir`
    itself (a gs:// string is not a local folder). `sub(name)` is the same for one model of a launcher
    that trains several (`<workdir>/<name>/`), sharing this run's staging folder and `sync()`.
    """
    workdir: str
    mesh: jax.sharding.Mesh
    config: Any
    started: float
    local_dir: str = ""
    _synced: dict = dataclasses.field(default_factory=dict, repr=False)
    _root: Run | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        self.local_dir = self.local_dir or self.workdir

    @property
    def staged(self) -> bool:
        """Whether files are written to a staging folder and mirrored (a remote workdir)."""
        return self.local_dir != self.workdir

    def sub(self, name: str, config: Any = None) -> Run:
        """The run of one model in `<workdir>/<name>/` (its own checkpoints, metrics, pictures); files go to
        `<local_dir>/<name>/` and are mirrored by this run's `sync()`."""
        workdir = f"{self.workdir.rstrip('/')}/{name}" if is_remote(self.workdir) else os.path.join(
            self.workdir, name)
        return Run(workdir=workdir, mesh=self.mesh, config=self.config if config is None else config,
                   started=self.started, local_dir=os.path.join(self.local_dir, name),
                   _root=self._root or self)

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
        if self._root is not None:  # a sub-run: its files are inside the root's staging folder
            self._root.sync()
            return
        if not self.is_main or not self.staged:
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
        """Fetch the remote workdir's files (metrics, pictures, results; not checkpoints/) into the staging
        folder so a resumed run appends to them and sees what earlier launches finished. Every process pulls
        into its own staging folder: launchers decide what to skip from these files, and all processes must
        decide alike."""
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
            _download(path, local)
            self._synced[rel] = (os.path.getsize(local), os.path.getmtime(local))

    def fetch(self, *parts: str) -> str:
        """Local path of a workdir file that another process may have written during this launch: on a
        process whose staging folder lacks it, it is downloaded from the remote workdir (after process 0's
        `sync()` and a barrier). For a local workdir, just the path."""
        local = os.path.join(self.local_dir, *parts)
        if self.staged and not os.path.exists(local):
            from etils import epath
            remote = epath.Path(self.workdir).joinpath(*parts)
            if remote.exists():
                _download(remote, local)
        return local

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
    """Turn on the persistent compilation cache, initialise jax.distributed when asked, pick the workdir, and
    print a header (process 0)."""
    xla_cache = enable_compilation_cache()
    init_distributed(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                     getattr(args, "process_id", None))
    preset = getattr(args, "preset", "run")
    workdir = getattr(args, "workdir", None) or os.path.join("runs", f"{name}_{preset}")
    local_dir = ""
    if is_remote(workdir):
        workdir = workdir.rstrip("/")
        local_dir = staging_dir(workdir, jax.process_index())
    else:
        workdir = os.path.abspath(workdir)
    run = Run(workdir=workdir, mesh=make_mesh(), config=config, started=time.time(), local_dir=local_dir)
    if run.staged:  # the remote workdir is the truth: drop what an earlier launch left here, fetch its files
        shutil.rmtree(run.local_dir, ignore_errors=True)
        os.makedirs(run.local_dir, exist_ok=True)
        run._pull()
    if run.is_main:
        os.makedirs(run.local_dir, exist_ok=True)
        devices = jax.devices()
        print(f"{name} [{preset}] -> {workdir}")
        print(f"  jax {jax.__version__} on {len(devices)} {devices[0].platform} device(s) "
              f"({devices[0].device_kind}) in {jax.process_count()} process(es); python "
              f"{platform.python_version()}")
        print(f"  XLA compilation cache: {xla_cache or 'off'}")
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
