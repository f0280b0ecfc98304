"""CelebA from an image folder: file discovery, splits, and the crop geometry shared with TFDS `celeb_a`.

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
import logging
import math
import os
import pathlib
from typing import Literal, NamedTuple

import tensorflow as tf

from keras_ddpm.data.common import SPLITS, SplitName, _check_choice, _log_once, is_held_out

logger = logging.getLogger(__name__)


CropName = Literal["celeba64", "center140"]


CELEBA_HELP = (
    "Get the aligned CelebA images: download img_align_celeba.zip ('Align&Cropped Images' on "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, or the Kaggle dataset jessicali9530/celeba-dataset), "
    "unzip it, put list_eval_partition.txt next to the img_align_celeba/ folder, and pass "
    "data_dir=<the folder holding img_align_celeba/> (or the image folder itself)."
)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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
    held_out = tuple(name for name in file_names if is_held_out(name, holdout_fraction))
    train = tuple(name for name in file_names if not is_held_out(name, holdout_fraction))
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
