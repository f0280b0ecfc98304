"""tf.data input pipelines: CelebA (image folder or TFDS), Fashion-MNIST, CIFAR-10 and synthetic shapes.

Every pipeline yields uint8 images up to its cache and float32 batches in [-1, 1] after it, so a cache
holds compact, already cropped and resized images and later epochs decode no JPEG.

CelebA crop geometry
--------------------
The aligned CelebA images (`img_align_celeba/*.jpg`) are 178 pixels wide and 218 high. Boxes are defined
in those full-size pixel coordinates and scale with the width W of the image actually read (s = W / 178),
so the same face gives the same crop from the official files, a 2x downscaled copy or TFDS `celeb_a`:

* `"celeba64"` (default; DDIM, StyleGAN and most CelebA-64 results): a 128x128 box centred at x=89,
  y=121, i.e. columns [25, 153) and rows [57, 185). It holds the face from chin to hairline with little
  background. At 89x109 (s = 0.5) it is a 64x64 box centred at (44.5, 60.5).
* `"center140"` (DDPM-era TF code): the 140x140 centre crop, columns [19, 159) and rows [39, 179); at
  89x109 it is a 70x70 box centred at (44.5, 54.5).

The box is cut out and resized to `image_size` in one resampling step with an anti-aliased triangle
(bilinear) filter, like PIL's bilinear resize, at sub-pixel precision: a 2x reduction (128 -> 64 at full
size) weights 4 source pixels per axis by 1/8, 3/8, 3/8, 1/8, and the 1:1 crop of the half-size images,
whose box edges fall half-way between pixels, averages 2x2 neighbours. Both give about equally sharp
64x64 images of the same face (mean difference ~3 of 255 levels on the shared subset, JPEG included);
rounding the half-size box to whole pixels instead would shift it by half an output pixel and triple that.
Asking for more pixels than the box holds (e.g. 128x128 from the 64-pixel box of the half-size images) is
an error unless `allow_upsample=True`.

Splits come from `list_eval_partition.txt` (0 train, 1 validation, 2 test) when it covers validation or
test images of the folder; otherwise a fixed fraction of the files, chosen by a hash of the file name,
is held out as validation (and test), so the split is the same on every machine and at every resolution.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import pathlib
from typing import Literal, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from keras_ddpm import fashion_mnist

logger = logging.getLogger(__name__)

DatasetName = Literal["celeba", "celeba_tfds", "fashion_mnist", "cifar10", "synthetic"]
SplitName = Literal["train", "validation", "test"]
CropName = Literal["celeba64", "center140"]

CELEBA_HELP = (
    "Get the aligned CelebA images: download img_align_celeba.zip ('Align&Cropped Images' on "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, or the Kaggle dataset jessicali9530/celeba-dataset), "
    "unzip it, put list_eval_partition.txt next to the img_align_celeba/ folder, and pass "
    "data_dir=<the folder holding img_align_celeba/> (or the image folder itself)."
)
SPLITS = ("train", "validation", "test")
SYNTHETIC_SHAPES = ("disc", "square", "triangle", "ring")
SYNTHETIC_EVAL_SIZE = 1000  # images in a non-training synthetic dataset when num_images is not given
SHUFFLE_BUFFER_LIMIT = 10_000  # decoded images held for shuffling; image folders and TFDS also shuffle files
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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
_TFDS_NAMES = {"celeba_tfds": "celeb_a", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10"}
_TFDS_SPLITS = {"celeba_tfds": SPLITS, "fashion_mnist": ("train", "test"), "cifar10": ("train", "test")}
_NATIVE_SIZE = {"fashion_mnist": 28, "cifar10": 32}


def dataset_info(name: DatasetName) -> DatasetInfo:
    """Channels, number of classes and default image size of a dataset, to build a matching U-Net."""
    if name not in _DATASET_INFO:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(_DATASET_INFO)}.")
    return _DATASET_INFO[name]


class CropBox(NamedTuple):
    """A square box in the pixel coordinates of a full-size (178x218) aligned CelebA image."""

    center_x: float
    center_y: float
    size: float


CELEBA_WIDTH = 178
CROP_BOXES = {
    "celeba64": CropBox(center_x=89, center_y=121, size=128),
    "center140": CropBox(center_x=89, center_y=109, size=140),
}


def celeba_crop_box(width, crop: CropName = "celeba64"):
    """The crop box `(left, top, size)` in the pixels of an aligned CelebA image `width` pixels wide.

    The box scales with the width (see the module docstring): `celeba_crop_box(178)` is (25, 57, 128) and
    `celeba_crop_box(89)` is (12.5, 28.5, 64), between pixels.

    Args:
        width: image width in pixels, a number or a scalar tensor.
        crop: `"celeba64"` or `"center140"`.

    Returns:
        Three float32 scalar tensors.
    """
    box = CROP_BOXES[_check_choice("crop", crop, CROP_BOXES)]
    scale = tf.cast(width, tf.float32) / CELEBA_WIDTH
    size = box.size * scale
    left = box.center_x * scale - size / 2
    top = box.center_y * scale - size / 2
    return left, top, size


def crop_and_resize(image, image_size: int, crop: CropName | None = None):
    """Cuts the CelebA crop box out of an image and resizes it, anti-aliased, to `image_size` squared.

    Args:
        image: uint8 [H, W, C].
        image_size: side of the output.
        crop: a CelebA box name, or None to resize the whole image.

    Returns:
        uint8 [image_size, image_size, C].
    """
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    if crop is None:
        if image.shape[0] == image_size and image.shape[1] == image_size:
            return image
        left, top, box_width, box_height = 0.0, 0.0, width, height
    else:
        left, top, box_width = celeba_crop_box(width, crop)
        box_height = box_width
    # Output pixel o samples source coordinate o / scale + box corner (pixel centres at +0.5).
    scale = tf.stack([image_size / box_height, image_size / box_width])
    resized = tf.raw_ops.ScaleAndTranslate(
        images=image[tf.newaxis],
        size=[image_size, image_size],
        scale=scale,
        translation=-tf.stack([top, left]) * scale,
        kernel_type="triangle",
        antialias=True,
    )[0]
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


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
            with no download (see `keras_ddpm.fashion_mnist`), else the TFDS data directory. TFDS datasets: the
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

    batches = batches.enumerate().map(finish_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
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
    if name == "fashion_mnist" and data_dir is not None and fashion_mnist.has_idx_files(data_dir):
        return _idx_examples(data_dir, split, image_size, channels, allow_upsample, holdout_fraction, num_images)
    return _tfds_or_keras_examples(
        name, split, image_size, crop, channels, allow_upsample, data_dir, num_images, training, seed
    )


def _idx_examples(data_dir, split, image_size, channels, allow_upsample, holdout_fraction, num_images):
    """Fashion-MNIST from the official IDX files in `data_dir` (see `keras_ddpm.fashion_mnist` for the splits)."""
    _check_source_size((fashion_mnist.IMAGE_SIDE,) * 2, image_size, None, allow_upsample, data_dir)
    images, labels = fashion_mnist.split_examples(data_dir, split, holdout_fraction)
    images, labels = images[:num_images], labels[:num_images]
    _log_once(logging.INFO, "fashion_mnist %s: %d images from the IDX files in %s.", split, len(images), data_dir)

    def preprocess(image, label):
        return crop_and_resize(_convert_channels(image, channels), image_size, None), label

    examples = tf.data.Dataset.from_tensor_slices((images, labels)).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    return examples, len(images)


# ----------------------------------------------------------------------------------------------------------
# CelebA from an image folder


def celeba_files(
    data_dir: str | os.PathLike | None = None, split: SplitName = "train", holdout_fraction: float = 0.25
) -> list[pathlib.Path]:
    """The image files of a CelebA split, sorted by name: the ones `make_dataset("celeba", ...)` reads.

    Files that are not complete JPEG or PNG images are left out and reported once (see the module
    docstring for how the splits are chosen).

    Args:
        data_dir: the image folder or a folder holding `img_align_celeba/` (default: `$CELEBA_DIR`).
        split: "train", "validation" or "test".
        holdout_fraction: fraction of the files held out as validation when the partition file has no
            validation or test images for the folder.
    """
    _check_choice("split", split, SPLITS)
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}.")
    data_dir = _celeba_data_dir(data_dir)
    folder = resolve_celeba_folder(data_dir)
    file_names = _readable_images(str(folder), folder.stat().st_mtime_ns)
    if not file_names:
        raise FileNotFoundError(f"No readable images in {folder}. {CELEBA_HELP}")
    partition_file = _find_partition_file(folder, data_dir)
    splits = _celeba_splits(str(folder), file_names, str(partition_file) if partition_file else None, holdout_fraction)
    if not splits[split]:
        sizes = ", ".join(f"{name}: {len(files)}" for name, files in splits.items())
        raise ValueError(f"Split {split!r} of {folder} is empty ({sizes}); choose another split or holdout_fraction.")
    return [folder / file_name for file_name in splits[split]]


def _celeba_folder_examples(
    data_dir, split, image_size, crop, channels, allow_upsample, holdout_fraction, num_images, training, seed
):
    files = _images_that_fit(celeba_files(data_dir, split, holdout_fraction), image_size, crop, allow_upsample)
    files = files[:num_images]
    logger.info(
        "celeba %s: %d images from %s, %s crop at %dx%d.",
        split,
        len(files),
        files[0].parent,
        crop,
        image_size,
        image_size,
    )

    paths = tf.data.Dataset.from_tensor_slices([str(path) for path in files])
    if training:
        paths = paths.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

    def decode(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
        image.set_shape([None, None, channels])
        return crop_and_resize(image, image_size, crop), tf.constant(-1, tf.int32)

    # Files were checked when listed; a file that still fails to decode is skipped with a TF warning.
    examples = paths.map(decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    return examples, len(files)


def _celeba_data_dir(data_dir) -> pathlib.Path:
    data_dir = data_dir if data_dir is not None else os.environ.get("CELEBA_DIR")
    if data_dir is None:
        raise ValueError(f"CelebA needs data_dir (or the CELEBA_DIR environment variable). {CELEBA_HELP}")
    data_dir = pathlib.Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"CelebA folder {data_dir} does not exist. {CELEBA_HELP}")
    return data_dir


def resolve_celeba_folder(data_dir: str | os.PathLike) -> pathlib.Path:
    """The folder of CelebA images under `data_dir`: itself, `img_align_celeba/` or `img_align_celeba_half/`.

    The Kaggle layout `img_align_celeba/img_align_celeba/` is found too. When several folders hold images,
    the one with the most images is used (the full-size one on a tie) and a log line says so.
    """
    data_dir = pathlib.Path(data_dir).expanduser()
    if _count_images(data_dir):
        return data_dir
    found = []
    for name in ("img_align_celeba", "img_align_celeba_half"):
        for candidate in (data_dir / name, data_dir / name / name):
            count = _count_images(candidate) if candidate.is_dir() else 0
            if count:
                found.append((candidate, count))
                break
    if not found:
        raise FileNotFoundError(
            f"No CelebA images in {data_dir}: expected JPEG files in it or in img_align_celeba/ below it. {CELEBA_HELP}"
        )
    folder, count = max(found, key=lambda folder_and_count: folder_and_count[1])
    if len(found) > 1:
        others = ", ".join(f"{other.name}/ ({other_count} images)" for other, other_count in found if other != folder)
        _log_once(logging.INFO, "CelebA: using %s (%d images); also found %s.", folder, count, others)
    return folder


def _count_images(folder: pathlib.Path) -> int:
    with os.scandir(folder) as entries:
        return sum(entry.name.lower().endswith(IMAGE_SUFFIXES) for entry in entries)


@functools.cache
def _readable_images(folder: str, modified_ns: int) -> tuple[str, ...]:
    """Sorted names of the image files in `folder` that look complete; the others are counted and reported.

    Args:
        folder: the image folder.
        modified_ns: the folder's modification time, so the listing is redone when files come or go.
    """
    readable, problems = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file() or _is_annotation_file(entry.name):
                continue
            problem = _image_file_problem(entry.path)
            if problem:
                problems.append(f"{entry.name} ({problem})")
            else:
                readable.append(entry.name)
    if problems:
        shown = ", ".join(sorted(problems)[:10]) + (", ..." if len(problems) > 10 else "")
        _log_once(
            logging.WARNING,
            "Skipped %d of %d files in %s that are not readable images: %s.",
            len(problems),
            len(problems) + len(readable),
            folder,
            shown,
        )
    return tuple(sorted(readable))


def _is_annotation_file(file_name: str) -> bool:
    """CelebA's text files (list_eval_partition.txt, identity_CelebA.txt, ...) may sit beside the images."""
    lower = file_name.lower()
    return lower.endswith((".txt", ".csv")) and lower.startswith(("list_", "identity_"))


def _image_file_problem(path: str) -> str | None:
    """Why a file cannot be a complete JPEG or PNG image, or None when it looks fine.

    Reads the first and last bytes only: JPEG starts with FF D8 and ends with the FF D9 marker, PNG starts
    with its 8-byte signature and ends with the IEND chunk. A truncated download lacks the end.
    """
    if not path.lower().endswith(IMAGE_SUFFIXES):
        return "not an image file"
    size = os.path.getsize(path)
    if size == 0:
        return "empty"
    with open(path, "rb") as file:
        head = file.read(8)
        file.seek(max(size - 64, 0))
        tail = file.read()
    if head.startswith(b"\xff\xd8"):
        return None if b"\xff\xd9" in tail else "truncated JPEG"
    if head == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "truncated PNG"
    return "not a JPEG or PNG image"


def _find_partition_file(folder: pathlib.Path, data_dir: pathlib.Path) -> pathlib.Path | None:
    for directory in dict.fromkeys([folder, folder.parent, data_dir]):
        for file_name in ("list_eval_partition.txt", "list_eval_partition.csv"):
            if (directory / file_name).is_file():
                return directory / file_name
    return None


@functools.cache
def _read_partition_file(path: str) -> dict[str, int]:
    """`{file name: 0 train / 1 validation / 2 test}` from the official .txt or the Kaggle .csv."""
    partition = {}
    try:
        with open(path) as lines:
            for line in lines:
                fields = line.replace(",", " ").split()
                if len(fields) == 2 and fields[1] in ("0", "1", "2"):  # skips the Kaggle header line
                    partition[fields[0]] = int(fields[1])
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not a text file: expected lines '<image file> <0|1|2>' as in CelebA's "
            "list_eval_partition.txt. Replace it with the official file, or remove it to hold out images by hash."
        ) from None
    return partition


@functools.cache
def _celeba_splits(
    folder: str, file_names: tuple[str, ...], partition_file: str | None, holdout_fraction: float
) -> dict[str, tuple[str, ...]]:
    """Split the folder's files into train/validation/test, officially or by hash hold-out; logs once."""
    partition = _read_partition_file(partition_file) if partition_file else {}
    official = [partition.get(file_name) for file_name in file_names]
    if any(index in (1, 2) for index in official):
        unlisted = official.count(None)
        if unlisted:
            _log_once(
                logging.WARNING, "%d files in %s are not in %s and are left out.", unlisted, folder, partition_file
            )
        return {
            split: tuple(name for name, index in zip(file_names, official, strict=True) if index == split_index)
            for split_index, split in enumerate(SPLITS)
        }
    held_out = tuple(name for name in file_names if _is_held_out(name, holdout_fraction))
    train = tuple(name for name in file_names if not _is_held_out(name, holdout_fraction))
    reason = (
        f"{partition_file} puts none of its {len(file_names)} images in validation or test"
        if partition_file
        else f"no list_eval_partition.txt next to its {len(file_names)} images"
    )
    _log_once(
        logging.INFO,
        "CelebA %s: %s, so %.0f%% of the files (chosen by file-name hash) are held out as the validation and test "
        "split: %d train, %d held out.",
        folder,
        reason,
        100 * holdout_fraction,
        len(train),
        len(held_out),
    )
    return {"train": train, "validation": held_out, "test": held_out}


def _is_held_out(file_name: str, fraction: float) -> bool:
    """A hash of the name, not Python's salted hash(): the same files on every machine and every run."""
    digest = hashlib.sha256(file_name.encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _image_shape(path: pathlib.Path) -> tuple[int, int]:
    """(height, width) from the file's header, or by decoding it when the header cannot be parsed."""
    shape = _header_shape(path)
    if shape is None:
        height, width, _ = tf.io.decode_image(tf.io.read_file(str(path)), expand_animations=False).shape
        shape = (height, width)
    return shape


def _header_shape(path) -> tuple[int, int] | None:
    """(height, width) read from a PNG's IHDR chunk or a JPEG's start-of-frame marker, without decoding."""
    with open(path, "rb") as file:
        head = file.read(24)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
        if not head.startswith(b"\xff\xd8"):
            return None
        file.seek(2)
        while file.read(1) == b"\xff":
            marker = file.read(1)
            while marker == b"\xff":  # fill bytes before a marker
                marker = file.read(1)
            if not marker:
                return None
            code = marker[0]
            if code == 0x01 or 0xD0 <= code <= 0xD8:  # markers without a segment
                continue
            segment_length = int.from_bytes(file.read(2), "big")
            # Start-of-frame markers C0-CF, except C4 (Huffman tables), C8 (reserved) and CC (arithmetic coding).
            if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
                frame = file.read(5)
                return int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
            file.seek(segment_length - 2, os.SEEK_CUR)
    return None


def _crop_box_side(shape, crop: CropName | None) -> float | None:
    """Side in source pixels of the square that gets resized (the crop box, or the whole image's shorter side).

    None when the crop box sticks out of the image: not an aligned CelebA image (or a scaled copy of one).
    """
    height, width = shape
    if crop is None:
        return min(height, width)
    left, top, box_size = (float(value) for value in celeba_crop_box(width, crop))
    return None if left < 0 or top + box_size > height + 0.5 else box_size


def _images_that_fit(files: list[pathlib.Path], image_size: int, crop, allow_upsample: bool) -> list[pathlib.Path]:
    """The files whose crop box fits and holds at least `image_size` pixels; the others are skipped and counted.

    Each image is checked (by its header), so a folder may mix resolutions: the box scales with each image.
    """
    folder = files[0].parent
    shapes = _image_shapes(str(folder), folder.stat().st_mtime_ns)
    kept, misfits, too_small = [], [], []
    for path in files:
        side = _crop_box_side(shapes[path.name], crop)
        if side is None:
            misfits.append(path.name)
        elif image_size > side + 1e-3 and not allow_upsample:
            too_small.append((path.name, side))
        else:
            kept.append(path)
    if misfits or too_small:
        _log_once(
            logging.WARNING,
            "Skipped %d of %d images in %s: %d whose %s box does not fit in them (%s), %d too small for "
            "image_size %d (%s).",
            len(misfits) + len(too_small), len(files), folder, len(misfits), crop, _some(misfits),
            len(too_small), image_size, _some([name for name, _ in too_small]),
        )
    if not kept:
        if too_small:
            largest = max(side for _, side in too_small)
            smaller = math.floor(largest + 1e-3)
            raise ValueError(
                f"image_size {image_size} is larger than the {largest:g}x{largest:g}-pixel "
                f"{'crop box' if crop else 'side'} of the largest image in {folder}: the images would be upsampled. "
                f"Use {f'image_size <= {smaller}, ' if smaller >= 1 else ''}larger source images, or "
                "allow_upsample=True."
            )
        raise ValueError(
            f"The {crop} box fits in none of the images in {folder}: expected aligned CelebA images (178x218 or "
            f"a scaled copy), not pre-cropped ones."
        )
    return kept


@functools.cache
def _image_shapes(folder: str, modified_ns: int) -> dict[str, tuple[int, int]]:
    """`{file name: (height, width)}` of the readable images in `folder` (redone when the folder changes)."""
    return {name: _image_shape(pathlib.Path(folder) / name) for name in _readable_images(folder, modified_ns)}


def _some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "") if names else "none"


def _check_source_size(shape, image_size: int, crop: CropName | None, allow_upsample: bool, source) -> None:
    """Refuses to invent pixels: `image_size` must not exceed the crop box of (height, width) source images."""
    height, width = shape
    box_size = _crop_box_side(shape, crop)
    if box_size is None:
        raise ValueError(
            f"The {crop} box does not fit in the {width}-pixel-wide images of {source}: "
            "expected aligned CelebA images (178x218 or a scaled copy), not pre-cropped ones."
        )
    if image_size > box_size + 1e-3 and not allow_upsample:
        raise ValueError(
            f"image_size {image_size} is larger than the {box_size:g}x{box_size:g}-pixel "
            f"{'crop box' if crop else 'images'} of {source} ({width} pixels wide): the images would be upsampled. "
            f"Use image_size <= {math.floor(box_size + 1e-3)}, larger source images, or allow_upsample=True."
        )


# ----------------------------------------------------------------------------------------------------------
# TFDS and keras.datasets


def _tfds_or_keras_examples(
    name, split, image_size, crop, channels, allow_upsample, data_dir, num_images, training, seed
):
    if split not in _TFDS_SPLITS[name]:
        raise ValueError(f"{name} has the splits {_TFDS_SPLITS[name]}, not {split!r}.")
    crop = crop if name == "celeba_tfds" else None
    native_shape = (218, CELEBA_WIDTH) if name == "celeba_tfds" else (_NATIVE_SIZE[name],) * 2
    _check_source_size(native_shape, image_size, crop, allow_upsample, name)
    try:
        examples = _tfds_examples(name, split, data_dir, training, seed)
    except Exception as tfds_error:
        if name == "celeba_tfds":
            raise RuntimeError(
                f"TFDS could not download or prepare celeb_a ({type(tfds_error).__name__}: {tfds_error}). Its "
                "Google Drive files are often over their download quota. Use the image-folder path instead: "
                f"make_dataset('celeba', data_dir=...). {CELEBA_HELP}"
            ) from tfds_error
        logger.warning(
            "TFDS could not load %s (%s: %s); trying keras.datasets.", name, type(tfds_error).__name__, tfds_error
        )
        examples = _keras_examples(name, split, tfds_error)
    if num_images is not None:
        examples = examples.take(num_images)

    def preprocess(image, label):
        image = crop_and_resize(_convert_channels(image, channels), image_size, crop)
        return image, tf.cast(label, tf.int32)

    examples = examples.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    count = int(examples.cardinality())
    return examples, count if count >= 0 else SHUFFLE_BUFFER_LIMIT  # size unknown: shuffle with the largest buffer


def _tfds_examples(name, split, data_dir, training, seed) -> tf.data.Dataset:
    import tensorflow_datasets as tfds  # imported on use: it is slow to import and only these paths need it

    builder = tfds.builder(_TFDS_NAMES[name], data_dir=None if data_dir is None else str(data_dir))
    builder.download_and_prepare()
    examples = builder.as_dataset(split=split, shuffle_files=training, read_config=tfds.ReadConfig(shuffle_seed=seed))
    has_labels = "label" in builder.info.features
    return examples.map(lambda example: (example["image"], example["label"] if has_labels else -1))


def _keras_examples(name, split, tfds_error) -> tf.data.Dataset:
    loader = {"fashion_mnist": keras.datasets.fashion_mnist, "cifar10": keras.datasets.cifar10}[name]
    try:
        (train_images, train_labels), (test_images, test_labels) = loader.load_data()
    except Exception as keras_error:
        raise RuntimeError(
            f"Could not get {name}: TFDS failed ({type(tfds_error).__name__}: {tfds_error}) and keras.datasets "
            f"failed ({type(keras_error).__name__}: {keras_error}). Both download it on first use and need "
            "internet access then; on a machine without it, copy a TFDS data directory over and pass data_dir."
        ) from keras_error
    images, labels = (train_images, train_labels) if split == "train" else (test_images, test_labels)
    if images.ndim == 3:  # Fashion-MNIST arrives without a channel axis
        images = images[..., np.newaxis]
    return tf.data.Dataset.from_tensor_slices((images, labels.reshape(-1).astype(np.int32)))


def _convert_channels(image, channels: int):
    """Grayscale <-> RGB and alpha dropped, for images with a static channel count."""
    image_channels = image.shape[-1]
    if image_channels in (2, 4):  # grayscale + alpha or RGBA
        image, image_channels = image[..., : image_channels - 1], image_channels - 1
    if image_channels == channels:
        return image
    if channels == 3:
        return tf.image.grayscale_to_rgb(image)
    return tf.image.rgb_to_grayscale(image)


# ----------------------------------------------------------------------------------------------------------
# Synthetic shapes


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


# ----------------------------------------------------------------------------------------------------------
# Shared steps


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


_reported_messages = set()


def _log_once(level: int, message: str, *args) -> None:
    """Logs a report the first time only: the same dataset is often built for training and validation."""
    if (message, args) not in _reported_messages:
        _reported_messages.add((message, args))
        logger.log(level, message, *args)


def _check_choice(what: str, value, choices):
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; choose one of {list(choices)}.")
    return value
