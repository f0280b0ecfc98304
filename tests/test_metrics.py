"""Tests for keras_ddpm.metrics: SWD on synthetic images, FID/KID against closed forms, InceptionV3 plumbing."""

import os
import warnings

import keras
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage

from keras_ddpm import metrics

# ----------------------------------------------------------------------------------------------------
# Synthetic images with structure: soft-edged ellipses on smooth colour gradients
# ----------------------------------------------------------------------------------------------------


def random_shapes(num_images: int, size: int = 64, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 [N, size, size, channels]: 4 random ellipses with 1-2 pixel soft edges on a colour gradient."""
    rng = np.random.default_rng(seed)
    coordinates = np.linspace(0.0, 1.0, size)
    y, x = np.meshgrid(coordinates, coordinates, indexing="ij")
    start_colour, end_colour = rng.uniform(0, 255, (2, num_images, 1, 1, channels))
    images = start_colour + (end_colour - start_colour) * ((x + y) / 2)[None, :, :, None]
    for _ in range(4):
        centre = rng.uniform(0.1, 0.9, (2, num_images, 1, 1))
        radius = rng.uniform(0.08, 0.3, (2, num_images, 1, 1))
        distance = np.hypot((y - centre[0]) / radius[0], (x - centre[1]) / radius[1])
        inside = (1.0 / (1.0 + np.exp(12.0 * (distance - 1.0))))[..., None]
        colour = rng.uniform(0, 255, (num_images, 1, 1, channels))
        images = images * (1.0 - inside) + colour * inside
    return np.round(images).clip(0, 255).astype(np.uint8)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    blurred = scipy.ndimage.gaussian_filter(images.astype(np.float32), (0, sigma, sigma, 0))
    return np.round(blurred).clip(0, 255).astype(np.uint8)


def add_noise(images: np.ndarray, std: float, seed: int = 1) -> np.ndarray:
    noisy = images + np.random.default_rng(seed).normal(0.0, std, images.shape)
    return np.round(noisy).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def shapes_64():
    return random_shapes(192, size=64)


@pytest.fixture(scope="module")
def swd_identical(shapes_64):
    return metrics.sliced_wasserstein_distance(shapes_64, shapes_64)


# ----------------------------------------------------------------------------------------------------
# SWD
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(64, 64), (40, 36)])
def test_laplacian_pyramid_levels_sum_back_to_the_image(height, width):
    images = np.random.default_rng(0).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    levels = metrics.laplacian_pyramid(images, min_resolution=16)

    # 64 -> 32 -> 16; 36 -> 18 (9 would be below 16), with ceil halving for odd sizes.
    expected_heights = [64, 32, 16] if height == 64 else [40, 20]
    assert [level.shape[1] for level in levels] == expected_heights
    reconstruction = levels[-1]
    for level in reversed(levels[:-1]):
        reconstruction = level + metrics.swd._pyramid_up(reconstruction, *level.shape[1:3])
    np.testing.assert_allclose(reconstruction, images.astype(np.float32), atol=1e-3)


def test_swd_keys_follow_the_pyramid_resolutions(swd_identical):
    assert list(swd_identical) == ["swd_64", "swd_32", "swd_16", "swd_mean"]
    assert swd_identical["swd_mean"] == pytest.approx(np.mean([swd_identical[f"swd_{r}"] for r in (64, 32, 16)]))


def test_swd_of_identical_sets_is_at_the_sampling_floor(shapes_64, swd_identical):
    # Both sets draw their patches independently, so identical sets differ only by sampling: the 1-D
    # Wasserstein distance of two samples of M unit-variance points is of order sqrt(2 / M).
    num_patches = 128 * len(shapes_64)
    sampling_floor = 1e3 * 2.0 * np.sqrt(2.0 / num_patches)
    for key, value in swd_identical.items():
        assert 0.0 < value < sampling_floor, key
    # A mild blur is far above that floor at the finest level.
    blurred = metrics.sliced_wasserstein_distance(shapes_64, gaussian_blur(shapes_64, 1.0))
    assert blurred["swd_64"] > 2 * sampling_floor


def test_swd_rises_monotonically_with_blur(shapes_64, swd_identical):
    distances = [swd_identical] + [
        metrics.sliced_wasserstein_distance(shapes_64, gaussian_blur(shapes_64, sigma)) for sigma in (0.7, 1.4, 2.8)
    ]
    for key in ("swd_64", "swd_mean"):
        values = [distance[key] for distance in distances]
        assert np.all(np.diff(values) > 0), (key, values)


def test_swd_rises_monotonically_with_noise(shapes_64, swd_identical):
    distances = [swd_identical] + [
        metrics.sliced_wasserstein_distance(shapes_64, add_noise(shapes_64, std)) for std in (2.0, 6.0, 18.0)
    ]
    for key in ("swd_64", "swd_32", "swd_mean"):
        values = [distance[key] for distance in distances]
        assert np.all(np.diff(values) > 0), (key, values)


def test_swd_is_deterministic_for_a_seed():
    images_a = random_shapes(48, size=32, seed=0)
    images_b = random_shapes(48, size=32, seed=1)
    first = metrics.sliced_wasserstein_distance(images_a, images_b, seed=3)
    second = metrics.sliced_wasserstein_distance(images_a, images_b, seed=3)
    other_seed = metrics.sliced_wasserstein_distance(images_a, images_b, seed=4)
    assert first == second
    assert first["swd_32"] != other_seed["swd_32"]


def test_swd_accepts_grayscale_and_sets_of_different_sizes():
    images_a = random_shapes(40, size=16, channels=1, seed=0)
    images_b = random_shapes(25, size=16, channels=1, seed=1)
    distances = metrics.sliced_wasserstein_distance(images_a, images_b)
    assert list(distances) == ["swd_16", "swd_mean"]
    assert np.isfinite(distances["swd_16"]) and distances["swd_16"] > 0


@pytest.mark.parametrize(
    "images_b, message",
    [
        (np.zeros((4, 32, 32, 3), np.float32), "uint8"),
        (np.zeros((4, 16, 16, 3), np.uint8), "same height, width and channels"),
        (np.zeros((32, 32, 3), np.uint8), r"\[N, H, W, C\]"),
    ],
)
def test_swd_rejects_bad_input_with_clear_errors(images_b, message):
    images_a = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        metrics.sliced_wasserstein_distance(images_a, images_b)


def test_swd_rejects_images_smaller_than_the_coarsest_level():
    images = np.zeros((4, 12, 12, 3), np.uint8)
    with pytest.raises(ValueError, match="min_resolution"):
        metrics.sliced_wasserstein_distance(images, images)


# ----------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------


def test_frechet_distance_matches_closed_form_for_exact_gaussians():
    # For covariances A and A^2 (A not diagonal) the square root of A A^2 is A^(3/2), so the trace term is
    # Tr(A + A^2 - 2 A^(3/2)) = sum over the eigenvalues l of A of (sqrt(l) - l)^2.
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    eigenvalues = rng.uniform(0.2, 3.0, 6)
    covariance = rotation @ np.diag(eigenvalues) @ rotation.T
    mean_a, mean_b = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(eigenvalues) - eigenvalues) ** 2)
    actual = metrics.frechet_distance(mean_a, covariance, mean_b, covariance @ covariance)
    assert actual == pytest.approx(expected, rel=1e-9)


def test_fid_of_features_drawn_from_two_gaussians_matches_closed_form():
    # Diagonal covariances: d^2 = ||mu1 - mu2||^2 + sum (s1 + s2 - 2 sqrt(s1 s2)) = 4.111.
    mean_a, mean_b = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 1.0, 0.0, 1.0])
    variance_a, variance_b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 1.0, 0.5, 0.25])
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum(variance_a + variance_b - 2 * np.sqrt(variance_a * variance_b))
    rng = np.random.default_rng(0)
    features_a = mean_a + np.sqrt(variance_a) * rng.standard_normal((100_000, 4))
    features_b = mean_b + np.sqrt(variance_b) * rng.standard_normal((100_000, 4))
    # With 100k samples the estimate scatters by about 0.02 (0.5 %); 3 % is a 6-sigma tolerance.
    assert metrics.fid_from_features(features_a, features_b) == pytest.approx(expected, rel=0.03)


def test_fid_of_a_set_against_itself_is_zero():
    features = np.random.default_rng(0).standard_normal((500, 16)) * 3.0 + 1.0
    assert metrics.fid_from_features(features, features) == pytest.approx(0.0, abs=1e-8)


def test_fid_stays_finite_when_covariances_are_singular():
    # Fewer samples than dimensions: rank-deficient covariances, as with a small N on 2048-d features.
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distance = metrics.fid_from_features(rng.standard_normal((10, 32)), rng.standard_normal((10, 32)) + 1.0)
    assert np.isfinite(distance) and distance > 32 * 0.9  # the mean shift alone contributes 32


def test_frechet_distance_falls_back_to_an_offset_when_the_square_root_fails(monkeypatch):
    # Older SciPy returns inf/nan for the square root of some singular products; simulate that once.
    exact_sqrtm = scipy.linalg.sqrtm
    calls = []

    def failing_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else exact_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    variance_a, variance_b = np.array([1.0, 0.0, 2.0]), np.array([0.5, 0.0, 2.0])  # singular: a zero variance
    with pytest.warns(UserWarning, match="singular"):
        distance = metrics.frechet_distance(np.zeros(3), np.diag(variance_a), np.zeros(3), np.diag(variance_b), eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], np.diag((variance_a + 1e-6) * (variance_b + 1e-6)))
    expected = np.sum(variance_a + variance_b - 2 * np.sqrt(variance_a * variance_b))
    assert distance == pytest.approx(expected, abs=1e-4)  # the offset moves the result by O(sqrt(eps))


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same D"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------------


def test_kid_is_zero_in_expectation_for_the_same_distribution():
    # Independent pairs of small sets; an estimator that kept the k(x_i, x_i) terms would be biased
    # upwards by about 2 (E k(x, x) - E k(x, y)) / m, dozens of standard errors here.
    rng = np.random.default_rng(0)
    estimates = [
        metrics.kid_from_features(rng.standard_normal((50, 16)), rng.standard_normal((50, 16)), num_subsets=1)[0]
        for _ in range(300)
    ]
    standard_error = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates)) < 4 * standard_error


def test_kid_is_clearly_positive_for_different_distributions():
    rng = np.random.default_rng(0)
    features_a = rng.standard_normal((1000, 64))
    same_mean, same_std = metrics.kid_from_features(features_a, rng.standard_normal((1000, 64)), subset_size=200)
    shifted_mean, shifted_std = metrics.kid_from_features(
        features_a, rng.standard_normal((1000, 64)) + 0.3, subset_size=200
    )
    assert shifted_mean > 10 * shifted_std
    assert shifted_mean > 20 * abs(same_mean)


def test_kid_caps_the_subset_size_and_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    features_a, features_b = rng.standard_normal((30, 8)), rng.standard_normal((20, 8)) + 1.0
    first = metrics.kid_from_features(features_a, features_b, num_subsets=10, subset_size=1000, seed=1)
    assert first == metrics.kid_from_features(features_a, features_b, num_subsets=10, subset_size=1000, seed=1)
    assert np.isfinite(first).all() and first[0] > 0


# ----------------------------------------------------------------------------------------------------
# InceptionV3 features and the real-statistics cache
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_inception():
    return metrics.load_inception(weights=None)


def test_inception_features_resize_any_input_to_2048_features(random_inception):
    rng = np.random.default_rng(0)
    small_rgb = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    features = metrics.inception_features(small_rgb, random_inception, batch_size=1, verbose=False)
    assert features.shape == (2, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all()
    # Batching does not change the result.
    one_batch = metrics.inception_features(small_rgb, random_inception, batch_size=50, verbose=False)
    np.testing.assert_allclose(features, one_batch, rtol=1e-4, atol=1e-5)

    grayscale = rng.integers(0, 256, (1, 48, 40, 1), dtype=np.uint8)
    grayscale_features = metrics.inception_features(grayscale, random_inception, verbose=False)
    as_rgb_features = metrics.inception_features(np.repeat(grayscale, 3, axis=-1), random_inception, verbose=False)
    np.testing.assert_allclose(grayscale_features, as_rgb_features, rtol=1e-5, atol=1e-6)


def test_real_statistics_are_computed_once_then_loaded(tmp_path, random_inception):
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    calls = []

    def compute_features():
        calls.append(1)
        return metrics.inception_features(images, random_inception, verbose=False)

    key = "synthetic/train 16px n=2 weights=None"
    first = metrics.cached_real_statistics(str(tmp_path / "cache"), key, compute_features)
    second = metrics.cached_real_statistics(str(tmp_path / "cache"), key, compute_features)

    assert len(calls) == 1
    assert len(os.listdir(tmp_path / "cache")) == 1
    assert first.features.shape == (2, 2048) and first.features.dtype == np.float64
    for computed, loaded in zip(first, second):
        np.testing.assert_array_equal(computed, loaded)
    mu, sigma = metrics.feature_statistics(first.features)
    np.testing.assert_allclose(first.mu, mu)
    np.testing.assert_allclose(first.sigma, sigma)


def test_real_statistics_cache_separates_keys_and_survives_a_corrupt_file(tmp_path):
    calls = []

    def compute_features():
        calls.append(1)
        return np.random.default_rng(len(calls)).standard_normal((10, 4))

    cache_dir = str(tmp_path)
    metrics.cached_real_statistics(cache_dir, "celeba_train_64_1000", compute_features)
    metrics.cached_real_statistics(cache_dir, "celeba_train_64_2000", compute_features)
    assert len(calls) == 2

    (cache_file,) = [name for name in os.listdir(cache_dir) if "1000" in name]
    with open(os.path.join(cache_dir, cache_file), "wb") as broken:
        broken.write(b"not an npz file")
    with pytest.warns(UserWarning, match="recomputing"):
        metrics.cached_real_statistics(cache_dir, "celeba_train_64_1000", compute_features)
    assert len(calls) == 3


def test_load_inception_explains_how_to_get_weights_for_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        metrics.load_inception(weights=str(tmp_path / "no_such_inception.h5"))
    assert "--inception_weights=path.h5" in str(error.value)
    assert "internet" in str(error.value)


def test_load_inception_explains_how_to_get_weights_for_a_broken_file(tmp_path):
    bogus = tmp_path / "inception.h5"
    bogus.write_bytes(b"this is not an HDF5 file")
    with pytest.raises(ValueError) as error:
        metrics.load_inception(weights=str(bogus))
    assert "--inception_weights=path.h5" in str(error.value)
    assert metrics.INCEPTION_WEIGHTS_URL in str(error.value)


def test_load_inception_explains_a_failed_imagenet_download(monkeypatch):
    def offline_inception(**kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- Name or service not known")

    monkeypatch.setattr(keras.applications, "InceptionV3", offline_inception)
    with pytest.raises(RuntimeError) as error:
        metrics.load_inception(weights="imagenet")
    message = str(error.value)
    assert "URL fetch failure" in message
    assert "--inception_weights=path.h5" in message and "internet" in message
