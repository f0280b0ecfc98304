"""Fashion-MNIST from the official IDX files on disk, with no download.

`--dataset=fashion_mnist --data_dir=<folder>` reads the files of the official distribution (Xiao, Rasul &
Vollgraf 2017) from `<folder>`, gzipped or not:

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]   (60,000 images)
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]    (10,000 images)

The train pair, the test pair or both may be there; the number of images is read from each file's header,
so part of a set works too. Every file is checked (magic number, dimensions, payload length, gzip stream)
and a damaged one raises `IdxFormatError` naming the file and what is wrong.

Splits (`split_examples`, the one place that decides them, used by training and evaluation alike):

* both pairs: "train" is the official training set, "validation" and "test" the official test set;
* one pair only: a fixed fraction of its images, chosen by a hash of the image's index in its file, is held
  out as "validation" and "test", and "train" is the rest. An image keeps its side of the split when the
  file holds more or fewer images (the first 3,443 test images or all 10,000), on every machine.

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian header of two zero bytes, a type
byte (0x08 = unsigned byte), the number of dimensions, then one uint32 size per dimension, then the data.
"""

from __future__ import annotations

import gzip
import logging
import pathlib
import zlib

import numpy as np
import tensorflow as tf

from keras_ddpm.data.celeba import _check_source_size, crop_and_resize
from keras_ddpm.data.common import _log_once, is_held_out
from keras_ddpm.data.tfds import _convert_channels

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
IMAGE_SIDE = 28
PART_FILES = {  # part -> (image file, label file), without .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # unsigned bytes in 3 and in 1 dimensions
FIX_HINT = "Download the official file again (https://github.com/zalandoresearch/fashion-mnist, data/fashion/)."


class IdxFormatError(ValueError):
    """A Fashion-MNIST IDX file that cannot be read as one: the message names the file and the problem."""


def has_idx_files(folder) -> bool:
    """Whether `folder` holds at least one official Fashion-MNIST image or label file (gzipped or not)."""
    folder = pathlib.Path(folder).expanduser()
    names = [name for pair in PART_FILES.values() for name in pair]
    return folder.is_dir() and any(_existing(folder, name) for name in names)


def read_idx(path, expected_magic: int) -> np.ndarray:
    """The uint8 array stored in an IDX file (`.gz` is decompressed), its shape taken from the header.

    Raises:
        IdxFormatError: not gzip when named `.gz`, a wrong magic number, or a payload of the wrong length.
    """
    path = pathlib.Path(path)
    content = _read_bytes(path)
    expected_dims = expected_magic & 0xFF
    if len(content) < 4 + 4 * expected_dims:
        raise IdxFormatError(f"{path}: only {len(content)} bytes, too short for an IDX header. {FIX_HINT}")
    magic = int.from_bytes(content[:4], "big")
    if magic != expected_magic:
        raise IdxFormatError(
            f"{path}: magic number {magic} (0x{magic:08x}), expected {expected_magic} (0x{expected_magic:08x}) for "
            f"{'images' if expected_magic == IMAGE_MAGIC else 'labels'}: not this kind of IDX file. {FIX_HINT}"
        )
    header_end = 4 + 4 * expected_dims
    shape = tuple(int.from_bytes(content[i : i + 4], "big") for i in range(4, header_end, 4))
    payload = len(content) - header_end
    if payload != int(np.prod(shape)):
        problem = "truncated" if payload < np.prod(shape) else "longer than its header says"
        raise IdxFormatError(
            f"{path}: {problem}: the header announces shape {shape} ({int(np.prod(shape))} bytes of data), the file "
            f"holds {payload}. {FIX_HINT}"
        )
    return np.frombuffer(content, np.uint8, offset=header_end).reshape(shape)


def read_part(folder, part: str) -> tuple[np.ndarray, np.ndarray]:
    """`(images uint8 [N, 28, 28, 1], labels int32 [N])` of the "train" or "test" pair of files in `folder`."""
    image_name, label_name = PART_FILES[part]
    image_path, label_path = _existing(folder, image_name), _existing(folder, label_name)
    if image_path is None or label_path is None:
        missing = image_name if image_path is None else label_name
        raise FileNotFoundError(f"{folder} has the {part} {'labels' if image_path is None else 'images'} but not "
                                f"{missing}[.gz]; images and labels come in pairs.")
    images = read_idx(image_path, IMAGE_MAGIC)
    labels = read_idx(label_path, LABEL_MAGIC)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise IdxFormatError(f"{image_path}: images of {images.shape[1]}x{images.shape[2]} pixels, expected "
                             f"{IMAGE_SIDE}x{IMAGE_SIDE}: not Fashion-MNIST. {FIX_HINT}")
    if len(images) != len(labels):
        raise IdxFormatError(f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels: the "
                             f"two files do not belong together. {FIX_HINT}")
    if len(labels) and labels.max() >= len(CLASS_NAMES):
        raise IdxFormatError(f"{label_path}: label {labels.max()} found, expected 0-{len(CLASS_NAMES) - 1}. {FIX_HINT}")
    return images[..., np.newaxis], labels.astype(np.int32)


def split_examples(folder, split: str, holdout_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """`(images uint8 [N, 28, 28, 1], labels int32 [N])` of a split, in file order (see the module docstring).

    Args:
        folder: the folder holding the IDX files.
        split: "train", "validation" or "test" (the last two are the same held-out images).
        holdout_fraction: fraction held out when the folder has only one of the two pairs of files.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}.")
    folder = pathlib.Path(folder).expanduser()
    parts = [part for part, (image_name, label_name) in PART_FILES.items()
             if _existing(folder, image_name) or _existing(folder, label_name)]
    if not parts:
        raise FileNotFoundError(f"No Fashion-MNIST IDX files in {folder}: expected {PART_FILES['train'][0]}[.gz] and "
                                f"the other official file names. {FIX_HINT}")
    if len(parts) == 2:  # the official split
        return read_part(folder, "train" if split == "train" else "test")
    images, labels = read_part(folder, parts[0])
    held_out = np.array([is_held_out(f"fashion_mnist/{parts[0]}/{index}", holdout_fraction)
                         for index in range(len(images))], bool)
    keep = ~held_out if split == "train" else held_out
    if not keep.any():
        raise ValueError(f"Split {split!r} of the {len(images)} Fashion-MNIST images in {folder} is empty; use a "
                         f"holdout_fraction other than {holdout_fraction} or more images.")
    return images[keep], labels[keep]


def _existing(folder, name: str) -> pathlib.Path | None:
    """`<folder>/<name>` or `<folder>/<name>.gz`, whichever exists (the plain file first)."""
    for candidate in (pathlib.Path(folder) / name, pathlib.Path(folder) / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: pathlib.Path) -> bytes:
    """The file's bytes, decompressed when it is gzipped (recognised by content, not by name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        if path.suffix == ".gz":
            raise IdxFormatError(f"{path}: not a gzip file (it does not start with the gzip magic bytes). {FIX_HINT}")
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise IdxFormatError(f"{path}: damaged gzip stream ({type(error).__name__}: {error}). {FIX_HINT}") from None


def idx_examples(data_dir, split, image_size, channels, allow_upsample, holdout_fraction, num_images):
    """Unbatched `(uint8 image, int32 label)` examples from the IDX files in `data_dir`, and their count."""
    _check_source_size((IMAGE_SIDE,) * 2, image_size, None, allow_upsample, data_dir)
    images, labels = split_examples(data_dir, split, holdout_fraction)
    images, labels = images[:num_images], labels[:num_images]
    _log_once(logging.INFO, "fashion_mnist %s: %d images from the IDX files in %s.", split, len(images), data_dir)

    def preprocess(image, label):
        return crop_and_resize(_convert_channels(image, channels), image_size, None), label

    examples = tf.data.Dataset.from_tensor_slices((images, labels)).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    return examples, len(images)
