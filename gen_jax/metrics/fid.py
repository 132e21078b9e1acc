"""Frechet distance between feature Gaussians (FID; Heusel et al. 2017, "GANs Trained by a Two Time-Scale
Update Rule Converge to a Local Nash Equilibrium", eq. 6):

    d^2((mu1, S1), (mu2, S2)) = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

No Inception FID exists for MNIST, so `mnist_fid` uses the penultimate features of the project's small
MNIST classifier (`gen_jax.metrics.classifier`), the usual stand-in; report FID(test vs train) as the floor.

The trace term is computed without a general matrix square root: S1 S2 is similar to the symmetric PSD
matrix A = S1^{1/2} S2 S1^{1/2}, so tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(A)). Both square roots come
from symmetric eigendecompositions in float64, which are stable for singular covariances (N < dim) where
scipy.linalg.sqrtm may return complex values or need an eps offset.
"""
from __future__ import annotations

import numpy as np

from gen_jax.errors import ShapeError


def _sym_sqrt(s_DxD: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; tiny negative eigenvalues from round-off are clipped to 0."""
    w, v = np.linalg.eigh(s_DxD)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ShapeError(f"statistics {which}: mean has shape {mu.shape} and covariance {sigma.shape}; expected "
                         "(D,) and (D, D) (use feature_statistics(features_NxD))")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ShapeError(f"statistics {which} contain NaN or inf; check the features they came from")
    return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, sigma1 = _check_stats(mu1, sigma1, "1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ShapeError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}; compute both statistics "
                         "with the same feature extractor")
    sigma1 = 0.5 * (sigma1 + sigma1.T)
    sigma2 = 0.5 * (sigma2 + sigma2.T)
    root1 = _sym_sqrt(sigma1)
    a = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh(0.5 * (a + a.T))
    tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(d2, 0.0))  # >= 0 in exact arithmetic; clip round-off at identical statistics


def feature_statistics(features_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of N feature vectors, in float64."""
    f = np.asarray(features_NxD, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ShapeError(f"features have shape {f.shape}; expected N x D with N >= 2 (FID needs many more, "
                         "ideally N >= D and N in the thousands)")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fid_from_features(features_a_NxD: np.ndarray, features_b_MxD: np.ndarray) -> float:
    """FID between two sets of feature vectors (each summarized by its mean and covariance)."""
    return frechet_distance(*feature_statistics(features_a_NxD), *feature_statistics(features_b_MxD))


def mnist_feature_statistics(images_uint8: np.ndarray, *, cache_dir: str | None = None
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the MNIST classifier's features of uint8 images N x 28 x 28 x 1.

    Compute this once for a reference set (e.g. the training split) and reuse it with `frechet_distance`.
    """
    from gen_jax.metrics.classifier import get_mnist_feature_extractor  # trains/loads on first use only
    features_fn, _ = get_mnist_feature_extractor(cache_dir)
    return feature_statistics(features_fn(images_uint8))


def mnist_fid(images_a_uint8: np.ndarray, images_b_uint8: np.ndarray, *, cache_dir: str | None = None) -> float:
    """FID between two sets of uint8 MNIST-shaped images (N x 28 x 28 x 1) on the classifier's features.

    Float model outputs in [-1, 1] go through `gen_jax.images.to_uint8` first, so generated and real
    images are quantized the same way.
    """
    return frechet_distance(*mnist_feature_statistics(images_a_uint8, cache_dir=cache_dir),
                            *mnist_feature_statistics(images_b_uint8, cache_dir=cache_dir))
