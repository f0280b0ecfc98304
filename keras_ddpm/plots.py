"""Figures: image grids (written pixel for pixel as PNG), loss curves and forward/reverse process strips."""

import csv
import math
import pathlib

import numpy as np
import tensorflow as tf

from keras_ddpm import files, samplers
from keras_ddpm.data import load_images
from keras_ddpm.generation import Generator


GRID_PADDING = 2  # white pixels between and around the tiles of `image_grid`


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = GRID_PADDING,
               scale: int = 1) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one uint8 image, `columns` wide (default: square-ish).

    `scale` enlarges each pixel to a `scale` x `scale` block (nearest neighbour), so small 32x32 samples stay
    crisp instead of being smoothed by a viewer's resampling.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_grid expects uint8 images [N, H, W, C], got {images.dtype} {images.shape}.")
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels), 255, np.uint8
    )
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def split_image_grid(grid: np.ndarray, image_size: int, count: int = 64) -> np.ndarray:
    """The inverse of `image_grid` (default columns and padding, any scale): its `count` square tiles of
    `image_size` pixels, uint8 [count, size, size, C]."""
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    cell = image_size + GRID_PADDING
    scale, remainder = divmod(grid.shape[1], columns * cell + GRID_PADDING)
    if remainder or scale < 1 or grid.shape[0] != scale * (rows * cell + GRID_PADDING):
        raise ValueError(f"A {grid.shape[1]}x{grid.shape[0]} image is not a grid of {count} tiles of "
                         f"{image_size} pixels.")
    tiles = grid[::scale, ::scale][GRID_PADDING:, GRID_PADDING:]  # rows * cell by columns * cell
    tiles = tiles.reshape(rows, cell, columns, cell, -1)[:, :image_size, :, :image_size]
    return tiles.transpose(0, 2, 1, 3, 4).reshape(rows * columns, image_size, image_size, -1)[:count]


def save_png(path, image: np.ndarray) -> pathlib.Path:
    """Write a uint8 [H, W, C] image as PNG (creating folders), atomically."""
    return files.write_bytes(path, tf.io.encode_png(image).numpy())


def save_image_grid(path, images: np.ndarray, columns: int | None = None, scale: int | None = None) -> pathlib.Path:
    """`image_grid` + `save_png`; small images are enlarged so a 32x32 face is at least 96 pixels wide."""
    scale = scale or max(1, math.ceil(96 / images.shape[2]))
    return save_png(path, image_grid(images, columns, scale=scale))


def plot_training_curves(csv_path, png_path, smoothing: int = 5) -> pathlib.Path:
    """Plot a run's CSV log (`callbacks.CSVLog`, or Keras'): the training (and validation) loss per epoch and,
    when the run monitors them (`--swd_every_epochs`, `--monitor_face`), SWD and the face FD in a panel below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as file:
        rows = list(csv.DictReader(file))
    if not rows:
        raise ValueError(f"{csv_path} has no rows to plot yet.")
    x_key = "step" if "step" in rows[0] else "epoch"
    steps = np.array([float(row[x_key]) for row in rows])
    column = {key: np.array([_number(row.get(key)) for row in rows]) for key in rows[0]}
    monitored = any(np.isfinite(column.get(key, [np.nan])).any() for key in ("swd", "face_fd"))
    figure, axes = plt.subplots(2 if monitored else 1, 1, figsize=(6, 6 if monitored else 3.5), dpi=120,
                                sharex=True, squeeze=False)
    loss_axes = axes[0, 0]
    for key, style in [("loss", "-"), ("val_loss", "--"), ("val_ema_loss", ":")]:
        values = column.get(key, np.full(len(rows), np.nan))
        if np.isfinite(values).any():
            loss_axes.plot(steps, values, style, alpha=0.35 if key == "loss" else 0.9, label=key)
            if key == "loss" and len(values) > smoothing:
                kernel = np.ones(smoothing) / smoothing
                loss_axes.plot(steps[smoothing - 1 :], np.convolve(values, kernel, "valid"),
                               label=f"loss ({smoothing}-pt mean)")
    loss_axes.set_ylabel("MSE")
    loss_axes.set_yscale("log")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend()
    if monitored:
        _plot_sample_quality(axes[1, 0], steps, column)
    axes[-1, 0].set_xlabel("training step" if x_key == "step" else "epoch")
    figure.tight_layout()
    with files.atomic_path(png_path) as partial:  # a viewer never sees half a PNG
        figure.savefig(partial)
    plt.close(figure)
    return pathlib.Path(png_path)


def _plot_sample_quality(axes, steps: np.ndarray, column: dict) -> None:
    """SWD (left axis) and the face FD (right axis) of the EMA samples, at the epochs that measured them."""
    lines = []
    for key, side, color in [("swd", axes, "tab:blue"), ("face_fd", None, "tab:red")]:
        values = column.get(key, np.full(len(steps), np.nan))
        measured = np.isfinite(values)
        if not measured.any():
            continue
        side = side or axes.twinx()
        lines += side.plot(steps[measured], values[measured], "o-", color=color, label=key)
        side.set_ylabel({"swd": "SWD x1e3", "face_fd": "face FD"}[key], color=color)
        side.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend(lines, [line.get_label() for line in lines], title="EMA samples vs held-out images")


def _number(text) -> float:
    """A CSV cell as float; empty cells and CSVLogger's "NA" become NaN (matplotlib leaves a gap)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def process_strip(rows: list[np.ndarray], scale: int | None = None) -> np.ndarray:
    """Stack equally long rows of uint8 images [K, H, W, C] into one strip image (one row per seed/image)."""
    stacked = np.concatenate(rows)
    return image_grid(stacked, columns=len(rows[0]), scale=scale or max(1, math.ceil(64 / stacked.shape[2])))


FORWARD_TIMESTEPS = (0, 50, 100, 200, 300, 500, 700, 999)


def process_figures(generator: Generator, folder, data_dir=None, seed=0, num_rows=4, num_frames=8, **options) -> list:
    """Write `forward.png` (real images noised by q(x_t | x_0)) and `reverse.png` (noise denoised into images).

    Each row is one image; columns go from t = 0 to T - 1 (forward) and from pure noise to the sample (reverse).
    The forward figure needs real images; without them it is skipped with a message. `options` go to `generate`;
    labels given per image (as for a whole grid) are cut or repeated to `num_rows`.
    """
    if np.ndim(options.get("labels")):
        options = {**options, "labels": np.resize(options["labels"], num_rows)}
    folder = pathlib.Path(folder)
    written = []
    schedule = generator.schedule
    dataset = generator.metadata.get("dataset") or "celeba"
    try:
        real = load_images(dataset, "validation", generator.image_shape[0], num_rows, data_dir=data_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"Skipping forward.png: no {dataset} images to noise ({str(error).splitlines()[0]})")
    else:
        clean = tf.cast(real, tf.float32) / 127.5 - 1.0
        noise = tf.random.stateless_normal(clean.shape, seed=[seed, 0])
        timesteps = [t * (schedule.num_timesteps - 1) // 999 for t in FORWARD_TIMESTEPS]
        columns = [samplers.to_uint8(schedule.q_sample(clean, tf.fill([num_rows], t), noise)).numpy() for t in timesteps]
        rows = [np.stack([column[row] for column in columns]) for row in range(num_rows)]
        written.append(save_png(folder / "forward.png", process_strip(rows)))

    images, trajectory = generator.generate(num_rows, seed=seed, return_trajectory=True, **options)
    frames = np.linspace(0, len(trajectory) - 1, num_frames - 1).round().astype(int)
    noisy = samplers.to_uint8(tf.constant(trajectory[frames])).numpy()  # [frames, rows, H, W, C]
    rows = [np.concatenate([noisy[:, row], images[row : row + 1]]) for row in range(num_rows)]
    written.append(save_png(folder / "reverse.png", process_strip(rows)))
    return written
