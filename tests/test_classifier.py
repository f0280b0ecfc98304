"""Tests of keras_ddpm.metrics.classifier: the diversity measure against closed forms, and a classifier that learns."""

import numpy as np
import pytest

from keras_ddpm.metrics import classifier as judge


def test_mean_pairwise_distance_closed_forms():
    black, white = np.zeros((1, 4, 4, 1), np.uint8), np.full((1, 4, 4, 1), 255, np.uint8)
    assert judge.mean_pairwise_distance(np.concatenate([black, black, black])) == 0.0
    assert judge.mean_pairwise_distance(np.concatenate([black, white])) == pytest.approx(1.0)
    # Pairs (black, white) = 1, (black, black) = 0, twice (black, white): mean 2/3.
    assert judge.mean_pairwise_distance(np.concatenate([black, black, white])) == pytest.approx(2 / 3)
    noise = np.random.default_rng(0).integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
    assert judge.mean_pairwise_distance(noise) == pytest.approx(np.sqrt(1 / 6), abs=0.01)  # uniform [0, 1]
    with pytest.raises(ValueError, match="at least 2"):
        judge.mean_pairwise_distance(black)


def test_classifier_learns_bright_from_dark():
    """Two classes any classifier must tell apart: dark and bright noise images."""
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2
    images = (rng.integers(0, 100, (200, 12, 12, 1)) + 150 * labels[:, None, None, None]).astype(np.uint8)
    classifier = judge.train_classifier(images[:150], labels[:150], num_classes=2, epochs=5)
    assert judge.accuracy(classifier, images[150:], labels[150:]) > 0.95
    assert judge.accuracy(classifier, images[150:], 1 - labels[150:]) < 0.05
