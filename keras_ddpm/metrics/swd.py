"""Sliced Wasserstein distance (Karras et al. 2018): local image patches compared at several scales.

It needs no pretrained network, so it runs anywhere, including machines without internet.
"""

import numpy as np
import scipy.ndimage

from keras_ddpm.metrics.images import check_images


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
    images_a = check_images(images_a, "images_a")
    images_b = check_images(images_b, "images_b")
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
