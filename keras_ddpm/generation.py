"""One way to draw images from either a training run directory or an exported SavedModel.

`load_generator(path)` returns an object with `generate(...)` (the arguments of `DiffusionModel.generate`),
`image_shape`, `num_classes`, `schedule`, `objective` and `metadata`:

- a run directory (holding config.json) gives its `DiffusionModel`, restored from the latest checkpoint;
- a SavedModel gives a `SavedModelGenerator`, which calls the SavedModel's own `generate` signature for the
  sampler it was exported with and, for other samplers or a trajectory, runs `keras_ddpm.samplers` on its
  `denoise` signature. Either way an image is a function of its seed alone.
"""

import pathlib

import keras
import numpy as np
import tensorflow as tf

from keras_ddpm import samplers
from keras_ddpm.config import read_json
from keras_ddpm.model import check_request
from keras_ddpm.schedule import NoiseSchedule


class SavedModelGenerator:
    """Sampling from a SavedModel written by `export_savedmodel`, with the interface of `DiffusionModel.generate`.

    Args:
        loaded: the object `tf.saved_model.load` returned.
        metadata: the export's metadata (see `keras_ddpm.export`).
    """

    def __init__(self, loaded, metadata: dict):
        self.loaded = loaded
        self.metadata = metadata
        self.image_shape = (*metadata["image_size"], metadata["channels"])
        self.num_classes = metadata["num_classes"]
        self.schedule = NoiseSchedule.from_config(metadata["schedule"])
        self.objective = metadata["objective"]
        self.max_batch_size = metadata.get("max_batch_size")  # None: an older export, without a cap
        self._sample_functions = {}

    def _predict(self, inputs):
        """The network's raw output through the `denoise` signature."""
        names = ["x_t", "t", "label"][: len(inputs)]
        return self.loaded.signatures["denoise"](**dict(zip(names, inputs)))["prediction"]

    def _sample_function(self, sampler, spacing, return_trajectory):
        key = (sampler, spacing, return_trajectory)
        if key not in self._sample_functions:

            @tf.function(reduce_retracing=True)
            def sample(seeds, steps, eta, labels, guidance):
                denoise = samplers.make_denoiser(
                    self._predict, self.schedule, self.objective,
                    labels if self.num_classes else None, self.num_classes, guidance,
                )
                return samplers.sample(
                    denoise, self.schedule, seeds, self.image_shape, steps, sampler, eta, spacing,
                    return_trajectory=return_trajectory,
                )

            self._sample_functions[key] = sample
        return self._sample_functions[key]

    def generate(self, num_images=None, *, seed=0, seeds=None, steps=None, sampler=None, eta=None, spacing=None,
                 labels=None, guidance=1.0, return_trajectory=False):
        """uint8 images [N, H, W, C] (and the float trajectory [S, N, H, W, C] when asked); see `DiffusionModel.generate`.

        `sampler` and `eta` default to those the model was exported with.
        """
        sampler = sampler or self.metadata["sampler"]
        eta = resolve_eta(self, eta)
        seeds, steps, labels = check_request(
            num_images, seed, seeds, steps, sampler, eta, labels, self.num_classes, self.schedule.num_timesteps,
            guidance,
        )
        if self.max_batch_size and len(seeds) > self.max_batch_size:
            raise ValueError(f"This export takes at most {self.max_batch_size} seeds per call (its max_batch_size), "
                             f"got {len(seeds)}; use generate_in_batches.")
        inputs = dict(seed=tf.constant(seeds, tf.int64), steps=tf.constant(steps, tf.int32),
                      eta=tf.constant(eta, tf.float32))
        if self.num_classes:
            inputs.update(label=tf.constant(labels, tf.int32), guidance=tf.constant(guidance, tf.float32))
        exported_way = sampler == self.metadata["sampler"] and spacing in (None, self.metadata["spacing"])
        if exported_way and not return_trajectory:
            return self.loaded.signatures["generate"](**inputs)["images"].numpy()
        result = self._sample_function(sampler, spacing, return_trajectory)(
            inputs["seed"], inputs["steps"], inputs["eta"], tf.constant(labels, tf.int32),
            tf.constant(guidance, tf.float32),
        )
        if return_trajectory:
            images, trajectory = result
            return samplers.to_uint8(images).numpy(), trajectory.numpy()
        return samplers.to_uint8(result).numpy()


def resolve_eta(generator, eta=None) -> float:
    """`eta` as asked, else the model's default: its export's, 0 for run directories and plain models."""
    return (getattr(generator, "metadata", None) or {}).get("eta", 0.0) if eta is None else eta


def load_generator(path):
    """A `DiffusionModel` (from a run directory) or a `SavedModelGenerator` (from an export folder)."""
    from keras_ddpm.export import load_savedmodel
    from keras_ddpm.training import load_run

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No model at {path}: pass a SavedModel folder (e.g. savedmodel) or a run directory.")
    if (path / "config.json").is_file():
        model, model_config = load_run(path)
        dataset = read_json(path / "config.json")["train"]["dataset"]
        model.metadata = {**model_config.to_dict(), "dataset": dataset, "sampler": "ddim", "eta": 0.0}
        return model
    return SavedModelGenerator(*load_savedmodel(path))


def generate_in_batches(generator, num_images: int, batch_size: int = 64, seed: int = 0, verbose: bool = True,
                        **options) -> np.ndarray:
    """`generator.generate` over `num_images` seeds `seed, seed + 1, ...` in batches, with a progress bar.

    Batches are cut down to the generator's `max_batch_size` (an export's cap on one request), if it has one.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be at least 1, got {num_images} and {batch_size}.")
    batch_size = min(batch_size, getattr(generator, "max_batch_size", None) or batch_size)
    progress = keras.utils.Progbar(num_images, unit_name="image") if verbose else None
    labels = options.pop("labels", None)
    if labels is not None:
        labels = np.broadcast_to(np.asarray(labels), [num_images])
    batches = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        batch_labels = None if labels is None else labels[start : start + count]
        seeds = np.arange(seed + start, seed + start + count)
        batches.append(generator.generate(seeds=seeds, labels=batch_labels, **options))
        if progress:
            progress.add(count)
    return np.concatenate(batches)
