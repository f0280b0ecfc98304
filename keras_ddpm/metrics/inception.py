"""FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) on InceptionV3 pool3 features.

The ImageNet weights come from the Keras download (internet) or a local `.h5` file.
"""

import hashlib
import os
import re
import warnings
from typing import Callable, NamedTuple

import keras
import numpy as np
import scipy.linalg
import tensorflow as tf

from keras_ddpm import files
from keras_ddpm.metrics.images import check_images


INCEPTION_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
    "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
)


INCEPTION_IMAGE_SIZE = 299


_HOW_TO_GET_WEIGHTS = (
    "FID and KID need the ImageNet weights of InceptionV3. Either run with internet access (Keras "
    "downloads them once to ~/.keras/models/), or download\n  {url}\non a machine with internet and pass "
    "the file with --inception_weights=path.h5 (load_inception(weights='path.h5'))."
).format(url=INCEPTION_WEIGHTS_URL)


def _build_inception(weights: str | None) -> keras.Model:
    return keras.applications.InceptionV3(
        include_top=False,
        pooling="avg",
        weights=weights,
        input_shape=(INCEPTION_IMAGE_SIZE, INCEPTION_IMAGE_SIZE, 3),
    )


def load_inception(weights: str | os.PathLike | None = "imagenet") -> keras.Model:
    """InceptionV3 up to the 2048-d average-pooled pool3 features, as used for FID and KID.

    These are the Keras ImageNet weights, not the 2015 TF graph of the TTUR reference code, so scores
    are consistent within this project but differ somewhat from published FIDs.

    Args:
        weights: "imagenet" (downloaded by Keras, needs internet once), the path of a local
            `inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5`, or None for random weights
            (only useful for tests: the scores mean nothing).

    Returns:
        A keras.Model mapping float [B, 299, 299, 3] images in [-1, 1] to [B, 2048] features.

    Raises:
        RuntimeError: when the ImageNet weights cannot be downloaded.
        FileNotFoundError, ValueError: when the weights file is missing or cannot be loaded.
    """
    if weights is None:
        return _build_inception(None)
    if weights == "imagenet":
        try:
            return _build_inception("imagenet")
        except Exception as error:  # Keras raises a bare Exception on URL fetch failures.
            raise RuntimeError(
                f"Could not download the InceptionV3 ImageNet weights ({error}).\n{_HOW_TO_GET_WEIGHTS}"
            ) from error
    weights_path = os.fspath(weights)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"InceptionV3 weights file {weights_path!r} does not exist.\n{_HOW_TO_GET_WEIGHTS}")
    try:
        return _build_inception(weights_path)
    except Exception as error:
        raise ValueError(
            f"Could not load InceptionV3 weights from {weights_path!r} ({error}). The file must be the Keras "
            f"InceptionV3 'notop' weights (include_top=False).\n{_HOW_TO_GET_WEIGHTS}"
        ) from error


@tf.function(reduce_retracing=True)
def _embed(model: keras.Model, batch: tf.Tensor) -> tf.Tensor:
    """uint8 [B, H, W, 3] -> InceptionV3 features; one traced graph per model, whatever the image size."""
    batch = tf.cast(batch, tf.float32)
    batch = tf.image.resize(batch, (INCEPTION_IMAGE_SIZE, INCEPTION_IMAGE_SIZE), method="bilinear")
    batch = keras.applications.inception_v3.preprocess_input(batch)
    return model(batch, training=False)


def inception_features(
    images: np.ndarray, model: keras.Model, batch_size: int = 50, verbose: bool = True
) -> np.ndarray:
    """InceptionV3 pool3 features of uint8 images.

    Grayscale images are repeated to 3 channels, every image is resized to 299x299 with bilinear
    interpolation (as the TTUR FID code does inside its graph) and scaled to [-1, 1]
    (`keras.applications.inception_v3.preprocess_input`).

    Args:
        images: uint8 [N, H, W, C], C = 1 or 3.
        model: the model returned by `load_inception`.
        batch_size: images per forward pass.
        verbose: show a progress bar.

    Returns:
        float64 [N, 2048].
    """
    images = check_images(images, "images")
    progress = keras.utils.Progbar(len(images), verbose=1 if verbose else 0, unit_name="image")
    features = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if batch.shape[-1] == 1:
            batch = np.repeat(batch, 3, axis=-1)
        features.append(np.asarray(_embed(model, tf.constant(batch)), np.float64))
        progress.add(len(batch))
    return np.concatenate(features, axis=0)


def _check_features(features: np.ndarray, name: str, min_count: int = 2) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < min_count:
        raise ValueError(f"{name} must be a [N, D] array with N >= {min_count}, got shape {features.shape}.")
    return features


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, as in TTUR) of features [N, D]; float64."""
    features = _check_features(features, "features")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017).

    `d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`, computed like the TTUR code:
    when the matrix square root is not finite (a singular product, e.g. fewer samples than
    dimensions), `eps` is added to both diagonals; a tiny imaginary part from round-off is dropped.

    Args:
        mu1, mu2: means [D].
        sigma1, sigma2: covariances [D, D].
        eps: diagonal offset used only when the product is singular.

    Returns:
        The squared Frechet distance (what is reported as FID).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dimension = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (dimension, dimension) or sigma2.shape != sigma1.shape:
        raise ValueError(
            f"Means must be [D] and covariances [D, D] of the same D, got mu1 {mu1.shape}, sigma1 "
            f"{sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}."
        )
    mean_difference = mu1 - mu2
    covariance_sqrt = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covariance_sqrt).all():
        warnings.warn(f"sigma1 @ sigma2 is singular; adding {eps} to the diagonals of the covariances.")
        offset = np.eye(dimension) * eps
        covariance_sqrt = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covariance_sqrt):
        largest_imaginary = np.max(np.abs(covariance_sqrt.imag))
        if not np.allclose(np.diagonal(covariance_sqrt).imag, 0, atol=1e-3):
            raise ValueError(
                f"The matrix square root of sigma1 @ sigma2 has an imaginary part of up to {largest_imaginary:.3g}; "
                f"the covariances are not valid (symmetric positive semi-definite) or numerically broken."
            )
        covariance_sqrt = covariance_sqrt.real
    trace_term = np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covariance_sqrt)
    return float(mean_difference @ mean_difference + trace_term)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets [N_a, D] and [N_b, D]."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def kid_from_features(
    features_a: np.ndarray,
    features_b: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs").

    The unbiased estimate of the squared MMD with the cubic polynomial kernel
    `k(x, y) = (x . y / D + 1)^3`, averaged over random subsets (drawn without replacement) of both
    sets. Unbiased: two samples of the same distribution give about 0 and can give small negative values.

    Args:
        features_a, features_b: [N_a, D] and [N_b, D].
        num_subsets: number of subset pairs.
        subset_size: images per subset; capped at min(N_a, N_b).
        seed: seeds the subset draws.

    Returns:
        (mean, std) of the per-subset MMD^2 estimates.
    """
    features_a = _check_features(features_a, "features_a")
    features_b = _check_features(features_b, "features_b")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"Feature sizes differ: {features_a.shape[1]} and {features_b.shape[1]}.")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"Need num_subsets >= 1 and subset_size >= 2, got {num_subsets} and {subset_size}.")
    dimension = features_a.shape[1]
    size = min(subset_size, len(features_a), len(features_b))
    rng = np.random.default_rng(seed)

    def kernel(x, y):
        return (x @ y.T / dimension + 1.0) ** 3

    estimates = []
    for _ in range(num_subsets):
        x = features_a[rng.choice(len(features_a), size, replace=False)]
        y = features_b[rng.choice(len(features_b), size, replace=False)]
        kernel_xx, kernel_yy = kernel(x, x), kernel(y, y)
        # Leave out the diagonals k(x_i, x_i): this is what makes the estimate unbiased.
        within = (kernel_xx.sum() - np.trace(kernel_xx) + kernel_yy.sum() - np.trace(kernel_yy)) / (size * (size - 1))
        across = 2.0 * kernel(x, y).sum() / size**2
        estimates.append(within - across)
    return float(np.mean(estimates)), float(np.std(estimates))


class RealStatistics(NamedTuple):
    """Inception features of a real image set with their FID statistics."""

    features: np.ndarray  # float64 [N, 2048], for KID
    mu: np.ndarray  # float64 [2048]
    sigma: np.ndarray  # float64 [2048, 2048]


def _cache_path(cache_dir: str, key: str) -> str:
    """File name readable from the key, plus a hash so that different keys never share a file."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")[:100]
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]
    return os.path.join(cache_dir, f"inception_{readable}_{digest}.npz")


def cached_real_statistics(
    cache_dir: str, key: str, compute_features: Callable[[], np.ndarray]
) -> RealStatistics:
    """Loads the real set's Inception features and statistics from `cache_dir`, computing them once.

    Features are stored as float32 to halve the file (80 MB per 10k images) and come back as float64,
    with mu and sigma computed from the stored values, so the first and later calls return the same.

    Args:
        cache_dir: folder for the `.npz` files; created when missing.
        key: everything that determines the features, e.g. "celeba_train_64px_10000_imagenet"; the file
            name is built from it. Change the key whenever the images or the weights change.
        compute_features: called (only when the cache has no entry) to return float [N, D] features.

    Returns:
        RealStatistics(features, mu, sigma).
    """
    path = _cache_path(cache_dir, key)
    if os.path.exists(path):
        try:
            with np.load(path) as cached:
                if str(cached["key"]) == key:
                    return RealStatistics(cached["features"].astype(np.float64), cached["mu"], cached["sigma"])
            warnings.warn(f"{path} was written for another key; recomputing it.")
        except (OSError, ValueError, KeyError) as error:
            warnings.warn(f"Could not read cached statistics {path} ({error}); recomputing them.")

    features = _check_features(compute_features(), "compute_features()").astype(np.float32)
    statistics = RealStatistics(features.astype(np.float64), *feature_statistics(features))
    with files.atomic_path(path) as partial:  # an interrupted run never leaves a truncated cache entry
        np.savez(partial, key=key, features=features, mu=statistics.mu, sigma=statistics.sigma)
    return statistics
