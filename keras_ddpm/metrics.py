"""Sample-quality metrics (sliced Wasserstein distance, FID, KID) and the NLL bound in bits per dimension.

- SWD (Karras et al. 2018) compares local image patches at several scales and needs no pretrained
  network, so it runs anywhere, including machines without internet.
- FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) compare InceptionV3 pool3 features. The
  ImageNet weights come from the Keras download (internet) or a local `.h5` file.
- The NLL (Ho et al. 2020) is the variational bound on held-out images in bits per dimension; it needs
  the model, not samples, and no pretrained weights.

The functions take images as uint8 `[N, H, W, C]` arrays with C = 1 or 3, the project's boundary format
(except `variational_bound`, the NLL's core, which takes data in [-1, 1]).
"""

import hashlib
import os
import re
import warnings
from typing import Callable, Literal, NamedTuple

import keras
import numpy as np
import scipy.linalg
import scipy.ndimage
import scipy.special
import tensorflow as tf

from keras_ddpm import files, samplers
from keras_ddpm.schedule import NoiseSchedule, Objective


def _check_images(images: np.ndarray, name: str) -> np.ndarray:
    """Returns `images` as a numpy array after checking it is uint8 [N, H, W, 1 or 3]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"{name} must be uint8 images in [0, 255], got dtype {images.dtype}. "
            f"Convert float images in [-1, 1] with np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)."
        )
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape [N, H, W, C] with N >= 1 and C = 1 or 3, got shape {images.shape}."
        )
    return images


# ----------------------------------------------------------------------------------------------------
# Sliced Wasserstein distance (Karras et al. 2018, "Progressive Growing of GANs", Appendix D)
# ----------------------------------------------------------------------------------------------------

# The 5-tap binomial filter of cv2.pyrDown / pyrUp; separable, so it is applied per axis.
_BINOMIAL_FILTER = np.array([1.0, 4.0, 6.0, 4.0, 1.0], np.float32) / 16.0


def _blur(images: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Binomial blur of [N, H, W, C] images along H and W, mirrored borders as in cv2 (BORDER_REFLECT_101)."""
    weights = _BINOMIAL_FILTER * gain
    blurred = scipy.ndimage.convolve1d(images, weights, axis=1, mode="mirror")
    return scipy.ndimage.convolve1d(blurred, weights, axis=2, mode="mirror")


def _pyramid_down(images: np.ndarray) -> np.ndarray:
    """Halves the resolution like cv2.pyrDown: blur, then keep every second pixel."""
    return _blur(images)[:, ::2, ::2]


def _pyramid_up(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Doubles the resolution like cv2.pyrUp and crops to `height` x `width` (for odd sizes)."""
    batch, _, _, channels = images.shape
    upsampled = np.zeros((batch, 2 * images.shape[1], 2 * images.shape[2], channels), images.dtype)
    upsampled[:, ::2, ::2] = images
    # Zero insertion keeps 1 of 4 pixels; a gain of 2 per axis restores the brightness.
    return _blur(upsampled, gain=2.0)[:, :height, :width]


def laplacian_pyramid(images: np.ndarray, min_resolution: int = 16) -> list[np.ndarray]:
    """Laplacian pyramid of a batch of images, finest level first.

    Every level but the last holds the detail lost by halving the resolution (the image minus the
    upsampled next level); the last level is the blurred image at the coarsest resolution that is still
    at least `min_resolution` on its shorter side. The levels sum back to the image:
    `image = level_0 + up(level_1 + up(level_2 + ...))`.

    Args:
        images: array [N, H, W, C], any numeric dtype; computed in float32.
        min_resolution: the coarsest level keeps at least this many pixels on its shorter side.

    Returns:
        A list of float32 arrays [N, H_l, W_l, C] with H_0 = H and H_{l+1} = ceil(H_l / 2).
    """
    levels = [np.asarray(images, np.float32)]
    while min(levels[-1].shape[1:3]) // 2 >= min_resolution:
        coarser = _pyramid_down(levels[-1])
        levels[-1] = levels[-1] - _pyramid_up(coarser, *levels[-1].shape[1:3])
        levels.append(coarser)
    return levels


def _sample_patch_descriptors(
    level: np.ndarray, num_patches: int, patch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Cuts `num_patches` random patches out of a pyramid level, spread evenly over its images.

    Returns:
        float32 [num_patches, patch_size * patch_size * C], normalised to zero mean and unit variance
        per colour channel over all patches, as in the reference implementation.
    """
    num_images, height, width, channels = level.shape
    image_index = (np.arange(num_patches) * num_images) // num_patches
    top = rng.integers(0, height - patch_size + 1, size=num_patches)
    left = rng.integers(0, width - patch_size + 1, size=num_patches)
    # A view [N, H', W', patch, patch, C] of every patch position; indexing it copies only the chosen ones.
    windows = np.lib.stride_tricks.sliding_window_view(level, (patch_size, patch_size), axis=(1, 2))
    windows = windows.transpose(0, 1, 2, 4, 5, 3)
    patches = windows[image_index, top, left]  # [num_patches, patch, patch, C]
    per_channel = patches.reshape(num_patches, -1, channels)
    values_per_channel = num_patches * per_channel.shape[1]
    # Sum within each patch in float32 (49 values), then across patches in float64: accurate and fast.
    mean = np.einsum("mkc->mc", per_channel).sum(axis=0, dtype=np.float64) / values_per_channel
    per_channel -= mean.astype(np.float32)
    variance = np.einsum("mkc,mkc->mc", per_channel, per_channel).sum(axis=0, dtype=np.float64) / values_per_channel
    per_channel /= np.sqrt(np.maximum(variance, 1e-16)).astype(np.float32)
    return per_channel.reshape(num_patches, -1)


def _sliced_wasserstein(
    descriptors_a: np.ndarray,
    descriptors_b: np.ndarray,
    num_projections: int,
    num_repeats: int,
    rng: np.random.Generator,
) -> float:
    """Sliced Wasserstein-1 distance between two equally sized point clouds (Rabin et al. 2011).

    Projects both clouds onto random unit directions; in 1-D the Wasserstein-1 distance between two
    equally sized samples is the mean absolute difference of their sorted values.
    """
    dimension = descriptors_a.shape[1]
    # Project in chunks so that [directions, points] stays around 128 MB for 256k points.
    chunk_size = 128
    distances = []
    for _ in range(num_repeats):
        directions = rng.standard_normal((num_projections, dimension))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        directions = directions.astype(np.float32)
        total = 0.0
        for start in range(0, num_projections, chunk_size):
            chunk = directions[start : start + chunk_size]
            projected_a = chunk @ descriptors_a.T  # [chunk, points], each row sorted in place
            projected_b = chunk @ descriptors_b.T
            projected_a.sort(axis=1)
            projected_b.sort(axis=1)
            projected_a -= projected_b
            np.abs(projected_a, out=projected_a)
            total += projected_a.sum(axis=1).sum(dtype=np.float64)
        distances.append(total / (num_projections * descriptors_a.shape[0]))
    return float(np.mean(distances))


def sliced_wasserstein_distance(
    images_a: np.ndarray,
    images_b: np.ndarray,
    *,
    patches_per_image: int = 128,
    patch_size: int = 7,
    num_projections: int = 128,
    num_repeats: int = 4,
    min_resolution: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Multi-scale sliced Wasserstein distance between two image sets (x 1e3).

    Karras et al. 2018 ("Progressive Growing of GANs", Appendix D): build a Laplacian pyramid of every
    image down to `min_resolution`; from each level take `patches_per_image` random 7x7 patches per image
    as descriptors, normalise each set's descriptors per colour channel, and compare the two sets with
    the sliced Wasserstein distance. Small numbers mean similar local structure at that scale: the
    finest level measures sharpness and noise, the coarsest level colours and layout.

    Follows the reference implementation (`metrics/sliced_wasserstein.py` of
    tkarras/progressive_growing_of_gans): 4 repeats of 128 directions (the paper's 512 projections),
    each set normalised by its own per-channel mean and std (so the metric compares the shape of the
    patch distributions, not global brightness or contrast), result multiplied by 1e3. Two different
    samples of the same distribution do not give 0; compare against the SWD of real vs real images.

    When the two sets hold different numbers of images, both sets contribute
    `patches_per_image * min(N_a, N_b)` patches, spread evenly over the images of each set.

    Args:
        images_a: uint8 [N_a, H, W, C], C = 1 or 3, min(H, W) >= min_resolution.
        images_b: uint8 [N_b, H, W, C], the same H, W and C.
        patches_per_image: patches per image and pyramid level.
        patch_size: side of the square patches, in pixels.
        num_projections: random directions per repeat.
        num_repeats: independent sets of directions whose distances are averaged.
        min_resolution: the coarsest pyramid level keeps at least this many pixels per side.
        seed: seeds patch positions and directions; the same seed gives the same result.

    Returns:
        `{"swd_<H_l>": distance for each pyramid level of height H_l, finest first, ..., "swd_mean": mean
        over levels}`, e.g. keys `swd_64, swd_32, swd_16, swd_mean` for 64x64 images.

    Example:
    >>> images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    >>> sorted(sliced_wasserstein_distance(images, images[::-1]))
    ['swd_16', 'swd_32', 'swd_mean']
    """
    images_a = _check_images(images_a, "images_a")
    images_b = _check_images(images_b, "images_b")
    if images_a.shape[1:] != images_b.shape[1:]:
        raise ValueError(
            f"images_a and images_b must have the same height, width and channels, got "
            f"{images_a.shape[1:]} and {images_b.shape[1:]}. Resize one set to the other's resolution."
        )
    if not patch_size <= min_resolution <= min(images_a.shape[1:3]):
        raise ValueError(
            f"Need patch_size <= min_resolution <= image side, got patch_size={patch_size}, "
            f"min_resolution={min_resolution} and images of {images_a.shape[1]}x{images_a.shape[2]}."
        )
    counts = {"patches_per_image": patches_per_image, "num_projections": num_projections, "num_repeats": num_repeats}
    for argument, value in counts.items():
        if value < 1:
            raise ValueError(f"{argument} must be at least 1, got {value}.")

    rng = np.random.default_rng(seed)
    num_patches = patches_per_image * min(len(images_a), len(images_b))
    pyramid_a = laplacian_pyramid(images_a, min_resolution)
    pyramid_b = laplacian_pyramid(images_b, min_resolution)
    distances = {}
    for level_a, level_b in zip(pyramid_a, pyramid_b):
        descriptors_a = _sample_patch_descriptors(level_a, num_patches, patch_size, rng)
        descriptors_b = _sample_patch_descriptors(level_b, num_patches, patch_size, rng)
        distance = _sliced_wasserstein(descriptors_a, descriptors_b, num_projections, num_repeats, rng)
        distances[f"swd_{level_a.shape[1]}"] = 1e3 * distance
    distances["swd_mean"] = float(np.mean(list(distances.values())))
    return distances


# ----------------------------------------------------------------------------------------------------
# FID and KID on InceptionV3 pool3 features
# ----------------------------------------------------------------------------------------------------

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
    images = _check_images(images, "images")
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


# ----------------------------------------------------------------------------------------------------
# NLL: the variational bound in bits per dimension (Ho et al. 2020, Eq. 5)
# ----------------------------------------------------------------------------------------------------

Decoder = Literal["discretized", "continuous"]
# Each draw takes one timestep from one stratum of t; the strata are spaced quadratically in t, so
# they are single timesteps near t = 0, where the bound's terms are largest and change fastest. On
# Gaussian data (linear or cosine schedule, T = 1000) plain uniform draws of t leave a per-image
# standard deviation of 1.4-4.7 nats/dim at 20-100 draws; quadratic strata 0.5 (20 draws), 0.08 (50)
# and 0.015 (100).
NLL_STRATA_SPACING = "quadratic"
NLL_TIMESTEP_DRAWS = 50


def _log1mexp(a: np.ndarray) -> np.ndarray:
    """log(1 - exp(a)) for a <= 0, accurate at both ends (Maechler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    with np.errstate(divide="ignore"):
        return np.where(a > -np.log(2.0), np.log(-np.expm1(a)), np.log1p(-np.exp(a)))


def _log_normal_probability_between(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """log(Phi(upper) - Phi(lower)) for lower < upper (either may be infinite), without cancellation."""
    # Phi(u) - Phi(l) = Phi(-l) - Phi(-u): intervals right of 0 are mirrored to the left, where both CDF
    # values are small and log_ndtr keeps their full precision.
    mirrored = lower + upper > 0
    lower, upper = np.where(mirrored, -upper, lower), np.where(mirrored, -lower, upper)
    log_upper = scipy.special.log_ndtr(upper)
    return log_upper + _log1mexp(scipy.special.log_ndtr(lower) - log_upper)


def discretized_gaussian_log_likelihood(x, means, log_scales) -> np.ndarray:
    """log p(x) of 8-bit data under a Gaussian discretised to 256 bins: DDPM's decoder (Ho et al. 2020, Eq. 13).

    Pixel values x = 2u/255 - 1 (u = 0..255) own the bins [x - 1/255, x + 1/255]; the bins of -1 and +1
    extend to -inf and +inf, so the 256 probabilities sum to 1. Like `discretized_gaussian_log_likelihood`
    in the DDPM code, but with the exact normal CDF evaluated in log space instead of a tanh
    approximation floored at 1e-12, so a pixel far in the tail gets its true (very negative) log-probability.

    Args:
        x: data on the grid 2u/255 - 1, any shape.
        means, log_scales: mean and log standard deviation of the Gaussian, broadcastable to `x`.

    Returns:
        float64 log-probabilities in nats, the broadcast shape.
    """
    x, means, log_scales = (np.asarray(value, np.float64) for value in (x, means, log_scales))
    inverse_scales = np.exp(-log_scales)
    half_bin = 1.0 / 255.0
    lower = np.where(x < -1.0 + half_bin, -np.inf, (x - means - half_bin) * inverse_scales)
    upper = np.where(x > 1.0 - half_bin, np.inf, (x - means + half_bin) * inverse_scales)
    return _log_normal_probability_between(lower, upper)


def _normal_kl(mean_1, variance_1, mean_2, variance_2):
    """KL(N(mean_1, variance_1) || N(mean_2, variance_2)) per element, in nats."""
    return 0.5 * (np.log(variance_2 / variance_1) + variance_1 / variance_2 - 1.0 + (mean_1 - mean_2) ** 2 / variance_2)


def _timestep_strata(schedule: NoiseSchedule, num_draws: int) -> np.ndarray:
    """Edges 0 = e_0 < e_1 < ... < e_K = T - 1 of K = min(num_draws, T - 1) strata (e_k, e_k+1] of {1, ..., T-1}."""
    num_strata = min(num_draws, schedule.num_timesteps - 1)
    descending = samplers.sampling_timesteps(schedule, num_strata + 1, NLL_STRATA_SPACING)
    return descending.numpy()[::-1].astype(np.int64)


def variational_bound(
    predict: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    schedule: NoiseSchedule,
    objective: Objective,
    images: np.ndarray,
    *,
    decoder: Decoder = "discretized",
    num_timestep_draws: int = NLL_TIMESTEP_DRAWS,
    batch_size: int = 64,
    seed: int = 0,
    clip_denoised: bool = True,
    verbose: bool = True,
) -> dict[str, np.ndarray]:
    """Per-image terms of the variational bound on -log p(x_0) (Ho et al. 2020, Eq. 5), in nats per dimension.

    With our timesteps t = 0..T-1 (x_t is the paper's x_{t+1}; x_{-1} = x_0 is the data), the bound is

        L = L_T + sum_{t=1}^{T-1} L_t + L_0,
        L_T = KL(q(x_{T-1} | x_0) || N(0, I))                    prior, exact
        L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))      diffusion, one x_t ~ q(x_t | x_0) each
        L_0 = -log p(x_0 | x_{t=0})                              decoder

    The model's reverse step p(x_{t-1} | x_t) = N(mu(x0_hat, x_t), beta_tilde_t I) uses the posterior mean with
    the network's x0 estimate and the fixed variance beta_tilde_t, the posterior's own (Ho et al. 2020,
    Sec. 3.2; learned variances (Nichol & Dhariwal 2021) are not modelled), so L_t = ||mean difference||^2 /
    (2 beta_tilde_t). The decoder is N(x0_hat, beta_tilde) at t = 0 with beta_tilde of t = 1 (the posterior
    variance at t = 0 is 0; DDPM's `posterior_log_variance_clipped` does the same); `"discretized"` scores the
    8-bit bin of each pixel (`discretized_gaussian_log_likelihood`), `"continuous"` the Gaussian density
    (for continuous data).

    The sum over t is estimated by stratified Monte Carlo: {1, ..., T-1} is cut into K =
    min(num_timestep_draws, T - 1) strata spaced quadratically in t, and every image draws one timestep
    uniformly from each stratum, weighted by the stratum's size. The estimate is unbiased; with
    num_timestep_draws >= T - 1 it is the exact sum. Each image costs K + 1 network evaluations.
    Timesteps and noise depend on `seed` and the image's index only, not on `batch_size`.

    Args:
        predict: `predict(x_t float32 [B, H, W, C], t int32 [B])` -> the network output (`objective`).
        schedule: the model's `NoiseSchedule`.
        objective: `"epsilon"` or `"v"`: what `predict` returns.
        images: float data [N, H, W, C] in [-1, 1] (on the grid 2u/255 - 1 for the discretized decoder).
        decoder: `"discretized"` or `"continuous"`.
        num_timestep_draws: K, timesteps drawn per image for the diffusion terms.
        batch_size: images per network call.
        seed: seeds the timesteps and the noise.
        clip_denoised: clip x0_hat to [-1, 1] before forming the means, as DDPM's and improved DDPM's
            likelihood evaluations do.
        verbose: show a progress bar.

    Returns:
        `{"prior": [N], "diffusion": [N], "decoder": [N], "total": [N]}`, float64 nats per dimension.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty [N, H, W, C] array, got shape {images.shape}.")
    if decoder not in ("discretized", "continuous"):
        raise ValueError(f"Unknown decoder {decoder!r}; choose 'discretized' or 'continuous'.")
    if num_timestep_draws < 1 or batch_size < 1:
        raise ValueError(f"num_timestep_draws and batch_size must be >= 1, got {num_timestep_draws} and {batch_size}.")
    num_images = len(images)
    edges = _timestep_strata(schedule, int(num_timestep_draws))
    stratum_sizes = np.diff(edges)
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, stratum_sizes, size=(num_images, len(stratum_sizes)))
    timesteps = (edges[:-1] + 1 + offsets).astype(np.int32)  # image i, draw k: uniform on (e_k, e_k+1]
    noise_seeds = np.int64(seed) * (1 << 32) + np.arange(num_images, dtype=np.int64)
    image_shape = images.shape[1:]

    def predict_images(x_t, t):
        prediction = tf.cast(predict(x_t, t), tf.float32)
        pred_images, _ = schedule.split_prediction(prediction, x_t, t, objective)
        return tf.clip_by_value(pred_images, -1.0, 1.0) if clip_denoised else pred_images

    @tf.function(reduce_retracing=True)
    def diffusion_term(x0, t, seeds, draw):
        """L_t per image (mean over pixels) for one timestep per image."""
        x_t = schedule.q_sample(x0, t, samplers.per_image_noise(seeds, draw, image_shape))
        posterior_mean, posterior_variance = schedule.posterior_mean_variance(x0, x_t, t)
        model_mean, _ = schedule.posterior_mean_variance(predict_images(x_t, t), x_t, t)
        # Both variances are beta_tilde_t, so the KL is the mean term alone (and no cancellation of 1 - 1).
        kl = tf.square(posterior_mean - model_mean) / (2.0 * posterior_variance)
        return tf.reduce_mean(kl, axis=[1, 2, 3])

    @tf.function(reduce_retracing=True)
    def decoder_mean(x0, seeds, draw):
        """x0_hat from x_0 ~ q(x_0 | data), the mean of the decoder (the posterior mean at t = 0)."""
        t = tf.zeros([tf.shape(x0)[0]], tf.int32)
        return predict_images(schedule.q_sample(x0, t, samplers.per_image_noise(seeds, draw, image_shape)), t)

    decoder_variance = _posterior_variance(schedule, 1)
    alpha_bar_last = schedule.alpha_bars_np[-1]
    progress = keras.utils.Progbar(num_images, verbose=1 if verbose else 0, unit_name="image")
    terms = {name: np.zeros(num_images) for name in ("prior", "diffusion", "decoder")}
    for start in range(0, num_images, batch_size):
        batch = slice(start, start + batch_size)
        x0 = images[batch].astype(np.float64)
        data = tf.constant(images[batch])
        seeds = tf.constant(noise_seeds[batch])
        prior = _normal_kl(np.sqrt(alpha_bar_last) * x0, 1.0 - alpha_bar_last, 0.0, 1.0)
        terms["prior"][batch] = prior.mean(axis=(1, 2, 3))
        for draw, stratum_size in enumerate(stratum_sizes):
            t = tf.constant(timesteps[batch, draw])
            terms["diffusion"][batch] += stratum_size * diffusion_term(data, t, seeds, tf.constant(draw)).numpy()
        means = decoder_mean(data, seeds, tf.constant(len(stratum_sizes))).numpy().astype(np.float64)
        if decoder == "discretized":
            log_likelihood = discretized_gaussian_log_likelihood(x0, means, 0.5 * np.log(decoder_variance))
        else:
            log_likelihood = -0.5 * (np.log(2.0 * np.pi * decoder_variance) + (x0 - means) ** 2 / decoder_variance)
        terms["decoder"][batch] = -log_likelihood.mean(axis=(1, 2, 3))
        progress.add(len(x0))
    terms["total"] = terms["prior"] + terms["diffusion"] + terms["decoder"]
    return terms


def _posterior_variance(schedule: NoiseSchedule, t: int) -> float:
    """beta_tilde_t of q(x_{t-1} | x_t, x_0), as `NoiseSchedule.posterior_mean_variance` computes it."""
    zeros = tf.zeros([1, 1])
    _, variance = schedule.posterior_mean_variance(zeros, zeros, tf.constant([t]))
    return float(tf.reshape(variance, []))


def nll_bits_per_dim(
    predict: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    schedule: NoiseSchedule,
    objective: Objective,
    images_uint8: np.ndarray,
    *,
    num_timestep_draws: int = NLL_TIMESTEP_DRAWS,
    batch_size: int = 64,
    seed: int = 0,
    clip_denoised: bool = True,
    verbose: bool = True,
) -> dict[str, float]:
    """The variational bound on the negative log-likelihood of 8-bit images, in bits per dimension.

    The number DDPM papers report as NLL (Ho et al. 2020, Table 2; Nichol & Dhariwal 2021, Table 2): an
    upper bound on -log2 p(image) / (H W C) for images scaled to x = 2u/255 - 1, with the discretised decoder
    (see `variational_bound` for the terms, the model's variance beta_tilde and the stratified Monte Carlo
    over t). Lower is better; the bound is loose by the terms a fixed variance cannot fit.

    Args:
        predict: `predict(x_t float32 [B, H, W, C], t int32 [B])` -> the network output, e.g.
            `lambda x_t, t: model.ema_network([x_t, t])` or a SavedModel's `denoise` signature's `prediction`.
        schedule, objective: the model's noise schedule and what `predict` returns (`"epsilon"` or `"v"`).
        images_uint8: held-out images, uint8 [N, H, W, C].
        num_timestep_draws: timesteps per image for the diffusion terms (K + 1 network calls per image).
        batch_size: images per network call.
        seed: seeds timesteps and noise.
        clip_denoised: clip x0_hat to [-1, 1], as DDPM's evaluation does.
        verbose: show a progress bar.

    Returns:
        `{"bpd", "prior_bpd", "diffusion_bpd", "decoder_bpd"}`: means over images (bpd = the sum of the three);
        `"stderr"`: the standard error of `bpd` over images, which includes the Monte Carlo noise of the
        draws (each image's estimate is unbiased and images are independent; NaN for one image);
        `"num_images"` and `"num_timestep_draws"` (K as used, at most T - 1).

    Example:
    >>> result = nll_bits_per_dim(lambda x_t, t: model.ema_network([x_t, t]), model.schedule, model.objective, images)
    >>> print(f"{result['bpd']:.3f} +- {result['stderr']:.3f} bits/dim")
    """
    images = _check_images(images_uint8, "images_uint8")
    terms = variational_bound(
        predict, schedule, objective, images.astype(np.float32) / 127.5 - 1.0, decoder="discretized",
        num_timestep_draws=num_timestep_draws, batch_size=batch_size, seed=seed, clip_denoised=clip_denoised,
        verbose=verbose,
    )
    bits = {name: values / np.log(2.0) for name, values in terms.items()}
    num_images = len(images)
    stderr = bits["total"].std(ddof=1) / np.sqrt(num_images) if num_images > 1 else float("nan")
    return {
        "bpd": float(bits["total"].mean()),
        "prior_bpd": float(bits["prior"].mean()),
        "diffusion_bpd": float(bits["diffusion"].mean()),
        "decoder_bpd": float(bits["decoder"].mean()),
        "stderr": float(stderr),
        "num_images": num_images,
        "num_timestep_draws": min(int(num_timestep_draws), schedule.num_timesteps - 1),
    }
