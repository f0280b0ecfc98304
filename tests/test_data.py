"""Tests of keras_ddpm.data: shapes and ranges, CelebA crop geometry, splits, bad input, TFDS paths."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_ddpm import data


def write_image(path, pixels):
    """Writes uint8 [H, W, C] pixels as PNG or JPEG (by suffix); returns the path."""
    pixels = tf.constant(pixels, tf.uint8)
    encoded = tf.io.encode_png(pixels) if path.suffix == ".png" else tf.io.encode_jpeg(pixels, quality=95)
    tf.io.write_file(str(path), encoded)
    return path


def coordinate_image(width, height):
    """Red = x and green = y of each pixel centre in full-size (178-wide) coordinates, blue = 128."""
    scale = 178 / width
    x = (np.arange(width) + 0.5) * scale
    y = (np.arange(height) + 0.5) * scale
    red, green = np.meshgrid(x, y)
    return np.round(np.stack([red, green, np.full_like(red, 128)], axis=-1)).astype(np.uint8)


def flat_images_folder(folder, count, size=(44, 36)):
    """`count` JPEGs 000001.jpg ... of one flat grey level each (5 * index), to tell them apart."""
    folder.mkdir(parents=True)
    for index in range(1, count + 1):
        write_image(folder / f"{index:06d}.jpg", np.full(size + (3,), 5 * index, np.uint8))
    return folder


def image_indices(images):
    return sorted(int(round(image.mean() / 5)) for image in images)


def test_dataset_info():
    assert data.dataset_info("fashion_mnist") == (1, 10, 28)
    assert data.dataset_info("cifar10") == (3, 10, 32)
    channels, num_classes, image_size = data.dataset_info("celeba")
    assert (channels, num_classes, image_size) == (3, 0, 64)
    assert data.dataset_info("synthetic").num_classes == len(data.SYNTHETIC_SHAPES)
    with pytest.raises(ValueError, match="mnist"):
        data.dataset_info("mnist")


def test_synthetic_training_batches():
    dataset = data.make_dataset("synthetic", "train", image_size=16, batch_size=8, with_labels=True, seed=3)
    images, labels = next(iter(dataset))
    assert images.shape == (8, 16, 16, 3) and images.dtype == tf.float32
    assert labels.shape == (8,) and labels.dtype == tf.int32
    assert -1.0 <= float(tf.reduce_min(images)) < float(tf.reduce_max(images)) <= 1.0
    grayscale = next(iter(data.make_dataset("synthetic", "train", image_size=12, batch_size=4, channels=1)))
    assert grayscale.shape == (4, 12, 12, 1)


def test_synthetic_is_reproducible_and_covers_every_shape():
    def first_batch(seed, split="train"):
        dataset = data.make_dataset("synthetic", split, 16, 256, seed=seed, with_labels=True, training=True)
        return next(iter(dataset))

    (images, labels), (same_images, _) = first_batch(0), first_batch(0)
    np.testing.assert_array_equal(images, same_images)
    assert not np.array_equal(images, first_batch(1)[0])
    assert not np.array_equal(images, first_batch(0, "validation")[0])
    counts = np.bincount(labels.numpy(), minlength=len(data.SYNTHETIC_SHAPES))
    assert len(counts) == len(data.SYNTHETIC_SHAPES) and counts.min() > 256 / len(counts) / 2


def test_evaluation_dataset_is_one_deterministic_pass_keeping_the_last_batch():
    dataset = data.make_dataset("synthetic", "validation", 8, batch_size=4, num_images=10, with_labels=True)
    batches = [images.shape[0] for images, _ in dataset]
    assert batches == [4, 4, 2]
    first, second = (np.concatenate([images for images, _ in dataset]) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    loaded = data.load_images("synthetic", "validation", 8, 10)
    assert loaded.dtype == np.uint8 and loaded.shape == (10, 8, 8, 3)
    np.testing.assert_allclose(loaded / 127.5 - 1.0, first, atol=1e-6)


def test_file_cache_holds_the_same_images(tmp_path):
    uncached = data.make_dataset("synthetic", "test", 8, 16, num_images=16, cache=None)
    cached = data.make_dataset("synthetic", "test", 8, 16, num_images=16, cache=tmp_path / "cache")
    for _ in range(2):  # the second pass reads the cache file
        np.testing.assert_array_equal(next(iter(cached)), next(iter(uncached)))
    assert any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize(
    "width, crop, expected",
    [
        (178, "celeba64", (25, 57, 128)),
        (89, "celeba64", (12.5, 28.5, 64)),
        (178, "center140", (19, 39, 140)),
        (89, "center140", (9.5, 19.5, 70)),
    ],
)
def test_crop_box_in_pixels(width, crop, expected):
    assert tuple(float(value) for value in data.celeba_crop_box(width, crop)) == expected


@pytest.mark.parametrize("width, height", [(178, 218), (89, 109)])
@pytest.mark.parametrize("crop", ["celeba64", "center140"])
def test_crop_lands_on_the_box_at_every_resolution(tmp_path, width, height, crop):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    write_image(folder / "000001.png", coordinate_image(width, height))
    (image,) = data.load_images("celeba", "train", 64, 1, data_dir=tmp_path, crop=crop, holdout_fraction=0.0)
    # Where each output pixel centre falls in the full-size image (red = x, green = y there).
    box = data.CROP_BOXES[crop]
    box_start = np.array([box.center_x, box.center_y]) - box.size / 2
    centres = box_start[:, None] + (np.arange(64) + 0.5) * box.size / 64
    np.testing.assert_allclose(image[0, :, 0], centres[0], atol=0.75)  # the pattern and output are rounded
    np.testing.assert_allclose(image[:, 0, 1], centres[1], atol=0.75)
    assert np.all(image[..., 2] == 128)


def test_partition_file_gives_the_official_splits(tmp_path):
    flat_images_folder(tmp_path / "img_align_celeba", 9)
    official = {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 1, 7: 1, 8: 2, 9: 2, 10: 1}  # 10 is not in the folder
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg {p}\n" for i, p in official.items()))

    def indices(split):
        return image_indices(data.load_images("celeba", split, 16, 100, data_dir=tmp_path))

    assert indices("train") == [1, 2, 3, 4, 5]
    assert indices("validation") == [6, 7]
    assert indices("test") == [8, 9]


def test_kaggle_layout_and_csv_partition(tmp_path):
    flat_images_folder(tmp_path / "img_align_celeba" / "img_align_celeba", 4)
    rows = ["image_id,partition", "000001.jpg,0", "000002.jpg,0", "000003.jpg,1", "000004.jpg,2"]
    (tmp_path / "list_eval_partition.csv").write_text("\n".join(rows) + "\n")
    assert [path.name for path in data.celeba_files(tmp_path, "validation")] == ["000003.jpg"]
    assert image_indices(data.load_images("celeba", "train", 16, 100, data_dir=tmp_path)) == [1, 2]


@pytest.mark.parametrize("partition", ["all_train", "absent"])
def test_hash_holdout_when_the_partition_has_no_validation_images(tmp_path, caplog, partition):
    folder = flat_images_folder(tmp_path / "faces", 40)
    if partition == "all_train":  # like the shared subset: every file in the official train partition
        (folder / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg 0\n" for i in range(1, 41)))
    with caplog.at_level(logging.INFO, logger="keras_ddpm.data"):
        train = image_indices(data.load_images("celeba", "train", 16, 100, data_dir=folder))
        validation = image_indices(data.load_images("celeba", "validation", 16, 100, data_dir=folder))
    assert sorted(train + validation) == list(range(1, 41))
    assert 3 <= len(validation) <= 20  # 25% of 40, give or take the hash
    assert image_indices(data.load_images("celeba", "test", 16, 100, data_dir=folder)) == validation
    assert sum("held out" in record.getMessage() for record in caplog.records) == 1
    # The hold-out depends on file names only: the same in another folder with the same names.
    twin = flat_images_folder(tmp_path / "twin", 40)
    assert image_indices(data.load_images("celeba", "validation", 16, 100, data_dir=twin)) == validation


def test_corrupt_files_are_skipped_counted_and_reported_once(tmp_path, caplog):
    folder = flat_images_folder(tmp_path / "img_align_celeba", 4)
    good_jpeg = (folder / "000001.jpg").read_bytes()
    (folder / "000005.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])  # truncated download
    (folder / "000006.jpg").write_bytes(b"")
    (folder / "000007.jpg").write_text("<html>quota exceeded</html>")
    (folder / "notes.txt").write_text("not a face")
    with caplog.at_level(logging.WARNING, logger="keras_ddpm.data"):
        for _ in range(2):
            dataset = data.make_dataset("celeba", "validation", 16, 8, data_dir=tmp_path, holdout_fraction=0.99)
            assert sum(batch.shape[0] for batch in dataset) == 4
    reports = [record.getMessage() for record in caplog.records if "Skipped" in record.getMessage()]
    assert len(reports) == 1
    assert "Skipped 4 of 8 files" in reports[0]
    for name in ("000005.jpg (truncated JPEG)", "000006.jpg (empty)", "000007.jpg", "notes.txt"):
        assert name in reports[0]


def test_a_binary_partition_file_is_named_in_the_error(tmp_path):
    flat_images_folder(tmp_path / "img_align_celeba", 2)
    (tmp_path / "list_eval_partition.txt").write_bytes(bytes(range(128, 256)))
    with pytest.raises(ValueError, match="list_eval_partition.txt is not a text file"):
        data.make_dataset("celeba", data_dir=tmp_path)


def test_missing_or_empty_folder_says_where_and_how_to_get_celeba(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*img_align_celeba\.zip"):
        data.make_dataset("celeba", data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"(?s)No CelebA images in .*empty.*img_align_celeba\.zip"):
        data.make_dataset("celeba", data_dir=(tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_grayscale_and_rgba_images_get_the_models_channels(tmp_path):
    gray = np.tile(np.arange(0, 218, dtype=np.uint8)[:, None, None], (1, 178, 1))
    write_image(tmp_path / "000001.png", gray)
    write_image(tmp_path / "000002.png", np.concatenate([coordinate_image(178, 218), gray], axis=-1))  # RGBA
    rgb = data.load_images("celeba", "train", 32, 2, data_dir=tmp_path, holdout_fraction=0.0)
    assert rgb.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(rgb[0, ..., 0], rgb[0, ..., 2])  # gray replicated
    assert np.all(rgb[1, ..., 2] == 128)  # alpha dropped, colour kept
    one_channel = data.load_images("celeba", "train", 32, 2, data_dir=tmp_path, holdout_fraction=0.0, channels=1)
    assert one_channel.shape == (2, 32, 32, 1)


def test_upsampling_needs_permission(tmp_path):
    write_image(tmp_path / "000001.jpg", coordinate_image(89, 109))
    with pytest.raises(ValueError, match=r"image_size 128 .* 64x64-pixel crop box.*allow_upsample=True"):
        data.make_dataset("celeba", "train", 128, data_dir=tmp_path, holdout_fraction=0.0)
    (image,) = data.load_images("celeba", "train", 128, 1, data_dir=tmp_path, holdout_fraction=0.0, allow_upsample=True)
    assert image.shape == (128, 128, 3)
    with pytest.raises(ValueError, match="allow_upsample"):
        data.make_dataset("fashion_mnist", "train", 32)


def test_every_image_is_checked_and_a_mixed_resolution_folder_works_image_by_image(tmp_path, caplog):
    write_image(tmp_path / "000000.png", np.zeros([1, 1, 3], np.uint8))  # first in order: no longer decides
    write_image(tmp_path / "000001.jpg", coordinate_image(178, 218))  # full size
    write_image(tmp_path / "000002.jpg", coordinate_image(89, 109))  # half size
    write_image(tmp_path / "000003.png", np.zeros([400, 400, 3], np.uint8))  # not an aligned CelebA image
    with caplog.at_level(logging.WARNING, logger="keras_ddpm.data"):
        full, half = data.load_images("celeba", "train", 64, 4, data_dir=tmp_path, holdout_fraction=0.0)
    assert "Skipped 2 of 4 images" in caplog.text and "000000.png" in caplog.text and "000003.png" in caplog.text
    assert np.abs(full.astype(int) - half.astype(int)).mean() < 3  # the same box at either resolution
    only_full = data.load_images("celeba", "train", 128, 4, data_dir=tmp_path, holdout_fraction=0.0)
    assert only_full.shape == (1, 128, 128, 3)  # the half-size box holds 64 pixels: skipped, not upsampled


def test_a_folder_of_images_too_small_says_so_without_a_wrong_hint(tmp_path):
    write_image(tmp_path / "000001.png", np.zeros([1, 1, 3], np.uint8))
    with pytest.raises(ValueError, match="image_size 16 is larger") as error:
        data.make_dataset("celeba", "train", 16, data_dir=tmp_path, holdout_fraction=0.0)
    assert "<= 0" not in str(error.value)


def test_training_flips_drops_remainder_and_repeats(tmp_path):
    write_image(tmp_path / "000001.png", coordinate_image(89, 109))
    dataset = data.make_dataset("celeba", "train", 16, batch_size=32, data_dir=tmp_path, holdout_fraction=0.0)
    images = next(iter(dataset)).numpy()
    assert images.shape == (32, 16, 16, 3)  # one image repeated into a full batch
    red_rises_to_the_right = images[:, 0, -1, 0] > images[:, 0, 0, 0]
    assert 0 < red_rises_to_the_right.sum() < 32  # some mirrored, some not
    same_seed = data.make_dataset("celeba", "train", 16, batch_size=32, data_dir=tmp_path, holdout_fraction=0.0)
    np.testing.assert_array_equal(next(iter(same_seed)), images)
    with pytest.raises(ValueError, match="no class labels"):
        data.make_dataset("celeba", with_labels=True, data_dir=tmp_path)


def test_a_stream_started_at_batch_n_is_the_stream_after_n_batches(tmp_path):
    """What a run resumed at step N trains on: the images and flips an uninterrupted run had from batch N on."""
    rng = np.random.default_rng(0)
    for index in range(1, 11):  # noise images: each one is told apart, and so is its mirror image
        write_image(tmp_path / f"{index:06d}.png", rng.integers(0, 256, (44, 36, 3), np.uint8))
    options = dict(batch_size=4, data_dir=tmp_path, holdout_fraction=0.0)  # 2.5 batches an epoch
    uninterrupted = list(data.make_dataset("celeba", "train", 16, **options).take(9).as_numpy_iterator())
    resumed = list(data.make_dataset("celeba", "train", 16, start_batch=6, **options).take(3).as_numpy_iterator())
    np.testing.assert_array_equal(np.stack(resumed), np.stack(uninterrupted[6:]))
    assert not np.array_equal(resumed[0], uninterrupted[0])
    with pytest.raises(ValueError, match="start_batch must be >= 0, and 0 unless training"):
        data.make_dataset("celeba", "validation", 16, start_batch=2, **options)


@pytest.mark.parametrize(
    "name, image_size, shape",
    [("celeba_tfds", 32, (32, 32, 3)), ("fashion_mnist", 28, (28, 28, 1)), ("cifar10", 32, (32, 32, 3))],
)
def test_tfds_paths(tmp_path, name, image_size, shape):
    with_labels = data.dataset_info(name).num_classes > 0
    with tfds.testing.mock_data(num_examples=6):
        dataset = data.make_dataset(name, "test", image_size, 4, data_dir=tmp_path, with_labels=with_labels)
        batches = list(dataset)
    images = np.concatenate([batch[0] if with_labels else batch for batch in batches])
    assert images.shape == (6,) + shape and images.dtype == np.float32
    assert -1.0 <= images.min() < images.max() <= 1.0
    if with_labels:
        labels = batches[0][1]
        assert labels.dtype == tf.int32 and 0 <= int(tf.reduce_min(labels)) <= int(tf.reduce_max(labels)) < 10


@pytest.fixture
def tfds_download_fails(monkeypatch):
    def fail(*args, **kwargs):
        raise ConnectionError("Google Drive quota exceeded")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)


def test_celeba_tfds_download_failure_points_to_the_image_folder(tmp_path, tfds_download_fails):
    with pytest.raises(RuntimeError, match=r"(?s)quota exceeded.*make_dataset\('celeba', data_dir="):
        data.make_dataset("celeba_tfds", data_dir=tmp_path)


def test_keras_datasets_fallback(tmp_path, monkeypatch, tfds_download_fails):
    train = (np.full((5, 28, 28), 255, np.uint8), np.arange(5, dtype=np.uint8))
    test = (np.zeros((3, 28, 28), np.uint8), np.arange(3, dtype=np.uint8))
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", lambda: (train, test))
    images, labels = next(iter(data.make_dataset("fashion_mnist", "test", 28, 8, with_labels=True, data_dir=tmp_path)))
    assert images.shape == (3, 28, 28, 1) and np.all(images == -1.0)
    assert labels.dtype == tf.int32 and labels.numpy().tolist() == [0, 1, 2]

    def offline():
        raise OSError("Name or service not known")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(RuntimeError, match=r"(?s)TFDS failed.*keras.datasets failed.*internet"):
        data.make_dataset("fashion_mnist", data_dir=tmp_path)  # default image_size: 28


def test_both_resolutions_of_a_face_give_the_same_64x64_image(celeba_dir):
    if not (celeba_dir / "img_align_celeba").is_dir():
        pytest.skip(f"needs the full-size img_align_celeba/ beside img_align_celeba_half/ in {celeba_dir}")
    full, half = (
        data.load_images("celeba", "train", 64, 16, data_dir=celeba_dir / folder).astype(np.float32)
        for folder in ("img_align_celeba", "img_align_celeba_half")
    )
    same_face_error = np.abs(full - half).mean()
    other_face_error = np.abs(full - np.roll(half, 1, axis=0)).mean()
    # Resampling and JPEG re-encoding (~3 levels), against ~40 levels between different faces.
    assert same_face_error < 5.0, same_face_error
    assert other_face_error > 5 * same_face_error


def test_shared_subset_holds_out_a_quarter_for_validation(celeba_dir):
    if len(list((celeba_dir / "img_align_celeba_half").glob("*.jpg"))) != 8000:
        pytest.skip(f"needs the shared 8,000-image subset (../shared/data/celeba), not the copy in {celeba_dir}")
    validation = data.load_images("celeba", "validation", 32, 10_000, data_dir=celeba_dir)
    train = data.make_dataset("celeba", "train", 32, 1000, data_dir=celeba_dir, training=False, cache=None)
    assert 1800 <= len(validation) <= 2200
    assert len(validation) + sum(batch.shape[0] for batch in train) == 8000
    batch = next(iter(data.make_dataset("celeba", "train", 64, 16, data_dir=celeba_dir)))
    assert batch.shape == (16, 64, 64, 3) and batch.dtype == tf.float32
    assert -1.0 <= float(tf.reduce_min(batch)) < float(tf.reduce_max(batch)) <= 1.0
