"""The face metric: does each image hold together as a face? A pretrained face network, offline.

SWD compares patch statistics and cannot tell a whole face from one with its eyes in the wrong place; FID
needs InceptionV3 weights that offline machines cannot download. This metric uses MTCNN (Zhang et al. 2016,
"Joint Face Detection and Alignment using Multi-task Cascaded Convolutional Networks"), whose P-, R- and
O-Net weights ship inside the `mtcnn` wheel on PyPI, so nothing is downloaded at run time.

Both image sets go through one path, at the model's resolution (real faces are first brought to it by
`keras_ddpm.data.load_images`, like the training data), so resolution is not what is measured:

- `face_rate`: the share of images in which the full MTCNN cascade, run on the image upscaled bilinearly to
  `DETECTOR_SIZE` pixels, finds at least one face (O-Net probability >= 0.8, the package's default
  thresholds) at least `MIN_FACE_FRACTION` of the image side; every detection comes with 5 landmarks.
- `face_fd`: the Frechet distance (Heusel et al. 2017) between the two sets' O-Net embeddings: the
  256-d output of O-Net's penultimate layer (fc5 + PReLU, the layer its face, box and landmark heads share).
- `face_landmark_fd`: the Frechet distance between the sets' landmark geometry: O-Net's 5 landmarks (eyes,
  nose, mouth corners) in the frame of the eyes (`normalise_landmarks`), 6 numbers per image.

Embedding and landmarks come from one O-Net pass over the whole image resized to 48x48 (O-Net's input),
for every image, detected or not. The images are aligned crops, so the face window is known in advance:
on 500 real 32x32 CelebA-64 crops the cascade's face box spans 87% of the image height, centred within
2% of the middle, so the whole image is that window. The fixed window has two merits over crops of
detected boxes: an image in which no face is found still enters both distances (with the features of
whatever it shows, far from a face's, so a model that never draws a face cannot score well by
being ignored), and a face drawn out of place is seen out of place instead of being re-centred.

Example (uint8 face images [N, H, W, 3]; tests/test_face_metric.py runs it on CelebA):

    report = face_report(samples, held_out_faces, reference=training_faces)
    report["face_fd"], report["face_fd_real"]   # samples vs held-out, and the real-vs-real floor
"""

import functools
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from keras_ddpm.metrics.images import check_images
from keras_ddpm.metrics.inception import feature_statistics, frechet_distance
from keras_ddpm.precision import dtype_policy

ONET_SIZE = 48  # O-Net's input side
# Side the detection cascade sees: 3x a 32x32 image, room for P-Net's 12-px window. (At 128 px with a 32-px
# minimum face, mtcnn 1.0's scale pyramid reaches a 1-px level and the cascade fails on every image.)
DETECTOR_SIZE = 96
# The image's own face fills most of an aligned crop (87% of its height); a smaller detection would be some other
# face-like patch. MTCNN does not search for faces below this size.
MIN_FACE_FRACTION = 0.25


class FaceNetworks(NamedTuple):
    """The MTCNN detector (full cascade) and its O-Net (a Keras model), loaded once."""

    detector: object
    onet: object


class FaceEmbedding(NamedTuple):
    """What the face network sees in a set of N images."""

    found: np.ndarray  # bool [N]: the cascade found a face
    features: np.ndarray  # float64 [N, 256]: O-Net's penultimate layer on the whole image
    geometry: np.ndarray  # float64 [N, 6]: nose and mouth corners in the eyes' frame


@functools.lru_cache(maxsize=1)
def load_face_networks() -> FaceNetworks:
    """MTCNN with the weights from the installed `mtcnn` package (no download); imported only when used.

    Built in float32 whatever the global dtype policy, so a training run under mixed precision measures its
    samples with the same network as `evaluate.py`.

    Raises:
        RuntimeError: when the `mtcnn` package is not installed.
    """
    try:
        from mtcnn import MTCNN
    except ImportError as error:
        raise RuntimeError(f"The face metric needs the mtcnn package ({error}); pip install mtcnn.") from error
    with dtype_policy("float32"):  # MTCNN's layers take the global policy; the caller's comes back afterwards
        detector = MTCNN(stages="face_and_landmarks_detection", device="CPU:0")
    return FaceNetworks(detector, detector.get_stage(stage_name="Stage ONET").model)


def _normalise_pixels(images) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 scaled as MTCNN's networks expect ((x - 127.5) / 128)."""
    return (np.asarray(images, np.float32) - 127.5) / 128.0


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 images to `size` x `size`, as float32 in [0, 255]: the one path both sets take."""
    return tf.image.resize(tf.constant(images, tf.float32), (size, size), method="bilinear").numpy()


def detect_faces(images: np.ndarray, networks: FaceNetworks, batch_size: int = 250) -> np.ndarray:
    """bool [N]: the MTCNN cascade finds at least one face of at least MIN_FACE_FRACTION of the side."""
    found = []
    for start in range(0, len(images), batch_size):
        batch = resize(images[start : start + batch_size], DETECTOR_SIZE)
        detections = networks.detector.detect_faces(list(batch), min_face_size=int(MIN_FACE_FRACTION * DETECTOR_SIZE))
        found += [len(faces) > 0 for faces in detections] if detections else [False] * len(batch)
    return np.asarray(found, bool)


def onet_outputs(images: np.ndarray, networks: FaceNetworks, batch_size: int = 500):
    """O-Net on whole images resized to 48x48: (features [N, 256], landmarks [N, 5, 2] as fractions of the side).

    The features are the output of fc5 + PReLU, the penultimate layer that O-Net's three heads share.
    """
    onet = networks.onet
    layers_to_fc5 = [onet.conv1, onet.prelu1, onet.maxpool1, onet.conv2, onet.prelu2, onet.maxpool2,
                     onet.conv3, onet.prelu3, onet.maxpool3, onet.conv4, onet.prelu4, onet.permute, onet.flatten,
                     onet.fc5, onet.prelu5]

    @tf.function(reduce_retracing=True)
    def embed(batch):
        for layer in layers_to_fc5:
            batch = layer(batch)
        return batch, onet.fc6_2(batch)

    features, landmarks = [], []
    for start in range(0, len(images), batch_size):
        batch = _normalise_pixels(resize(images[start : start + batch_size], ONET_SIZE))
        batch_features, batch_landmarks = embed(tf.constant(batch))
        features.append(batch_features.numpy())
        landmarks.append(batch_landmarks.numpy())
    landmarks = np.concatenate(landmarks).astype(np.float64)
    # O-Net's landmark head gives x1..x5 then y1..y5, as fractions of its input window.
    return np.concatenate(features).astype(np.float64), np.stack([landmarks[:, :5], landmarks[:, 5:]], axis=-1)


def normalise_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """The 5-point geometry in the eyes' frame: float [N, 5, 2] -> [N, 6] (nose, mouth_left, mouth_right).

    The points come in O-Net's order: the eye on the image's left, the other eye, nose, left and right mouth corners.

    Origin at the midpoint of the eyes, x-axis from the left to the right eye, unit the inter-ocular
    distance: a similarity transform, so the eyes land on (-0.5, 0) and (0.5, 0) and the remaining
    6 numbers describe where nose and mouth sit relative to the eyes, whatever the face's position,
    size and roll. Degenerate eyes (both on one point) give NaN.
    """
    landmarks = np.asarray(landmarks, np.float64)
    left_eye, right_eye = landmarks[:, 0], landmarks[:, 1]
    centre = (left_eye + right_eye) / 2.0
    axis = right_eye - left_eye
    inter_ocular = np.linalg.norm(axis, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos, sin = (axis / inter_ocular[:, None]).T
        # Rotate by -roll (so the eye axis becomes +x) and divide by the inter-ocular distance.
        rotation = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], axis=1)  # [N, 2, 2]
        relative = (landmarks[:, 2:] - centre[:, None]) / inter_ocular[:, None, None]
    return np.einsum("nij,nkj->nki", rotation, relative).reshape(len(landmarks), 6)


def embed_faces(images: np.ndarray, networks: FaceNetworks | None = None) -> FaceEmbedding:
    """Detection, O-Net features and landmark geometry of uint8 RGB images [N, H, W, 3]."""
    images = check_images(images, "images")
    if images.shape[-1] != 3:
        raise ValueError(f"The face metric needs RGB images, got {images.shape[-1]} channel(s).")
    networks = networks or load_face_networks()
    features, landmarks = onet_outputs(images, networks)
    return FaceEmbedding(detect_faces(images, networks), features, normalise_landmarks(landmarks))


def compare_embeddings(embedding_a: FaceEmbedding, embedding_b: FaceEmbedding) -> dict[str, float]:
    """`face_fd` and `face_landmark_fd` between two embedded sets (each of at least 2 images)."""
    return {
        "face_fd": frechet_distance(*feature_statistics(embedding_a.features),
                                    *feature_statistics(embedding_b.features)),
        "face_landmark_fd": frechet_distance(*feature_statistics(embedding_a.geometry),
                                             *feature_statistics(embedding_b.geometry)),
    }


def score_faces(samples: np.ndarray, real: FaceEmbedding, networks: FaceNetworks | None = None) -> dict[str, float]:
    """`face_rate`, `face_fd` and `face_landmark_fd` of `samples` against already embedded real faces."""
    generated = embed_faces(samples, networks)
    return {"face_rate": float(generated.found.mean()), **compare_embeddings(generated, real)}


def face_report(samples: np.ndarray, real_images: np.ndarray, reference: np.ndarray | None = None,
                networks: FaceNetworks | None = None) -> dict[str, float]:
    """The face metric of `samples` against held-out `real_images` (use the same count for both).

    Returns:
        `face_rate`, `face_fd`, `face_landmark_fd` of the samples; `face_rate_real` of the real images; and,
        when `reference` (other real images, e.g. training faces, as many as `real_images`) is given, the
        floor a perfect model would reach: `face_fd_real` and `face_landmark_fd_real` of `reference`
        against `real_images`. Also `num_images`.
    """
    networks = networks or load_face_networks()
    real = embed_faces(real_images, networks)
    report = {**score_faces(samples, real, networks), "face_rate_real": float(real.found.mean())}
    if reference is not None:
        floor = compare_embeddings(embed_faces(reference, networks), real)
        report.update({f"{key}_real": value for key, value in floor.items()})
    report["num_images"] = len(samples)
    return report
