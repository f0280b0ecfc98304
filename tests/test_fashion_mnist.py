"""Tests of keras_ddpm.data.fashion_mnist: the official IDX files read from disk, damaged files, the held-out split."""

import gzip
import pathlib

import numpy as np
import pytest

from keras_ddpm import data
from keras_ddpm.data import fashion_mnist

REPO = pathlib.Path(__file__).resolve().parents[1]
REAL_DIR = REPO.parent / "shared" / "data" / "fashion_mnist"


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's content: zero, zero, 0x08 (unsigned byte), the number of dimensions, sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(size.to_bytes(4, "big") for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_part(folder, part, count, gzipped=True, side=28, seed=0):
    """Writes `count` random images and labels as the official "train" or "test" files; returns them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, side, side), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(fashion_mnist.PART_FILES[part], (images, labels)):
        content = idx_bytes(array)
        if gzipped:
            (folder / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / name).write_bytes(content)
    return images, labels


@pytest.mark.parametrize("gzipped", [True, False])
def test_reads_a_test_pair_and_holds_out_a_quarter(tmp_path, gzipped):
    images, labels = write_part(tmp_path, "test", 200, gzipped)
    train_images, train_labels = fashion_mnist.split_examples(tmp_path, "train")
    held_images, held_labels = fashion_mnist.split_examples(tmp_path, "validation")
    assert len(train_images) + len(held_images) == 200
    assert 30 <= len(held_images) <= 70  # a quarter, give or take the hash's luck
    assert train_images.shape[1:] == (28, 28, 1) and train_images.dtype == np.uint8
    # Every image lands on exactly one side, with its own label.
    all_images = np.concatenate([train_images, held_images])[..., 0]
    order = [int(np.flatnonzero((images == image).all(axis=(1, 2)))[0]) for image in all_images]
    assert sorted(order) == list(range(200))
    np.testing.assert_array_equal(np.concatenate([train_labels, held_labels]), labels[order])
    np.testing.assert_array_equal(*(fashion_mnist.split_examples(tmp_path, split)[0] for split in ("validation", "test")))


def test_held_out_images_stay_held_out_when_the_file_grows(tmp_path):
    write_part(tmp_path / "small", "test", 100)
    write_part(tmp_path / "large", "test", 300)  # the same seed: the first 100 images are the same
    small, _ = fashion_mnist.split_examples(tmp_path / "small", "validation")
    large, _ = fashion_mnist.split_examples(tmp_path / "large", "validation")
    np.testing.assert_array_equal(small, large[: len(small)])
    assert len(large) > len(small)


def test_both_pairs_give_the_official_split(tmp_path):
    train_images, _ = write_part(tmp_path, "train", 30, seed=1)
    test_images, _ = write_part(tmp_path, "test", 20, gzipped=False, seed=2)
    np.testing.assert_array_equal(fashion_mnist.split_examples(tmp_path, "train")[0][..., 0], train_images)
    np.testing.assert_array_equal(fashion_mnist.split_examples(tmp_path, "test")[0][..., 0], test_images)


def test_make_dataset_reads_the_folder_without_download(tmp_path):
    write_part(tmp_path, "train", 40)
    images, labels = next(iter(data.make_dataset("fashion_mnist", "train", 28, 8, data_dir=tmp_path,
                                                 with_labels=True)))
    assert images.shape == (8, 28, 28, 1) and labels.shape == (8,)
    assert -1.0 <= float(images.numpy().min()) and float(images.numpy().max()) <= 1.0
    held_out = data.load_images("fashion_mnist", "validation", 28, 1000, data_dir=tmp_path)
    assert 0 < len(held_out) < 40
    with pytest.raises(ValueError, match="upsampled"):
        data.make_dataset("fashion_mnist", "train", 32, 8, data_dir=tmp_path)


def damage(path: pathlib.Path, how: str) -> None:
    content = gzip.decompress(path.read_bytes())
    if how == "bad_magic":
        content = (2052).to_bytes(4, "big") + content[4:]
    elif how == "short_payload":
        content = content[:-5]
    elif how == "wrong_dims":
        content = content[:4] + (27).to_bytes(4, "big") + content[8:]  # 27 images announced ...
        content = content[:8] + (29).to_bytes(4, "big") + content[12:]  # ... of 29 rows: the length no longer fits
    if how == "gzip_truncated":
        path.write_bytes(path.read_bytes()[:-20])
    elif how == "not_gzip":
        path.write_bytes(content)
    else:
        path.write_bytes(gzip.compress(content))


@pytest.mark.parametrize(
    "how, message",
    [("bad_magic", "magic number 2052"), ("short_payload", "truncated"), ("wrong_dims", "header announces"),
     ("gzip_truncated", "damaged gzip stream"), ("not_gzip", "not a gzip file")],
)
def test_a_damaged_image_file_is_a_clear_error(tmp_path, how, message):
    write_part(tmp_path, "test", 50)
    image_file = tmp_path / "t10k-images-idx3-ubyte.gz"
    damage(image_file, how)
    with pytest.raises(fashion_mnist.IdxFormatError, match=message) as error:
        fashion_mnist.split_examples(tmp_path, "train")
    assert str(image_file) in str(error.value)


def test_images_that_are_not_28x28_or_do_not_match_their_labels(tmp_path):
    write_part(tmp_path / "small", "test", 10, side=20)
    with pytest.raises(fashion_mnist.IdxFormatError, match="20x20 pixels"):
        fashion_mnist.split_examples(tmp_path / "small", "train")
    write_part(tmp_path / "mismatch", "test", 10)
    labels = tmp_path / "mismatch" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(9, np.uint8))))
    with pytest.raises(fashion_mnist.IdxFormatError, match="10 images but .* 9 labels"):
        fashion_mnist.split_examples(tmp_path / "mismatch", "train")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No Fashion-MNIST IDX files"):
        fashion_mnist.split_examples(tmp_path, "train")
    write_part(tmp_path, "test", 10)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        fashion_mnist.split_examples(tmp_path, "train")


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"real Fashion-MNIST files not found at {REAL_DIR}")
def test_the_shared_real_files():
    """The 3,443 official test images of ../shared/data/fashion_mnist: counts from the header, 10 classes."""
    train_images, train_labels = fashion_mnist.split_examples(REAL_DIR, "train")
    held_images, held_labels = fashion_mnist.split_examples(REAL_DIR, "validation")
    assert len(train_images) + len(held_images) == 3443
    per_class = np.bincount(np.concatenate([train_labels, held_labels]), minlength=10)
    assert per_class.tolist() == [347, 342, 357, 341, 360, 330, 338, 355, 353, 320]  # the folder's README
    assert np.bincount(held_labels, minlength=10).min() >= 50  # every class is measurable on held-out images
    assert 0.2 < len(held_images) / 3443 < 0.3
