"""The metrics' input check: uint8 images [N, H, W, C] with C = 1 or 3, the project's boundary format."""

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
