"""What the metrics share: the input check (uint8 images [N, H, W, C], C = 1 or 3) and pixel distances."""

import numpy as np


def check_images(images: np.ndarray, name: str) -> np.ndarray:
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


def rms_distances(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Root-mean-square pixel differences [N, M] between each of the N images `first` and the M images `second`.

    In the images' own units. |a - b|^2 = |a|^2 - 2 a.b + |b|^2: one matrix product, not N x M differences.
    """
    first = np.asarray(first, np.float64).reshape(len(first), -1)
    second = np.asarray(second, np.float64).reshape(len(second), -1)
    squared = np.square(first).sum(1)[:, None] - 2.0 * first @ second.T + np.square(second).sum(1)[None, :]
    return np.sqrt(np.maximum(squared, 0.0) / first.shape[1])
