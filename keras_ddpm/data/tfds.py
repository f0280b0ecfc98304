"""Datasets from TensorFlow Datasets (CelebA, Fashion-MNIST, CIFAR-10), with `keras.datasets` as the fallback.

TFDS downloads need internet; where it fails, Fashion-MNIST and CIFAR-10 come from `keras.datasets`.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf

from keras_ddpm.data.celeba import CELEBA_HELP, CELEBA_WIDTH, _check_source_size, crop_and_resize
from keras_ddpm.data.common import SHUFFLE_BUFFER_LIMIT, SPLITS

logger = logging.getLogger(__name__)


_TFDS_NAMES = {"celeba_tfds": "celeb_a", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10"}


_TFDS_SPLITS = {"celeba_tfds": SPLITS, "fashion_mnist": ("train", "test"), "cifar10": ("train", "test")}


_NATIVE_SIZE = {"fashion_mnist": 28, "cifar10": 32}


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
