import os
import pathlib
import types

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# pytest-xdist runs one worker per core: one TF compute thread each (scripts they start inherit it), rather than
# every worker's thread pool spinning on every core.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]
CELEBA_DIR = pathlib.Path(os.environ.get("CELEBA_DIR", REPO.parent / "shared" / "data" / "celeba"))


@pytest.fixture
def celeba_dir():
    """The shared CelebA subset; tests that use it skip on machines without it."""
    if not (CELEBA_DIR / "img_align_celeba_half").is_dir():
        pytest.skip(f"CelebA data not found at {CELEBA_DIR} (set CELEBA_DIR to the folder holding img_align_celeba*/)")
    return CELEBA_DIR


def pytest_collection_modifyitems(items):
    """Every test that reads CelebA through `celeba_dir` carries the `celeba` marker: `-m "not celeba"` leaves out
    all of them."""
    for item in items:
        if "celeba_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.celeba)


@pytest.fixture(autouse=True)
def _float32_and_seed_0():
    """Every test starts under float32 with Python's, NumPy's and TensorFlow's global generators seeded by 0, so
    its random draws do not depend on which tests ran before it in its worker (pytest-xdist deals test files out
    to workers in no fixed order, and `-k` leaves tests out); it ends under float32, whatever policy it set."""
    import keras

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy("float32")
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def gaussian_generator(schedule, mu: float, std: float, image_shape):
    """What a sampler needs of a `Generator`, with the exact epsilon-prediction for N(mu, std^2) data: a denoiser
    whose samples have a known distribution (tests of the benchmark samplers)."""
    import tensorflow as tf

    def network_output(inputs):
        x_t, t = inputs
        signal_rates, noise_rates = schedule.rates(t)
        alpha_bar = tf.square(signal_rates)
        return noise_rates * (x_t - signal_rates * mu) / (alpha_bar * std**2 + 1.0 - alpha_bar)

    return types.SimpleNamespace(schedule=schedule, objective="epsilon", image_shape=image_shape,
                                 network_output=network_output, max_batch_size=None)
