"""A small CNN that says which class a generated image shows, and diversity within a class.

Class-conditional samples are judged by a classifier trained on real images only (no pretrained weights):
the fraction of samples it puts in the class that was asked for is the samples' *class accuracy*. It is
only as good as the classifier, so it is always reported next to the classifier's accuracy on held-out
real images: a perfect sampler would score about that, not 100%.

    classifier = train_classifier(train_images, train_labels, num_classes=10)
    accuracy(classifier, held_out_images, held_out_labels)   # tests/test_classifier.py runs these steps
"""

from __future__ import annotations

import keras
import numpy as np

from keras_ddpm.metrics.images import rms_distances


def build_classifier(image_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """Four 3x3 conv layers, two poolings and two dense layers (about 470k weights)."""
    return keras.Sequential(
        [
            keras.Input(image_shape),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            # Flatten, not global pooling: where the parts sit (sleeves, collar, heel) tells the classes apart.
            keras.layers.Flatten(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(num_classes),
        ],
        name="class_judge",
    )


def to_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 images [N, H, W, C] -> float32 in [-1, 1], the scale the diffusion models use."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int = 20,
                     seed: int = 0) -> keras.Model:
    """A classifier trained on uint8 `images` with int `labels` (shifted by up to 2 pixels, for robustness)."""
    keras.utils.set_random_seed(seed)
    network = build_classifier(images.shape[1:], num_classes)
    # Small random shifts: the only augmentation that keeps a garment the same garment (no flips, see data.py).
    model = keras.Sequential([keras.layers.RandomTranslation(2 / images.shape[1], 2 / images.shape[2],
                                                             fill_mode="constant", fill_value=-1.0, seed=seed),
                              network])
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(to_inputs(images), labels, epochs=epochs, batch_size=64, verbose=0)
    return network


def predict_classes(classifier: keras.Model, images: np.ndarray) -> np.ndarray:
    """The classifier's class for each uint8 image."""
    return classifier.predict(to_inputs(images), batch_size=256, verbose=0).argmax(axis=-1)


def accuracy(classifier: keras.Model, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images put in their class by the classifier."""
    return float(np.mean(predict_classes(classifier, images) == np.asarray(labels)))


def mean_pairwise_distance(images: np.ndarray) -> float:
    """Mean root-mean-square pixel difference (on a 0-1 scale) over all pairs of distinct images.

    A diversity measure: identical images give 0, and two independent uniform-noise images about 0.41.
    """
    if len(images) < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 images, got {len(images)}.")
    distances = rms_distances(images, images) / 255.0
    return float(distances[np.triu_indices(len(images), k=1)].mean())
