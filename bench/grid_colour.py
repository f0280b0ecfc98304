"""The colour of the faces in 64-image grid PNGs: how saturated, and how red, beside real faces' grids.

    python bench/grid_colour.py --image_size 32 edm=a_s0.png,a_s64.png ode=b_s0.png,b_s64.png real=r0.png,r1.png

A grid is one that `plots.save_image_grid` wrote, 64 tiles of `--image_size` pixels, read back with
`plots.split_image_grid`; each `name=grid,grid,...` pools the tiles of its grids. Prints `key value` lines per name:
`<name>_images`, `<name>_channel_spread` (the mean over pixels of the largest minus the smallest of R, G and B,
in grey levels: 0 for grey, larger for more saturated colour) and `<name>_mean_red`, `_mean_green`, `_mean_blue`.

SWD normalises each set's channels to zero mean and unit variance, so a global shift of a channel does not count
there, but a change in how the channels vary together does (REPORT.md 6.18).
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402,F401  (puts the repository on sys.path)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_ddpm import plots  # noqa: E402


def colour_statistics(images: np.ndarray) -> dict:
    """Channel spread and mean channels (grey levels) of uint8 RGB images [N, H, W, 3]."""
    pixels = images.reshape(-1, 3).astype(np.float64)
    red, green, blue = pixels.mean(axis=0)
    spread = (pixels.max(axis=1) - pixels.min(axis=1)).mean()
    return {"channel_spread": spread, "mean_red": red, "mean_green": green, "mean_blue": blue}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=32, help="the tiles' side in pixels")
    parser.add_argument("sets", nargs="+", help="name=grid.png[,grid.png...]")
    args = parser.parse_args()
    for spec in args.sets:
        name, _, paths = spec.partition("=")
        if not name or not paths:
            parser.error(f"A set is name=grid.png[,grid.png...], got {spec!r}.")
        grids = [tf.io.decode_png(tf.io.read_file(path)).numpy() for path in paths.split(",")]
        try:
            images = np.concatenate([plots.split_image_grid(grid, args.image_size) for grid in grids])
        except ValueError as error:
            parser.error(f"{name}: {error} Pass the tiles' size with --image_size.")
        print(f"{name}_images {len(images)}")
        for key, value in colour_statistics(images).items():
            print(f"{name}_{key} {value:.1f}")


if __name__ == "__main__":
    main()
