"""The MNIST feature classifier: deterministic training, atomic cache keyed by the recipe, batched features,
and the FID / precision-recall wrappers built on it. Training is checked on a small synthetic 10-class set
(one training for the whole module, one more for determinism). The default recipe's weights ship with the
package: checked against their checksum and on real MNIST; retraining that recipe from scratch is a slow test."""
import os
import shutil

import jax
import numpy as np
import pytest

from gen_jax.errors import DataError, ShapeError
from gen_jax.metrics import classifier as clf
from gen_jax.metrics.fid import fid_from_features, mnist_fid
from gen_jax.metrics.precision_recall import mnist_precision_recall

TINY = clf.ClassifierConfig(conv_features=(4, 8), feature_dim=16, batch_size=32, num_epochs=3,
                            learning_rate=5e-3, seed=1)


class _Split:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels


def _synthetic(split: str, per_class: int = 32) -> _Split:
    """Ten fixed random templates plus per-image noise; train and test draw different noise."""
    templates = np.random.default_rng(123).uniform(0, 255, (10, 28, 28, 1))
    rng = np.random.default_rng({"train": 0, "test": 1}[split])
    labels = np.repeat(np.arange(10), per_class)
    images = templates[labels] + rng.normal(0, 40, (labels.size, 28, 28, 1))
    return _Split(np.clip(images, 0, 255).astype(np.uint8), labels)


def _no_data(split):
    raise AssertionError(f"should have loaded from the cache, not asked for the {split!r} split")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train TINY once through the public entry point into a fresh cache directory."""
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    clf._EXTRACTORS.clear()
    features_fn, info = clf.get_mnist_feature_extractor(cache_dir, config=TINY, load_fn=_synthetic)
    yield cache_dir, features_fn, info
    clf._EXTRACTORS.clear()


def test_trains_once_to_an_accurate_classifier_and_caches_atomically(trained):
    cache_dir, features_fn, info = trained
    assert info["trained"] and info["test_accuracy"] > 0.9
    assert info["cache_path"] == os.path.join(cache_dir, f"mnist_classifier_v1_{TINY.digest()}.npz")
    assert os.listdir(cache_dir) == [os.path.basename(info["cache_path"])]  # no temp file left behind
    feats = features_fn(_synthetic("test").images)
    assert feats.shape == (320, 16) and feats.dtype == np.float32 and np.all(np.isfinite(feats))


def test_a_new_process_loads_the_cache_without_data_and_gets_identical_features(trained):
    cache_dir, features_fn, info = trained
    images = _synthetic("test").images
    clf._EXTRACTORS.pop(info["cache_path"])  # as in a new process: must come from the file
    try:
        features_fn2, info2 = clf.get_mnist_feature_extractor(cache_dir, config=TINY, load_fn=_no_data)
        assert not info2["trained"] and info2["test_accuracy"] == info["test_accuracy"]
        np.testing.assert_array_equal(features_fn2(images), features_fn(images))
    finally:
        clf._EXTRACTORS[info["cache_path"]] = (features_fn, info)


def test_training_is_deterministic_and_a_corrupt_cache_is_retrained(trained, tmp_path):
    _, _, info = trained
    path = clf.cache_path(str(tmp_path), TINY)
    with open(path, "wb") as f:
        f.write(b"truncated")  # as if a non-atomic writer had been killed
    _, info2 = clf.get_mnist_feature_extractor(str(tmp_path), config=TINY, load_fn=_synthetic)
    assert info2["trained"]
    _, params_first, _ = clf.load_classifier(info["cache_path"], TINY)
    _, params_again, _ = clf.load_classifier(path, TINY)
    for a, b in zip(jax.tree.leaves(params_first), jax.tree.leaves(params_again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_changed_recipe_has_another_cache_file_and_refuses_the_old_one(trained, tmp_path):
    _, _, info = trained
    other = TINY.__class__(**{**TINY.__dict__, "seed": 2})
    assert other.digest() != TINY.digest()
    assert clf.cache_path(str(tmp_path), other) != clf.cache_path(str(tmp_path), TINY)
    shutil.copy(info["cache_path"], tmp_path / "old.npz")
    with pytest.raises(DataError, match="delete it to retrain"):
        clf.load_classifier(str(tmp_path / "old.npz"), other)


def test_batched_features_equal_one_unbatched_forward_pass():
    graphdef, params = clf.init_classifier(TINY)
    images = _synthetic("test", per_class=3).images  # 30 images: batches of 8 leave a ragged last one
    batched = clf.make_features_fn(graphdef, params, TINY, batch_size=8)(images)
    model = clf.nnx.merge(graphdef, params)
    direct = np.asarray(model.features(images.astype(np.float32) / 127.5 - 1.0))
    np.testing.assert_allclose(batched, direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ShapeError, match="to_uint8"):
        clf.make_features_fn(graphdef, params, TINY)(images.astype(np.float32))


def test_mnist_fid_and_precision_recall_use_the_extractor_of_the_cache_dir(trained, tmp_path):
    _, features_fn, info = trained
    # Stand the trained toy classifier in for the default recipe of this cache directory.
    clf._EXTRACTORS[clf.cache_path(str(tmp_path))] = (features_fn, info)
    data = _synthetic("test")
    half_a, half_b = data.images[0::2], data.images[1::2]  # same classes, different images
    same = mnist_fid(half_a, half_b, cache_dir=str(tmp_path))
    missing_classes = mnist_fid(half_a, data.images[data.labels < 5], cache_dir=str(tmp_path))
    assert mnist_fid(half_a, half_a, cache_dir=str(tmp_path)) == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < same < missing_classes
    p, r = mnist_precision_recall(data.images, data.images, cache_dir=str(tmp_path))
    assert p == pytest.approx(1.0, abs=1e-6) and r == pytest.approx(1.0, abs=1e-6)
    p, r = mnist_precision_recall(data.images, data.images[data.labels < 5], cache_dir=str(tmp_path))
    assert p > 0.9 and r < 0.7  # half the classes missing: precise, but little recall


def test_the_default_recipe_ships_checksummed_weights_trained_on_one_device():
    path = clf.shipped_path()
    assert path is not None and os.path.exists(path)
    assert clf._file_sha256(path) == clf.SHIPPED_SHA256[clf.ClassifierConfig().digest()]
    _, _, meta = clf.load_classifier(path)
    assert meta["digest"] == clf.ClassifierConfig().digest() and "one device" in meta["trained_with"]
    assert clf.shipped_path(TINY) is None  # other recipes train and cache


def test_shipped_weights_come_before_the_cache_and_training(tmp_path):
    clf._EXTRACTORS.pop(clf.cache_path(str(tmp_path)), None)
    _, info = clf.get_mnist_feature_extractor(str(tmp_path), load_fn=_no_data)
    assert info["source"] == "shipped" and not info["trained"] and info["cache_path"] == clf.shipped_path()
    assert os.listdir(tmp_path) == []  # nothing trained, nothing written


def test_an_altered_or_missing_shipped_file_is_refused_with_the_fix(tmp_path, monkeypatch):
    altered = bytearray(open(clf.shipped_path(), "rb").read())
    altered[len(altered) // 2] ^= 1
    (tmp_path / os.path.basename(clf.shipped_path())).write_bytes(bytes(altered))
    monkeypatch.setattr(clf, "ASSETS_DIR", str(tmp_path))
    with pytest.raises(DataError, match="SHA-256 .* changed or truncated"):
        clf.load_shipped_classifier()
    monkeypatch.setattr(clf, "ASSETS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="missing .* reinstall gen_jax"):
        clf.load_shipped_classifier()


def test_shipped_classifier_is_over_98_percent_accurate_on_mnist_and_the_fid_floor_is_small():
    from gen_jax.data import load_images
    graphdef, params, meta = clf.load_shipped_classifier()
    test, train = load_images("mnist", "test"), load_images("mnist", "train")
    acc = clf.accuracy(graphdef, params, test.images, test.labels)
    assert acc > 0.98 and acc == pytest.approx(meta["test_accuracy"], abs=2e-4)  # as recorded when shipped
    features = clf.make_features_fn(graphdef, params)
    floor = mnist_fid_of(features, test.images, train.images[:10000])
    assert floor < 0.1 * mnist_fid_of(features, test.images, test.images[test.labels < 5])  # half the classes


def mnist_fid_of(features_fn, images_a, images_b):
    return fid_from_features(features_fn(images_a), features_fn(images_b))


@pytest.mark.slow
def test_retraining_the_default_recipe_from_scratch_is_over_98_percent_accurate(tmp_path):
    """Trains the real classifier (not the shipped file): about a minute on 2 CPU cores."""
    _, info = clf.get_mnist_feature_extractor(str(tmp_path), use_shipped=False)
    assert info["source"] == "trained" and info["test_accuracy"] > 0.98
