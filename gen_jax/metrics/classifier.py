"""A small LeNet-style MNIST classifier whose penultimate features stand in for Inception features.

No Inception FID exists for MNIST; FID, precision and recall on the features of a small classifier trained
on MNIST are the usual stand-in (report FID(test vs train) next to any model's number as the floor).

The classifier is trained once, deterministically: a fixed seed for the initialization, a fixed number of
epochs over the MNIST training split in the order of a permutation seeded by (seed, epoch), Adam with a
cosine-decayed learning rate, one compiled step per batch. The weights of the default recipe ship with the
package (`gen_jax/metrics/assets/`, SHA-256 checked on load), because training is reproducible only on one
backend with one set of settings: on the same CPU, a process with 8 fake devices rounds a few operations
differently than one with one device, and over ~1,200 steps that grows into different weights (test
accuracy 98.7% vs 99.0%); a GPU differs again. FID numbers are only comparable on one and the same
classifier.
`python -m gen_jax.metrics.classifier` retrains them on one device and rewrites the file. Other recipes
are trained on first use and cached at `$GEN_JAX_CACHE/mnist_classifier_v1_<hash>.npz`, the hash taken
over the recipe (`ClassifierConfig`), so a changed recipe trains a new classifier instead of silently
reusing an old one.

Architecture: conv 5x5 stride 2 -> ReLU -> conv 5x5 stride 2 -> ReLU -> dense (feature_dim) -> ReLU ->
dense 10: LeNet with strided convolutions in place of conv + max-pool, ~5x cheaper on a CPU. Three epochs
take 1-2 minutes on 2 CPU cores and reach ~99.0% test accuracy. The features are the feature_dim
pre-activations of the penultimate dense layer: dense and roughly Gaussian (no ReLU zeros), which suits
FID's Gaussian summary.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gen_jax.errors import DataError, ShapeError

log = logging.getLogger(__name__)

CACHE_PREFIX = "mnist_classifier_v1"
NUM_CLASSES = 10
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# recipe digest -> SHA-256 of the shipped weights file `{CACHE_PREFIX}_{digest}.npz` in ASSETS_DIR
SHIPPED_SHA256: dict[str, str] = {
    "4ce5d6004e40": "0060aeaa3abd04b8a98e194f2e1d96adff673e477dabb543f45a86cad5c3c708",  # test accuracy 0.9896
}


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The training recipe; every field enters the cache hash."""
    conv_features: tuple[int, int] = (16, 32)
    kernel_size: int = 5
    feature_dim: int = 128
    batch_size: int = 128
    num_epochs: int = 3
    learning_rate: float = 2e-3
    seed: int = 0
    image_shape: tuple[int, int, int] = (28, 28, 1)

    def digest(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class MnistClassifier(nnx.Module):
    """conv/2-conv/2-dense(features)-dense(10) on uint8-derived inputs in [-1, 1]."""

    def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
        c1, c2 = config.conv_features
        h, w, c = config.image_shape
        ks = (config.kernel_size, config.kernel_size)
        self.conv1 = nnx.Conv(c, c1, ks, strides=2, padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, ks, strides=2, padding="SAME", rngs=rngs)
        self.fc = nnx.Linear(-(-h // 4) * -(-w // 4) * c2, config.feature_dim, rngs=rngs)
        self.head = nnx.Linear(config.feature_dim, NUM_CLASSES, rngs=rngs)

    def features(self, x_BxHxWxC: jax.Array) -> jax.Array:
        h = nnx.relu(self.conv1(x_BxHxWxC))
        h = nnx.relu(self.conv2(h))
        return self.fc(h.reshape(h.shape[0], -1))

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        return self.head(nnx.relu(self.features(x_BxHxWxC)))


def _to_float(images_uint8: jax.Array) -> jax.Array:
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def _check_images(images: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == len(image_shape) and images.shape[-1] != image_shape[-1]:
        images = images[..., None]  # N x H x W grayscale
    if images.dtype != np.uint8:
        raise ShapeError(f"images have dtype {images.dtype}; the classifier takes uint8 0..255 images. Convert "
                         "model outputs in [-1, 1] with gen_jax.images.to_uint8(images) first")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise ShapeError(f"images have shape {images.shape}; expected N x {' x '.join(map(str, image_shape))}")
    return images


def init_classifier(config: ClassifierConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(MnistClassifier(config, rngs=nnx.Rngs(config.seed)))


def train_classifier(images_uint8: np.ndarray, labels: np.ndarray, config: ClassifierConfig = ClassifierConfig()
                     ) -> tuple[nnx.GraphDef, nnx.State, dict[str, Any]]:
    """Train from scratch, deterministically; returns (graphdef, params, info with the final train loss)."""
    images = _check_images(images_uint8, config.image_shape)
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    n = images.shape[0]
    if labels.shape[0] != n:
        raise ShapeError(f"{n} images but {labels.shape[0]} labels")
    steps = n // config.batch_size
    if steps < 1:
        raise ShapeError(f"{n} training images is fewer than one batch of {config.batch_size}")
    graphdef, params = init_classifier(config)
    optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, steps * config.num_epochs))
    opt_state = optimizer.init(params)

    def loss_fn(params, x_u8, y):
        logits = nnx.merge(graphdef, params)(_to_float(x_u8))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # One compiled step driven from Python: XLA:CPU runs convolutions inside a while loop (lax.scan) ~8x
    # slower than at top level, and this must train in about a minute on a laptop CPU.
    @jax.jit
    def train_step(params, opt_state, images, labels, idx_B):
        loss, grads = jax.value_and_grad(loss_fn)(params, images[idx_B], labels[idx_B])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    images_dev, labels_dev = jnp.asarray(images), jnp.asarray(labels)
    key = jax.random.key(config.seed)
    losses = []
    for epoch in range(config.num_epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
        order_SxB = order[:steps * config.batch_size].reshape(steps, config.batch_size)
        epoch_losses = []
        for idx_B in order_SxB:
            params, opt_state, loss = train_step(params, opt_state, images_dev, labels_dev, idx_B)
            epoch_losses.append(loss)
        losses.append(np.asarray(jnp.stack(epoch_losses)))
        log.info("mnist classifier epoch %d: mean loss %.4f", epoch, float(losses[-1].mean()))
    losses = np.concatenate(losses)
    return graphdef, params, {"train_steps": int(losses.size), "final_train_loss": float(losses[-steps:].mean())}


def _batched(graphdef: nnx.GraphDef, params: nnx.State, fn_name: str, batch_size: int,
             image_shape: tuple[int, int, int]) -> Callable[[np.ndarray], np.ndarray]:
    """A host function over any N that runs one compiled fixed-size batch function (last batch padded)."""

    @jax.jit
    def apply(params, x_u8):
        model = nnx.merge(graphdef, params)
        return getattr(model, fn_name)(_to_float(x_u8))

    def run(images_uint8: np.ndarray) -> np.ndarray:
        images = _check_images(images_uint8, image_shape)
        n = images.shape[0]
        if n == 0:
            raise ShapeError("got 0 images; pass a non-empty batch N x 28 x 28 x 1")
        bs = min(batch_size, n)
        out = []
        for start in range(0, n, bs):
            chunk = images[start:start + bs]
            if chunk.shape[0] < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - chunk.shape[0],) + chunk.shape[1:], np.uint8)])
            out.append(np.asarray(apply(params, chunk))[:min(bs, n - start)])
        return np.concatenate(out).astype(np.float32)

    return run


def make_features_fn(graphdef: nnx.GraphDef, params: nnx.State, config: ClassifierConfig = ClassifierConfig(),
                     *, batch_size: int = 500) -> Callable[[np.ndarray], np.ndarray]:
    """uint8[N, 28, 28, 1] -> float32[N, feature_dim], in jitted batches of `batch_size`."""
    return _batched(graphdef, params, "features", batch_size, config.image_shape)


def make_logits_fn(graphdef: nnx.GraphDef, params: nnx.State, config: ClassifierConfig = ClassifierConfig(),
                   *, batch_size: int = 500) -> Callable[[np.ndarray], np.ndarray]:
    """uint8[N, 28, 28, 1] -> float32[N, 10] class logits, in jitted batches."""
    return _batched(graphdef, params, "__call__", batch_size, config.image_shape)


def accuracy(graphdef: nnx.GraphDef, params: nnx.State, images_uint8: np.ndarray, labels: np.ndarray,
             config: ClassifierConfig = ClassifierConfig()) -> float:
    logits = make_logits_fn(graphdef, params, config)(images_uint8)
    return float(np.mean(logits.argmax(-1) == np.asarray(labels).reshape(-1)))


# ---------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> str:
    from gen_jax.data.assets import cache_dir  # `$GEN_JAX_CACHE`, default ~/.cache/gen_jax
    return str(cache_dir())


def cache_path(cache_dir: str | None = None, config: ClassifierConfig = ClassifierConfig()) -> str:
    return os.path.join(cache_dir or default_cache_dir(), f"{CACHE_PREFIX}_{config.digest()}.npz")


def _param_key(path: tuple) -> str:
    """'conv1/kernel' for a leaf path, independent of how this Flax version flattens a Variable."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def _flat_params(params: nnx.State) -> dict[str, np.ndarray]:
    return {_param_key(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def save_classifier(path: str, params: nnx.State, config: ClassifierConfig, info: dict[str, Any]) -> None:
    """Write parameters and metadata to `path` atomically (temp file in the same directory + os.replace)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    meta = {"config": dataclasses.asdict(config), "digest": config.digest(), **info}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=np.asarray(json.dumps(meta)), **_flat_params(params))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is shared by users of the machine
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_classifier(path: str, config: ClassifierConfig = ClassifierConfig()
                    ) -> tuple[nnx.GraphDef, nnx.State, dict[str, Any]]:
    """Read a cached classifier; raises DataError if it is unreadable or was trained with another recipe."""
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # truncated or not an npz
        raise DataError(f"cached MNIST classifier {path} is unreadable ({e}); delete it to retrain") from e
    if "__meta__" not in arrays:
        raise DataError(f"{path} has no metadata, so it is not a gen_jax classifier cache; delete it to retrain")
    meta = json.loads(str(arrays.pop("__meta__")))
    if meta.get("digest") != config.digest():
        raise DataError(f"cached MNIST classifier {path} was trained with recipe {meta.get('digest')}, not "
                        f"{config.digest()}; delete it to retrain")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MnistClassifier(config, rngs=nnx.Rngs(0))))

    def fill(path_, leaf):
        key = _param_key(path_)
        if key not in arrays or arrays[key].shape != leaf.shape:
            raise DataError(f"cached MNIST classifier {path} lacks parameter {key} of shape {leaf.shape}; "
                            "delete it to retrain")
        return jnp.asarray(arrays[key], leaf.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(fill, abstract), meta


def shipped_path(config: ClassifierConfig = ClassifierConfig()) -> str | None:
    """The packaged weights file of this recipe, or None when none ships for it."""
    if config.digest() not in SHIPPED_SHA256:
        return None
    return os.path.join(ASSETS_DIR, f"{CACHE_PREFIX}_{config.digest()}.npz")


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_shipped_classifier(config: ClassifierConfig = ClassifierConfig()
                            ) -> tuple[nnx.GraphDef, nnx.State, dict[str, Any]] | None:
    """The packaged classifier of this recipe (None if none ships); DataError if the file is missing or altered."""
    path = shipped_path(config)
    if path is None:
        return None
    if not os.path.exists(path):
        raise DataError(f"the packaged MNIST classifier {path} is missing (an install without package data?); "
                        "reinstall gen_jax, e.g. `pip install --force-reinstall -e .` from the repository")
    digest = _file_sha256(path)
    if digest != SHIPPED_SHA256[config.digest()]:
        raise DataError(f"the packaged MNIST classifier {path} has SHA-256 {digest}, not the released "
                        f"{SHIPPED_SHA256[config.digest()]}: the file was changed or truncated. Restore it "
                        "(`git checkout -- gen_jax/metrics/assets`) or reinstall gen_jax")
    return load_classifier(path, config)


def _load_mnist(split: str):
    from gen_jax.data import load_images
    return load_images("mnist", split)


_EXTRACTORS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]] = {}


def get_mnist_feature_extractor(cache_dir: str | None = None, *, config: ClassifierConfig = ClassifierConfig(),
                                load_fn: Callable[[str], Any] | None = None, batch_size: int = 500,
                                use_shipped: bool = True
                                ) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """(features_fn: uint8[N,28,28,1] -> float32[N, feature_dim], info) for FID/precision/recall on MNIST.

    Uses the packaged weights when they ship for `config` (the default recipe; `use_shipped=False` skips
    them); otherwise loads the classifier from the cache, or trains it once on `load_fn("train")` (default:
    the project's MNIST via `gen_jax.data.load_images("mnist", split)`), measures accuracy on
    `load_fn("test")`, and caches it. `info` holds `test_accuracy`, `config`, `source` ("shipped", "cache"
    or "trained"), `cache_path` (the file read or written) and `trained` (True if trained now). The result
    is memoized per cache directory and recipe within the process.
    """
    path = cache_path(cache_dir, config)
    if path in _EXTRACTORS:
        return _EXTRACTORS[path]
    load_fn = load_fn or _load_mnist
    graphdef = params = None
    shipped = load_shipped_classifier(config) if use_shipped else None
    if shipped is not None:
        graphdef, params, meta = shipped
        info = {**meta, "cache_path": shipped_path(config), "source": "shipped", "trained": False}
    elif os.path.exists(path):
        try:
            graphdef, params, meta = load_classifier(path, config)
            info = {**meta, "cache_path": path, "source": "cache", "trained": False}
        except DataError as e:
            log.warning("%s; retraining", e)
    if params is None:
        log.info("training the MNIST feature classifier once (cached at %s)", path)
        start = time.perf_counter()
        train = load_fn("train")
        graphdef, params, train_info = train_classifier(train.images, train.labels, config)
        test = load_fn("test")
        meta = {**train_info, "train_seconds": time.perf_counter() - start,
                "test_accuracy": accuracy(graphdef, params, test.images, test.labels, config)}
        save_classifier(path, params, config, meta)
        info = {**meta, "config": dataclasses.asdict(config), "digest": config.digest(), "cache_path": path,
                "source": "trained", "trained": True}
        log.info("MNIST classifier: test accuracy %.4f after %.0f s", meta["test_accuracy"], meta["train_seconds"])
    result = (make_features_fn(graphdef, params, config, batch_size=batch_size), info)
    _EXTRACTORS[path] = result
    return result


def write_shipped_classifier(config: ClassifierConfig = ClassifierConfig(), *, load_fn=None,
                             assets_dir: str = ASSETS_DIR) -> tuple[str, str, dict[str, Any]]:
    """Train `config` from scratch on one device and write it to `assets_dir`; returns (path, sha256, meta)."""
    if jax.device_count() != 1:
        raise RuntimeError(f"this process sees {jax.device_count()} devices; the shipped classifier is trained "
                           "with one (run `python -m gen_jax.metrics.classifier` without "
                           "--xla_force_host_platform_device_count in XLA_FLAGS)")
    load_fn = load_fn or _load_mnist
    start = time.perf_counter()
    train = load_fn("train")
    graphdef, params, train_info = train_classifier(train.images, train.labels, config)
    test = load_fn("test")
    meta = {**train_info, "train_seconds": time.perf_counter() - start,
            "test_accuracy": accuracy(graphdef, params, test.images, test.labels, config),
            "trained_with": f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
                            "one device"}
    path = os.path.join(assets_dir, f"{CACHE_PREFIX}_{config.digest()}.npz")
    save_classifier(path, params, config, meta)
    return path, _file_sha256(path), meta


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    out_path, sha, out_meta = write_shipped_classifier()
    print(f"wrote {out_path}\n  test accuracy {out_meta['test_accuracy']:.4f}, {out_meta['trained_with']}\n"
          f"  put this in SHIPPED_SHA256: {ClassifierConfig().digest()!r}: {sha!r}")
