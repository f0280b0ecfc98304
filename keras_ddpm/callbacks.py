"""Keras callbacks of a training run: progress fields, checkpoints, sample grids, loss curve, NaN guard, SWD and face metric."""

import json
import math
import pathlib

import keras
import numpy as np
import tensorflow as tf

from keras_ddpm import face_metric, plots
from keras_ddpm.generation import generate_in_batches
from keras_ddpm.metrics import sliced_wasserstein_distance


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunProgress(keras.callbacks.Callback):
    """Adds `step`, `images_seen`, `lr` and (under mixed precision) `loss_scale` to each epoch's logs.

    Put it first in the callback list so that CSVLogger and TensorBoard see these fields.

    Args:
        steps_per_epoch: optimizer steps in one Keras epoch.
        batch_size: the global batch size.
    """

    def __init__(self, steps_per_epoch: int, batch_size: int):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        step = (epoch + 1) * self.steps_per_epoch
        logs["step"] = step
        logs["images_seen"] = step * self.batch_size
        optimizer = self.model.optimizer
        logs["lr"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            logs["loss_scale"] = float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))


class NaNGuard(keras.callbacks.Callback):
    """Stops training as soon as the loss is not finite; `train()` then raises `TrainingDiverged`.

    The checkpoint callback refuses to save non-finite weights, so the run directory keeps the last good state.
    """

    def __init__(self):
        super().__init__()
        self.bad_batch = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_batch = batch
            self.model.stop_training = True


class Checkpoint(keras.callbacks.Callback):
    """Saves network, EMA network, optimizer and the epoch counter every epoch with a `tf.train.CheckpointManager`.

    TensorFlow writes the checkpoint files first and the `checkpoint` index last, so a run killed mid-save
    (even by SIGKILL) restarts from the previous complete checkpoint.

    Args:
        manager: the `tf.train.CheckpointManager`.
        epoch_variable: an int64 `tf.Variable` in the checkpoint holding the number of finished epochs.
    """

    def __init__(self, manager: tf.train.CheckpointManager, epoch_variable: tf.Variable):
        super().__init__()
        self.manager = manager
        self.epoch_variable = epoch_variable

    def on_epoch_end(self, epoch, logs=None):
        if not math.isfinite(float((logs or {}).get("loss", 0.0))):
            return
        self.epoch_variable.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


class SampleGrid(keras.callbacks.Callback):
    """Every `every_epochs` epochs, sample a grid from fixed seeds with the EMA network.

    The same seeds each time make grids comparable across training. Written as
    `<folder>/step_<step>.png` and, when `log_dir` is given, as a TensorBoard image.

    Args:
        folder: where the PNGs go.
        steps_per_epoch: to name grids by optimizer step.
        num_images: images in the grid (a square number reads best).
        every_epochs: sampling interval.
        sampler, steps, eta: how to sample (a cheap deterministic DDIM by default).
        labels: for conditional models, the labels of the grid (default: classes in turn).
        log_dir: TensorBoard log directory, or None.
    """

    def __init__(self, folder, steps_per_epoch, num_images=64, every_epochs=1, sampler="ddim", steps=50, eta=0.0,
                 labels=None, log_dir=None, seed=0):
        super().__init__()
        self.folder = pathlib.Path(folder)
        self.steps_per_epoch = steps_per_epoch
        self.num_images = num_images
        self.every_epochs = every_epochs
        self.sampler = sampler
        self.steps = steps
        self.eta = eta
        self.labels = labels
        self.seed = seed
        self.writer = tf.summary.create_file_writer(str(log_dir)) if log_dir else None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_epochs:
            return
        labels = self.labels
        if labels is None and self.model.num_classes:
            labels = np.arange(self.num_images) % self.model.num_classes
        images = self.model.generate(
            self.num_images, seed=self.seed, steps=self.steps, sampler=self.sampler, eta=self.eta, labels=labels
        )
        step = (epoch + 1) * self.steps_per_epoch
        plots.save_image_grid(self.folder / f"step_{step:07d}.png", images)
        if self.writer:
            with self.writer.as_default():
                tf.summary.image("samples", plots.image_grid(images)[None], step=step)
            self.writer.flush()


class LossCurve(keras.callbacks.Callback):
    """Redraws the loss-curve PNG from the CSV log after every epoch (place it after the CSVLogger)."""

    def __init__(self, csv_path, png_path):
        super().__init__()
        self.csv_path = csv_path
        self.png_path = png_path

    def on_epoch_end(self, epoch, logs=None):
        plots.plot_loss_curve(self.csv_path, self.png_path)


class SWDMonitor(keras.callbacks.Callback):
    """Tracks the sliced Wasserstein distance of EMA samples to real images and keeps the best EMA weights.

    At the end of the first epoch of every `fit()` and then every `every_epochs` epochs, draws
    `len(real_images)` images with the EMA network from fixed seeds (the same images each time, up to the
    training), computes `sliced_wasserstein_distance(samples, real_images)["swd_mean"]` (x 1e3, lower is
    better) and puts it into the epoch's logs as `swd`. When it is the lowest so far, the EMA weights are
    saved to `best_weights_path` and the score, epoch and step to the `.json` beside it, which a resumed run
    reads back so that it keeps its best.

    Place it before `CSVLogger` and `TensorBoard` in the callback list: Keras hands one logs dict to the
    callbacks in list order, so only the callbacks after this one see `swd`. The first epoch is always
    measured because `CSVLogger` fixes its columns at its first row; epochs that are not measured show `NA`.

    With `face=True` the same samples are also scored by the face metric (`keras_ddpm.face_metric`: MTCNN,
    offline), logged beside SWD as `face_rate`, `face_fd` and `face_landmark_fd`; SWD still picks the best
    weights. It adds a few seconds per measurement on a CPU for 512 images (the real faces are embedded once).

    Args:
        real_images: uint8 [M, H, W, C], e.g. `load_images(dataset, "validation", size, M)`; at least
            16 pixels on a side (SWD's coarsest level).
        every_epochs: measurement interval in epochs.
        best_weights_path: where the best EMA weights go (a `.weights.h5` file), or None to keep none.
        sampler, steps, eta: how to sample (few DDIM steps: SWD compares local patch statistics, which settle early).
        batch_size: images per sampling batch.
        seed: sample i uses seed `seed + i`; also seeds the SWD's patches and projections.
        face: also log the face metric (RGB images only).
    """

    def __init__(self, real_images, every_epochs: int = 1, best_weights_path=None, sampler="ddim", steps=25,
                 eta: float = 0.0, batch_size: int = 64, seed: int = 0, face: bool = False):
        super().__init__()
        real_images = np.asarray(real_images)
        if real_images.dtype != np.uint8 or real_images.ndim != 4 or min(real_images.shape[1:3]) < 16:
            raise ValueError(
                f"SWDMonitor needs uint8 real images [M, H, W, C] of at least 16x16 pixels, got "
                f"{real_images.dtype} {real_images.shape}."
            )
        if every_epochs < 1:
            raise ValueError(f"every_epochs must be at least 1, got {every_epochs}.")
        if face and real_images.shape[-1] != 3:
            raise ValueError(f"The face metric needs RGB images, got {real_images.shape[-1]} channel(s).")
        self.real_images = real_images
        self.every_epochs = every_epochs
        self.best_weights_path = pathlib.Path(best_weights_path) if best_weights_path else None
        self.sampler = sampler
        self.steps = steps
        self.eta = eta
        self.batch_size = batch_size
        self.seed = seed
        self.face = face
        self.best = math.inf
        self._first_epoch = None
        self._real_faces = None  # the real images' face embedding, computed at the first measurement

    @property
    def best_record_path(self) -> pathlib.Path | None:
        if self.best_weights_path is None:
            return None
        return self.best_weights_path.with_name(self.best_weights_path.name.removesuffix(".weights.h5") + ".json")

    def on_train_begin(self, logs=None):
        self._first_epoch = None
        if self.best_record_path is not None and self.best_record_path.exists():
            self.best = json.loads(self.best_record_path.read_text())["swd"]

    def on_epoch_end(self, epoch, logs=None):
        if self._first_epoch is None:
            self._first_epoch = epoch
        if epoch != self._first_epoch and (epoch + 1) % self.every_epochs:
            return
        num_images = len(self.real_images)
        labels = np.arange(num_images) % self.model.num_classes if self.model.num_classes else None
        samples = generate_in_batches(self.model, num_images, self.batch_size, self.seed, verbose=False,
                                      sampler=self.sampler, steps=self.steps, eta=self.eta, labels=labels)
        swd = sliced_wasserstein_distance(samples, self.real_images, seed=self.seed)["swd_mean"]
        if logs is not None:
            logs["swd"] = swd
            if self.face:
                logs.update(self._face_metrics(samples))
        if swd < self.best:
            self.best = swd
            self._save_best(epoch, swd)

    def _face_metrics(self, samples) -> dict[str, float]:
        """`face_rate`, `face_fd` and `face_landmark_fd` of the samples against the real images."""
        if self._real_faces is None:
            self._real_faces = face_metric.embed_faces(self.real_images)
        faces = face_metric.embed_faces(samples)
        return {"face_rate": float(faces.found.mean()), **face_metric.compare_embeddings(faces, self._real_faces)}

    def _save_best(self, epoch: int, swd: float):
        """Write the EMA weights, then their record; each file is replaced atomically."""
        if self.best_weights_path is None:
            return
        self.best_weights_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.best_weights_path.with_name("partial." + self.best_weights_path.name)
        self.model.ema_network.save_weights(partial)
        partial.replace(self.best_weights_path)
        record = {"swd": swd, "epoch": epoch + 1, "step": int(self.model.optimizer.iterations.numpy())}
        partial_record = self.best_record_path.with_name(self.best_record_path.name + ".partial")
        partial_record.write_text(json.dumps(record) + "\n")
        partial_record.replace(self.best_record_path)
