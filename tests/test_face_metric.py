"""The face metric (keras_ddpm.metrics.face): landmark geometry in closed form, offline weights, real CelebA faces.

The Frechet distance itself is checked against closed forms in test_metrics.py; here the landmark
normalisation and the distance of known geometry shifts, then MTCNN on real faces (tests that need
CelebA skip without it): real vs real is near zero, broken faces (lower half shifted 3 px) are far from it.
"""

import functools
import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from keras_ddpm import callbacks, evaluation
from keras_ddpm.metrics import face as face_metric
from keras_ddpm.data import load_images

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import face_scale  # noqa: E402  (bench/face_scale.py: the calibration's degradations)

NUM_FACES = 300  # per set: enough for stable distances, a few seconds of MTCNN


def random_landmarks(count: int, seed: int) -> np.ndarray:
    """[count, 5, 2] face-like landmarks in the eyes' frame: eyes at (-0.5, 0) and (0.5, 0), nose and mouth jittered."""
    landmarks = np.tile([[-0.5, 0.0], [0.5, 0.0], [0.0, 0.6], [-0.45, 1.05], [0.45, 1.05]], (count, 1, 1))
    landmarks[:, 2:] += 0.05 * np.random.default_rng(seed).standard_normal((count, 3, 2))
    return landmarks


def similarity_transform(landmarks: np.ndarray, seed: int) -> np.ndarray:
    """Each face rotated, scaled and moved by its own random similarity transform."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(-0.5, 0.5, len(landmarks))
    scale = rng.uniform(5.0, 40.0, len(landmarks))
    rotation = np.stack([np.stack([np.cos(angle), -np.sin(angle)], -1), np.stack([np.sin(angle), np.cos(angle)], -1)], 1)
    return scale[:, None, None] * np.einsum("nij,nkj->nki", rotation, landmarks) + rng.uniform(0, 64, (len(landmarks), 1, 2))


# -- landmark geometry ----------------------------------------------------------------------------------


def test_landmarks_are_normalised_to_the_eyes_frame():
    eyes_nose_mouth = np.array([[[10.0, 20.0], [20.0, 20.0], [15.0, 26.0], [11.0, 30.0], [19.0, 30.0]]])
    geometry = face_metric.normalise_landmarks(eyes_nose_mouth)
    np.testing.assert_allclose(geometry, [[0.0, 0.6, -0.4, 1.0, 0.4, 1.0]], atol=1e-12)


def test_landmark_geometry_ignores_position_size_and_roll():
    landmarks = random_landmarks(50, seed=0)
    np.testing.assert_allclose(face_metric.normalise_landmarks(similarity_transform(landmarks, seed=1)),
                               face_metric.normalise_landmarks(landmarks), atol=1e-9)


def test_landmark_fd_of_a_known_mouth_shift_matches_closed_form():
    """Both mouth corners moved down by d inter-ocular distances, faces posed at random: the FD is 2 d^2.

    In the eyes' frame the two sets differ by a constant shift of the mean, so the covariance term vanishes.
    """
    landmarks = random_landmarks(4000, seed=2)
    shifted = landmarks.copy()
    shifted[:, 3:, 1] += 0.2
    embeddings = [face_metric.FaceEmbedding(np.ones(len(points), bool), np.zeros((len(points), 1)),
                                            face_metric.normalise_landmarks(similarity_transform(points, seed)))
                  for seed, points in enumerate([landmarks, shifted])]
    distance = face_metric.compare_embeddings(*embeddings)["face_landmark_fd"]
    assert distance == pytest.approx(2 * 0.2**2, abs=1e-9)


def test_degenerate_eyes_give_nan_not_an_error():
    assert np.isnan(face_metric.normalise_landmarks(np.zeros((1, 5, 2)))).all()


# -- the networks: offline, lazily imported ----------------------------------------------------------------


def test_weights_load_with_the_network_blocked(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    face_metric.load_face_networks.cache_clear()
    try:
        networks = face_metric.load_face_networks()
        features, landmarks = face_metric.onet_outputs(np.full((2, 32, 32, 3), 128, np.uint8), networks)
    finally:
        face_metric.load_face_networks.cache_clear()  # later tests load without the patch
    assert features.shape == (2, 256) and landmarks.shape == (2, 5, 2)
    assert np.any(features != 0)  # trained weights, not an unbuilt or zero network


def test_networks_are_float32_under_a_mixed_precision_policy():
    import keras

    keras.mixed_precision.set_dtype_policy("mixed_float16")  # conftest restores float32 afterwards
    face_metric.load_face_networks.cache_clear()
    try:
        networks = face_metric.load_face_networks()
    finally:
        face_metric.load_face_networks.cache_clear()
    assert networks.onet.fc5.compute_dtype == "float32"
    assert keras.mixed_precision.dtype_policy().name == "mixed_float16"  # the caller's policy is left alone


def test_mtcnn_is_imported_only_when_the_face_metric_runs():
    code = ("import sys; import keras_ddpm.evaluation, keras_ddpm.callbacks, keras_ddpm.metrics.face; "
            "assert 'mtcnn' not in sys.modules, 'mtcnn imported eagerly'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_face_metric_refuses_grayscale_images():
    with pytest.raises(ValueError, match="RGB"):
        face_metric.embed_faces(np.zeros((4, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match="RGB"):
        callbacks.SWDMonitor(np.zeros((4, 32, 32, 1), np.uint8), face=True)


# -- real CelebA faces ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_real_faces(celeba_dir: str):
    """2 x NUM_FACES real training faces at 32x32 (as the model sees them) and the reference embedding, loaded once."""
    images = load_images("celeba", "train", 32, 2 * NUM_FACES, data_dir=celeba_dir)
    reference, others = images[:NUM_FACES], images[NUM_FACES:]
    return reference, others, face_metric.embed_faces(reference)


@pytest.fixture
def real_faces(celeba_dir):
    return load_real_faces(str(celeba_dir))


def distances_to_reference(real_faces, images):
    embedding = face_metric.embed_faces(images)
    return embedding.found.mean(), face_metric.compare_embeddings(embedding, real_faces[2])


def test_real_faces_are_found_and_near_other_real_faces(real_faces):
    _, others, reference = real_faces
    rate, distances = distances_to_reference(real_faces, others)
    assert reference.found.mean() > 0.97 and rate > 0.97
    # Measured at 300 vs 300: face_fd 0.081, landmark 0.0015 (the finite-sample floor; 0.008 / 0.0004 at 2,000).
    assert distances["face_fd"] < 0.15 and distances["face_landmark_fd"] < 0.003


def test_faces_with_the_lower_half_shifted_are_far_from_real_faces(real_faces):
    _, others, _ = real_faces
    _, real = distances_to_reference(real_faces, others)
    _, shifted = distances_to_reference(real_faces, face_scale.shift_lower_half(others, 3))
    _, blurred = distances_to_reference(real_faces, face_scale.blur(others, 0.5))
    # Measured at 300 vs 300: face_fd 0.39 (real 0.081, blur 0.109), landmark 0.0179 (real 0.0015, blur 0.0016).
    assert shifted["face_fd"] > 3 * real["face_fd"] and shifted["face_landmark_fd"] > 5 * real["face_landmark_fd"]
    # The structural break moves both distances far more than half a pixel of blur does.
    assert shifted["face_fd"] - real["face_fd"] > 5 * (blurred["face_fd"] - real["face_fd"])
    assert shifted["face_landmark_fd"] - real["face_landmark_fd"] > 5 * abs(blurred["face_landmark_fd"] - real["face_landmark_fd"])


def test_images_without_faces_score_badly(real_faces):
    """A model that never draws a face cannot hide: no face found, and its features are far from faces'."""
    noise = np.random.default_rng(0).integers(0, 256, (NUM_FACES, 32, 32, 3), dtype=np.uint8)
    rate, distances = distances_to_reference(real_faces, noise)
    assert rate < 0.05  # measured: 0 of 300
    assert distances["face_fd"] > 2.0 and distances["face_landmark_fd"] > 0.03  # measured: 7.3 and 0.32


def test_evaluate_reports_the_face_keys_next_to_the_real_floor(real_faces, celeba_dir):
    reference, others, _ = real_faces
    results = evaluation.evaluate(samples=others[:64], dataset="celeba", data_dir=str(celeba_dir), metrics="face",
                                  num_images=64, verbose=False)
    assert results["failed"] == {}
    face = results["metrics"]["face"]
    assert {"face_rate", "face_fd", "face_landmark_fd", "face_rate_real", "face_fd_real",
            "face_landmark_fd_real"} <= set(face)
    assert face["num_images"] == 64 and 0.9 <= face["face_rate"] <= 1.0
    json.dumps(results)  # what evaluate.py writes
    assert "Face FD (O-Net), samples / real floor" in evaluation.format_table(results)


# -- during training --------------------------------------------------------------------------------------


def test_swd_monitor_logs_the_face_metric_beside_swd(tmp_path):
    import keras

    from keras_ddpm.config import ModelConfig
    from keras_ddpm.data import make_dataset

    keras.utils.set_random_seed(0)
    model = ModelConfig(image_size=16, channels=3, width=8, channel_multipliers=(1,), num_res_blocks=1,
                        attention_resolutions=(), bottleneck_attention=False, norm_groups=4, num_timesteps=50,
                        dropout=0.0).build()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)  # one eager step beats tracing
    monitor = callbacks.SWDMonitor(load_images("synthetic", "validation", 16, 16), steps=3, batch_size=16, face=True)
    model.fit(make_dataset("synthetic", "train", 16, 8), epochs=1, steps_per_epoch=1, verbose=0, shuffle=False,
              callbacks=[monitor, keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))])
    header, row = (line.split(",") for line in (tmp_path / "log.csv").read_text().splitlines())
    logged = dict(zip(header, row))
    assert {"swd", "face_rate", "face_fd", "face_landmark_fd"} <= set(logged)
    assert 0.0 <= float(logged["face_rate"]) <= 1.0 and float(logged["face_fd"]) > 0.0
