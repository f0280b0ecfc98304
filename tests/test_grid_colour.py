"""plots.split_image_grid, the inverse of plots.image_grid, and bench/grid_colour.py's colour statistics."""

import sys

import numpy as np
import pytest

from conftest import REPO
from keras_ddpm import plots

sys.path.insert(0, str(REPO / "bench"))
from grid_colour import colour_statistics  # noqa: E402


@pytest.mark.parametrize("count, size, scale", [(64, 32, 3), (64, 64, 2), (10, 8, 1)])
def test_split_image_grid_returns_the_images_the_grid_was_made_of(count, size, scale):
    images = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    grid = plots.image_grid(images, scale=scale)
    np.testing.assert_array_equal(plots.split_image_grid(grid, size, count), images)


def test_split_image_grid_refuses_a_wrong_tile_size():
    grid = plots.image_grid(np.zeros((64, 32, 32, 3), np.uint8), scale=3)
    with pytest.raises(ValueError, match="not a grid of 64 tiles of 64 pixels"):
        plots.split_image_grid(grid, 64)


def test_colour_statistics_of_grey_and_of_red():
    grey = np.full((2, 4, 4, 3), 90, np.uint8)
    red = np.zeros((2, 4, 4, 3), np.uint8)
    red[..., 0] = 200
    assert colour_statistics(grey) == {"channel_spread": 0, "mean_red": 90, "mean_green": 90, "mean_blue": 90}
    assert colour_statistics(np.concatenate([grey, red])) == pytest.approx(
        {"channel_spread": 100, "mean_red": 145, "mean_green": 45, "mean_blue": 45})
