"""Evaluation metrics shared by several papers.

- `fid`: Frechet distance in float64 (`frechet_distance`, `feature_statistics`, `fid_from_features`) and
  `mnist_fid` on the features of the project's MNIST classifier.
- `precision_recall`: improved precision and recall (k-NN manifolds, blocked, jittable).
- `stats`: `spearman` rank correlation, `bits_per_dim_from_nats`.
- `classifier`: the small MNIST classifier, trained once deterministically and cached
  (`get_mnist_feature_extractor`).

Importing this package is light: submodules load on first attribute access, and nothing trains until a
feature extractor is asked for.
"""
import importlib

_EXPORTS = {
    "frechet_distance": "fid", "feature_statistics": "fid", "fid_from_features": "fid", "mnist_fid": "fid",
    "mnist_feature_statistics": "fid",
    "improved_precision_recall": "precision_recall", "knn_radii": "precision_recall",
    "manifold_membership": "precision_recall", "mnist_precision_recall": "precision_recall",
    "spearman": "stats", "average_ranks": "stats", "bits_per_dim_from_nats": "stats",
    "ClassifierConfig": "classifier", "get_mnist_feature_extractor": "classifier",
}
_SUBMODULES = ("fid", "precision_recall", "stats", "classifier")

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"gen_jax.metrics.{_EXPORTS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"gen_jax.metrics.{name}")
    raise AttributeError(f"module 'gen_jax.metrics' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS) + list(_SUBMODULES))
