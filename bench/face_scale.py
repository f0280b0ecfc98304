"""The scale of the face metric on real CelebA faces: real vs other real faces, vs degraded and vs broken ones.

    python bench/face_scale.py [--data_dir ../shared/data/celeba] [--num_images 2000] [--image_size 32]

Like `bench/swd_scale.py`: `num_images` real training faces (the reference) against `num_images` other real
faces (the floor a perfect model would reach), and against copies of those other faces that are degraded
(blur, pixelation, noise: the same functions as the SWD scale) or structurally broken (the lower half shifted
3 px sideways; the eye band swapped with the next face's). The SWD of each comparison is printed too, so that
the two measures can be read side by side. Prints `key value` lines per condition:
`<condition>_face_rate`, `<condition>_face_fd`, `<condition>_face_landmark_fd`, `<condition>_swd_mean` and
`<condition>_seconds`, and `reference_face_rate` once. `--floor_sizes 300 500 1000` also prints the real-vs-real
floor at smaller counts (`floor<n>_face_fd`, `floor<n>_face_landmark_fd`: the first n faces against the next n).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402,F401  (puts the repository on sys.path)
import numpy as np  # noqa: E402
from swd_scale import DEFAULT_DATA_DIR, add_noise, blur, pixelate  # noqa: E402

from keras_ddpm import data, metrics  # noqa: E402
from keras_ddpm.metrics import face as face_metric  # noqa: E402

# Rows of the eye band as fractions of the image height: MTCNN puts CelebA-64 eyes at 0.43 H (std 0.015 H).
EYE_BAND = (0.34, 0.50)


def shift_lower_half(images: np.ndarray, pixels: int = 3) -> np.ndarray:
    """Shift the lower half of every image `pixels` to the right; the left edge column fills the gap."""
    half = images.shape[1] // 2
    shifted = images.copy()
    lower = np.pad(images[:, half:], ((0, 0), (0, 0), (pixels, 0), (0, 0)), mode="edge")
    shifted[:, half:] = lower[:, :, : images.shape[2]]
    return shifted


def swap_eye_band(images: np.ndarray) -> np.ndarray:
    """Give every face the eye band (EYE_BAND rows, full width) of the next face in the set."""
    height = images.shape[1]
    top, bottom = (round(fraction * height) for fraction in EYE_BAND)
    swapped = images.copy()
    swapped[:, top:bottom] = np.roll(images[:, top:bottom], 1, axis=0)
    return swapped


DEGRADATIONS = {
    "real": lambda images: images,
    "blur0.5": lambda images: blur(images, 0.5),
    "blur1": lambda images: blur(images, 1.0),
    "pixelate2": lambda images: pixelate(images, 2),
    "noise4": lambda images: add_noise(images, 4.0),
    "noise16": lambda images: add_noise(images, 16.0),
    "shift3_lower_half": shift_lower_half,
    "swap_eye_band": swap_eye_band,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR), help="CelebA image folder or its parent")
    parser.add_argument("--num_images", type=int, default=2000, help="images in each of the two sets")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--conditions", nargs="+", choices=list(DEGRADATIONS), default=list(DEGRADATIONS))
    parser.add_argument("--floor_sizes", type=int, nargs="*", default=[], help="also the floor at these counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images = data.load_images("celeba", "train", args.image_size, 2 * args.num_images, data_dir=args.data_dir)
    if len(images) < 2 * args.num_images:
        sys.exit(f"Need {2 * args.num_images} training images in {args.data_dir}, found {len(images)}.")
    reference, others = images[: args.num_images], images[args.num_images :]
    networks = face_metric.load_face_networks()
    reference_embedding = face_metric.embed_faces(reference, networks)
    print(f"num_images {args.num_images}\nreference_face_rate {reference_embedding.found.mean():.4f}", flush=True)
    for condition in args.conditions:
        start = time.perf_counter()
        degraded = DEGRADATIONS[condition](others)
        embedding = face_metric.embed_faces(degraded, networks)
        distances = face_metric.compare_embeddings(embedding, reference_embedding)
        seconds = time.perf_counter() - start
        swd = metrics.sliced_wasserstein_distance(reference, degraded, seed=args.seed)["swd_mean"]
        print(f"{condition}_face_rate {embedding.found.mean():.4f}\n"
              f"{condition}_face_fd {distances['face_fd']:.3f}\n"
              f"{condition}_face_landmark_fd {distances['face_landmark_fd']:.4f}\n"
              f"{condition}_swd_mean {swd:.2f}\n{condition}_seconds {seconds:.1f}", flush=True)
    for size in args.floor_sizes:  # how the floor depends on the image count
        first, second = (face_metric.embed_faces(images[start : start + size], networks) for start in (0, size))
        distances = face_metric.compare_embeddings(first, second)
        print(f"floor{size}_face_fd {distances['face_fd']:.3f}\n"
              f"floor{size}_face_landmark_fd {distances['face_landmark_fd']:.5f}", flush=True)


if __name__ == "__main__":
    main()
