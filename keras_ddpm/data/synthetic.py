"""Synthetic shapes: a disc, square, triangle or ring (the label) in random colours, drawn from a seed.

No files and no download: the smoke recipe and the tests train on them.
"""

from __future__ import annotations

import functools
import math

import tensorflow as tf

from keras_ddpm.data.common import SPLITS


SYNTHETIC_SHAPES = ("disc", "square", "triangle", "ring")


SYNTHETIC_EVAL_SIZE = 1000  # images in a non-training synthetic dataset when num_images is not given


def _synthetic_examples(split, image_size, channels, count, seed) -> tf.data.Dataset:
    """Procedural shapes: one of SYNTHETIC_SHAPES (the label) in a random colour on a random background.

    Image i of a split is a pure function of (seed, split, i), so datasets are reproducible and the
    splits differ. `count=None` gives an endless stream.
    """
    indices = tf.data.Dataset.range(count) if count is not None else tf.data.Dataset.counter()
    split_offset = SPLITS.index(split) << 40
    render = functools.partial(_render_shape, image_size=image_size, channels=channels)
    return indices.map(
        lambda index: render(tf.stack([tf.cast(seed, tf.int64), split_offset + index])),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def _render_shape(key, image_size: int, channels: int):
    """Draws one shape with anti-aliased edges from a stateless random key [2]; returns (uint8 image, label)."""
    keys = tf.random.experimental.stateless_split(key, num=6)
    label = tf.random.stateless_uniform([], keys[0], 0, len(SYNTHETIC_SHAPES), dtype=tf.int32)
    center = tf.random.stateless_uniform([2], keys[1], 0.3, 0.7) * image_size
    radius = tf.random.stateless_uniform([], keys[2], 0.15, 0.3) * image_size
    angle = tf.random.stateless_uniform([], keys[3], 0.0, 2 * math.pi)
    background = tf.random.stateless_uniform([channels], keys[4])
    # Half a turn of the colour wheel away, give or take 0.2: always visible against the background.
    foreground = (background + 0.5 + tf.random.stateless_uniform([channels], keys[5], -0.2, 0.2)) % 1.0

    pixel_centres = tf.range(image_size, dtype=tf.float32) + 0.5
    y, x = tf.meshgrid(pixel_centres - center[0], pixel_centres - center[1], indexing="ij")
    # Coordinates in the shape's own rotated frame.
    u = x * tf.cos(angle) + y * tf.sin(angle)
    v = -x * tf.sin(angle) + y * tf.cos(angle)
    distance_from_centre = tf.sqrt(x**2 + y**2)
    half_side = 0.8 * radius
    square_excess_u, square_excess_v = tf.abs(u) - half_side, tf.abs(v) - half_side
    triangle_edges = [u * tf.cos(2 * math.pi * k / 3) + v * tf.sin(2 * math.pi * k / 3) for k in range(3)]
    signed_distances = tf.stack(  # in pixels, negative inside; order as in SYNTHETIC_SHAPES
        [
            distance_from_centre - radius,
            tf.sqrt(tf.maximum(square_excess_u, 0.0) ** 2 + tf.maximum(square_excess_v, 0.0) ** 2)
            + tf.minimum(tf.maximum(square_excess_u, square_excess_v), 0.0),
            tf.reduce_max(tf.stack(triangle_edges), axis=0) - 0.5 * radius,
            tf.abs(distance_from_centre - 0.75 * radius) - 0.25 * radius,
        ]
    )[label]
    # Partial coverage of the pixels the edge passes through anti-aliases the shape.
    coverage = tf.clip_by_value(0.5 - signed_distances, 0.0, 1.0)[..., tf.newaxis]
    image = background + coverage * (foreground - background)
    return tf.cast(tf.round(image * 255.0), tf.uint8), label
