"""Classifier-free guidance end to end: a briefly trained conditional model draws the shape it is asked for.

The synthetic dataset has four labelled shapes (disc, square, triangle, ring). A small CNN trained on real
shapes is the measuring instrument; the test checks it first, then scores the diffusion model's samples by how
often the CNN sees the requested shape. Chance is 1/4; a model that ignored its labels would sit there.
"""

import keras
import numpy as np
import pytest

from keras_ddpm.data import SYNTHETIC_SHAPES, make_dataset
from keras_ddpm.model import DiffusionModel
from keras_ddpm.schedule import NoiseSchedule
from keras_ddpm.unet import build_unet

SIZE = 16
NUM_CLASSES = len(SYNTHETIC_SHAPES)
SAMPLES_PER_CLASS = 32


def labelled_shapes(split: str, count: int):
    """`count` grayscale shapes of one split as (images in [-1, 1], labels); grayscale is quicker to learn."""
    dataset = make_dataset("synthetic", split, image_size=SIZE, batch_size=count, with_labels=True,
                           training=False, num_images=count, cache=None, channels=1)
    images, labels = next(iter(dataset))
    return images.numpy(), labels.numpy()


def shape_classifier(images, labels) -> keras.Model:
    keras.utils.set_random_seed(0)
    classifier = keras.Sequential([
        keras.Input((SIZE, SIZE, 1)),
        keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu", padding="same"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(NUM_CLASSES),
    ])
    classifier.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    classifier.fit(images, labels, epochs=20, batch_size=64, verbose=0)
    return classifier


def conditional_model(images, labels) -> DiffusionModel:
    """1,280 steps of a small conditional U-Net (cosine schedule, v-prediction, label dropout 0.1)."""
    keras.utils.set_random_seed(0)
    network = build_unet(SIZE, channels=1, width=32, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=8,
                         num_classes=NUM_CLASSES, bottleneck_attention=False)
    model = DiffusionModel(network, NoiseSchedule("cosine", 1000), objective="v", ema_decay=0.99, label_dropout=0.1)
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    model.fit(images, labels, batch_size=32, epochs=10, verbose=0)
    return model


@pytest.mark.slow  # trains a conditional model and a checker CNN: minutes on a CPU
def test_guided_samples_show_the_requested_shape():
    train_images, train_labels = labelled_shapes("train", 4096)
    test_images, test_labels = labelled_shapes("test", 512)
    classifier = shape_classifier(train_images, train_labels)
    _, accuracy = classifier.evaluate(test_images, test_labels, verbose=0)
    assert accuracy > 0.85, f"the shape classifier is too weak to judge samples: {accuracy:.2f} on real shapes"

    model = conditional_model(train_images, train_labels)
    requested = np.repeat(np.arange(NUM_CLASSES), SAMPLES_PER_CLASS)

    def matches(guidance):
        samples = model.generate(seeds=np.arange(len(requested)), steps=20, labels=requested, guidance=guidance)
        seen = classifier.predict(samples.astype(np.float32) / 127.5 - 1.0, verbose=0).argmax(-1)
        return seen == requested

    guided_matches = matches(5.0)
    unguided, guided = np.mean(matches(1.0)), np.mean(guided_matches)
    per_shape = ", ".join(f"{name} {np.mean(guided_matches[requested == label]):.0%}"
                          for label, name in enumerate(SYNTHETIC_SHAPES))
    print(f"\nclassifier accuracy on real shapes {accuracy:.1%}; requested shape seen in {unguided:.1%} of samples "
          f"at guidance 1, {guided:.1%} at guidance 5 ({per_shape})")  # shown by pytest -s
    # Chance is 0.25; at 128 samples, 0.5 is six and a half standard deviations above it.
    assert guided >= 0.5, f"guided samples show the requested shape {guided:.0%} of the time (chance 25%)"
    assert guided > unguided, f"guidance 5 ({guided:.0%}) should follow the label more than guidance 1 ({unguided:.0%})"
