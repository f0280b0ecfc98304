"""The tf.data pipeline: examples of any source -> (cache) -> shuffle -> batches of float32 images in [-1, 1].

Every pipeline yields uint8 images up to its cache and float32 batches in [-1, 1] after it, so a cache
holds compact, already cropped and resized images and later epochs decode no JPEG.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from typing import Literal, NamedTuple

import numpy as np
import tensorflow as tf

from keras_ddpm.data.celeba import CROP_BOXES, CropName, _celeba_folder_examples
from keras_ddpm.data.fashion_mnist import has_idx_files, idx_examples
from keras_ddpm.data.common import SHUFFLE_BUFFER_LIMIT, SPLITS, DatasetName, SplitName, _check_choice
from keras_ddpm.data.synthetic import SYNTHETIC_EVAL_SIZE, SYNTHETIC_SHAPES, _synthetic_examples
from keras_ddpm.data.tfds import _TFDS_NAMES, _tfds_or_keras_examples


logger = logging.getLogger(__name__)


class DatasetInfo(NamedTuple):
    """What a model trained on a dataset must match: `channels, num_classes, image_size = dataset_info(name)`.

    Args:
        channels: colour channels of the images (1 grayscale, 3 RGB).
        num_classes: number of class labels (0 when the dataset has none).
        image_size: the usual training resolution (images are square).
    """

    channels: int
    num_classes: int
    image_size: int


_DATASET_INFO = {
    "celeba": DatasetInfo(channels=3, num_classes=0, image_size=64),
    "celeba_tfds": DatasetInfo(channels=3, num_classes=0, image_size=64),
    "fashion_mnist": DatasetInfo(channels=1, num_classes=10, image_size=28),
    "cifar10": DatasetInfo(channels=3, num_classes=10, image_size=32),
    "synthetic": DatasetInfo(channels=3, num_classes=len(SYNTHETIC_SHAPES), image_size=32),
}


# Horizontal flips keep faces and natural images plausible; mirrored clothes are a different item.
_FLIPPED_WHEN_TRAINING = {"celeba", "celeba_tfds", "cifar10"}


def dataset_info(name: DatasetName) -> DatasetInfo:
    """Channels, number of classes and default image size of a dataset, to build a matching U-Net."""
    if name not in _DATASET_INFO:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(_DATASET_INFO)}.")
    return _DATASET_INFO[name]


def make_dataset(
    name: DatasetName,
    split: SplitName = "train",
    image_size: int | None = None,
    batch_size: int = 64,
    *,
    data_dir: str | os.PathLike | None = None,
    crop: CropName = "celeba64",
    with_labels: bool = False,
    training: bool | None = None,
    cache: None | Literal["memory"] | str | os.PathLike = "memory",
    seed: int = 0,
    allow_upsample: bool = False,
    holdout_fraction: float = 0.25,
    num_images: int | None = None,
    channels: int | None = None,
    start_batch: int = 0,
) -> tf.data.Dataset:
    """A batched tf.data pipeline of images in [-1, 1], ready for `DiffusionModel.fit`.

    Training datasets (the default for split "train") shuffle, flip horizontally (CelebA, CIFAR-10),
    repeat forever and drop the last partial batch. Other datasets are deterministic: sorted order, no
    flip, one pass, last partial batch kept.

    Args:
        name: "celeba" (image folder), "celeba_tfds", "fashion_mnist", "cifar10" or "synthetic".
        split: "train", "validation" or "test".
        image_size: side of the square output images; None for the dataset's default (`dataset_info`):
            64 for CelebA, 28 for Fashion-MNIST, 32 for CIFAR-10 and synthetic shapes.
        batch_size: images per batch.
        data_dir: CelebA: the image folder or a folder holding `img_align_celeba/` (default: the
            `CELEBA_DIR` environment variable). Fashion-MNIST: a folder holding the official IDX files, read
            with no download (see `keras_ddpm.data.fashion_mnist`), else the TFDS data directory. TFDS datasets: the
            TFDS data directory.
        crop: CelebA crop box, "celeba64" or "center140" (see the module docstring).
        with_labels: yield `(images, labels)` with int32 labels of shape [B].
        training: shuffle + flip + repeat + drop_remainder; default `split == "train"`.
        cache: None, "memory", or a directory for tf.data cache files; the cache is taken after crop and
            resize and holds uint8 images.
        seed: seed for shuffling, flips and synthetic images.
        allow_upsample: allow an `image_size` larger than the source crop.
        holdout_fraction: fraction of CelebA files held out as validation when the partition file has no
            validation or test images for the folder, and of Fashion-MNIST IDX images when only one pair of
            files (train or test) is in `data_dir`.
        num_images: use only the first `num_images` images of the split (in sorted order).
        channels: convert images to this many channels (default: the dataset's).
        start_batch: training: begin at this batch of the stream, with the images and flips it would have had.
            A run resumed at step N passes N, so that it trains on what an uninterrupted run would have, not on
            the first batches of the stream again. Skipping is cheap: started 3,125 batches of 32 in (100,000
            images of the 6,000-image CelebA subset, 64x64), the first batch came after 3.9 s, against 4.6 s
            at batch 0, on 2 cores.

    Returns:
        A dataset of float32 [B, H, W, C] batches, or of `(images, labels)` pairs.

    Example:

    >>> dataset = make_dataset("synthetic", "train", image_size=16, batch_size=8, with_labels=True)
    >>> images, labels = next(iter(dataset))
    >>> images.shape, labels.shape
    (TensorShape([8, 16, 16, 3]), TensorShape([8]))
    """
    info = dataset_info(name)
    training = split == "train" if training is None else training
    if with_labels and info.num_classes == 0:
        raise ValueError(f"{name} has no class labels; call make_dataset with with_labels=False.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if start_batch < 0 or (start_batch and not training):
        raise ValueError(f"start_batch must be >= 0, and 0 unless training; got {start_batch}.")
    examples, num_examples = _uint8_examples(
        name,
        split,
        image_size,
        training=training,
        data_dir=data_dir,
        crop=crop,
        seed=seed,
        allow_upsample=allow_upsample,
        holdout_fraction=holdout_fraction,
        num_images=num_images,
        channels=channels,
    )
    endless = num_examples is None  # synthetic training stream: nothing to cache, shuffle or repeat
    if cache is not None and not endless:
        source = data_dir if data_dir is not None or name != "celeba" else os.environ.get("CELEBA_DIR")
        content = dict(
            name=name,
            split=split,
            image_size=examples.element_spec[0].shape[0],
            crop=crop,
            channels=examples.element_spec[0].shape[-1],
            training=training,
            seed=seed,
            holdout_fraction=holdout_fraction,
            num_images=num_images,
            source=str(pathlib.Path(source).expanduser().resolve()) if source else None,
        )
        examples = examples.cache(_cache_filename(cache, content))
    if training and not endless:
        buffer_size = min(num_examples, SHUFFLE_BUFFER_LIMIT)
        examples = examples.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True).repeat()
    batches = examples.batch(batch_size, drop_remainder=training, num_parallel_calls=tf.data.AUTOTUNE)
    flip = training and name in _FLIPPED_WHEN_TRAINING

    def finish_batch(batch_index, batch):
        images, labels = batch
        if flip:
            images = _random_flip(images, seed, batch_index)
        images = tf.cast(images, tf.float32) / 127.5 - 1.0
        return (images, labels) if with_labels else images

    batches = batches.skip(start_batch).enumerate(start=start_batch)  # the batch index keys the flips
    batches = batches.map(finish_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    return batches.with_options(_sharding_options(name))


def _sharding_options(name: DatasetName) -> tf.data.Options:
    """How tf.distribute splits the pipeline between workers, so that they never train on the same images.

    TFDS datasets are read from TFRecord files, so each worker reads its own files (FILE, the AUTO policy's
    choice). Image folders and synthetic shapes are sharded by DATA: every worker runs the same pipeline
    and keeps its own part of each global batch. (The folder's files are read by `tf.io.read_file` inside a
    map, which FILE sharding cannot see.) DATA also keeps the stream of global batches that of a one-process
    run, so a run on several workers trains on the same images as one on a single machine.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.AUTO if name in _TFDS_NAMES else tf.data.experimental.AutoShardPolicy.DATA
    )
    return options


def load_images(
    name: DatasetName,
    split: SplitName = "validation",
    image_size: int | None = None,
    num_images: int = 1000,
    **options,
) -> np.ndarray:
    """A fixed set of real images for evaluation and figures: the first `num_images` of the split.

    Same preprocessing as `make_dataset` (crop, resize, channels) in sorted order, without flips. When the
    split holds fewer images, all of them are returned and a warning says so.

    Args:
        name, split, image_size: as in `make_dataset`.
        num_images: how many images to load.
        **options: `data_dir`, `crop`, `seed`, `allow_upsample`, `holdout_fraction`, `channels`.

    Returns:
        uint8 array [N, H, W, C].
    """
    options.pop("cache", None)  # one sequential pass: nothing to reuse
    examples, _ = _uint8_examples(name, split, image_size, training=False, num_images=num_images, **options)
    batches = examples.map(lambda image, label: image).batch(256).prefetch(tf.data.AUTOTUNE)
    images = np.concatenate([batch.numpy() for batch in batches])
    if len(images) < num_images:
        logger.warning("%s %s holds %d images, fewer than the %d asked for.", name, split, len(images), num_images)
    return images


def _uint8_examples(
    name,
    split,
    image_size,
    *,
    training,
    data_dir=None,
    crop="celeba64",
    seed=0,
    allow_upsample=False,
    holdout_fraction=0.25,
    num_images=None,
    channels=None,
):
    """Unbatched `(uint8 [S, S, C] image, int32 label)` examples and their count (None when endless)."""
    info = dataset_info(name)
    _check_choice("split", split, SPLITS)
    _check_choice("crop", crop, CROP_BOXES)
    image_size = info.image_size if image_size is None else int(image_size)
    channels = info.channels if channels is None else channels
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}.")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be positive or None, got {num_images}.")
    if name == "synthetic":
        count = num_images or (None if training else SYNTHETIC_EVAL_SIZE)
        return _synthetic_examples(split, image_size, channels, count, seed), count
    if name == "celeba":
        return _celeba_folder_examples(
            data_dir, split, image_size, crop, channels, allow_upsample, holdout_fraction, num_images, training, seed
        )
    if name == "fashion_mnist" and data_dir is not None and has_idx_files(data_dir):
        return idx_examples(data_dir, split, image_size, channels, allow_upsample, holdout_fraction, num_images)
    return _tfds_or_keras_examples(
        name, split, image_size, crop, channels, allow_upsample, data_dir, num_images, training, seed
    )


def _random_flip(images, seed: int, batch_index):
    """Mirrors each image of a batch with probability 1/2, reproducibly from (seed, batch index)."""
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(batch_index, tf.int64)])
    mirrored = tf.random.stateless_uniform(tf.shape(images)[:1], key) < 0.5
    return tf.where(mirrored[:, tf.newaxis, tf.newaxis, tf.newaxis], tf.reverse(images, axis=[2]), images)


def _cache_filename(cache, content: dict) -> str:
    """The `tf.data.Dataset.cache` argument: "" keeps images in memory, else a file named after its content."""
    if cache == "memory":
        return ""
    directory = pathlib.Path(cache).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(repr(sorted(content.items())).encode()).hexdigest()[:10]
    size = content["image_size"]
    return str(directory / f"{content['name']}-{content['split']}-{size}x{size}-{digest}")
