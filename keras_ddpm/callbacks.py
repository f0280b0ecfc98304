"""Keras callbacks of a training run: progress, checkpoints, sample grids, loss curve, NaN guard, SWD, face metric."""

import csv
import json
import logging
import math
import pathlib

import keras
import numpy as np
import tensorflow as tf

from keras_ddpm import files, plots
from keras_ddpm.generation import generate_in_batches, labels_in_turn
from keras_ddpm.metrics import face as face_metric
from keras_ddpm.metrics import sliced_wasserstein_distance
from keras_ddpm.runs import is_diverged, optimizer_step, weights_problem

logger = logging.getLogger(__name__)

class RunProgress(keras.callbacks.Callback):
    """Adds `step`, `images_seen`, `lr` and (under mixed precision) `loss_scale` to each epoch's logs.

    `step` is the optimizer's step count, so it stays exact when a resumed run changes its steps per epoch.
    Training stops at `train_steps`, even in the middle of an epoch. Put it first in the callback list so
    that the CSV log and TensorBoard see these fields.

    Args:
        batch_size: the global batch size.
        train_steps: the optimizer step at which the run ends, or None.
    """

    def __init__(self, batch_size: int, train_steps: int | None = None):
        super().__init__()
        self.batch_size = batch_size
        self.train_steps = train_steps

    def on_train_batch_end(self, batch, logs=None):
        if self.train_steps is not None and optimizer_step(self.model) >= self.train_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        step = optimizer_step(self.model)
        logs["step"] = step
        logs["images_seen"] = step * self.batch_size
        optimizer = self.model.optimizer
        logs["lr"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            logs["loss_scale"] = float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))


class NaNGuard(keras.callbacks.Callback):
    """Stops training as soon as the loss diverges (`is_diverged`); `train()` then raises `TrainingDiverged`.

    `diverged_at` is the optimizer step whose loss diverged, or None.
    """

    def __init__(self):
        super().__init__()
        self.diverged_at = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and is_diverged(loss):
            self.diverged_at = optimizer_step(self.model)
            self.model.stop_training = True


class Checkpoint(keras.callbacks.Callback):
    """Saves network, EMA network and optimizer as `ckpt-<step>` every epoch, only from weights that train well.

    An epoch whose loss diverged, or whose final weights fail `weights_problem` on the probe batch, is not
    saved and stops training (`refused` says why), so every kept checkpoint is one a run can continue from.
    TensorFlow writes the checkpoint files first and the `checkpoint` index last, so a run killed mid-save
    (even by SIGKILL) restarts from the previous complete checkpoint. Place it after the CSV log: a kill
    between the two then leaves a log row beyond the checkpoint, which the resumed run drops, never a gap.

    Args:
        manager: the `tf.train.CheckpointManager`.
        probe_images, probe_labels: a fixed batch on which the weights must score a sane loss.
    """

    def __init__(self, manager: tf.train.CheckpointManager, probe_images, probe_labels=None):
        super().__init__()
        self.manager = manager
        self.probe_images = probe_images
        self.probe_labels = probe_labels
        self.refused = None
        self.saved = 0

    def on_epoch_end(self, epoch, logs=None):
        if is_diverged((logs or {}).get("loss", 0.0)):
            self.refused = "the epoch's loss diverged"
        else:
            self.refused = weights_problem(self.model, self.probe_images, self.probe_labels)
        if self.refused:
            logger.warning("Not saving a checkpoint at step %d: %s.", optimizer_step(self.model),
                           self.refused)
            self.model.stop_training = True
            return
        self.manager.save(checkpoint_number=optimizer_step(self.model))
        self.saved += 1


class CSVLog(keras.callbacks.Callback):
    """Appends each epoch's logs as a row of a CSV file whose columns stay consistent across restarts.

    Unlike `keras.callbacks.CSVLogger`, which appends rows in its own column order under whatever header the
    file has, a row here follows the file's header, `NA` where it has no value; a new column rewrites the
    file (atomically) under a header that has it. Each row is one write and is flushed at once.

    Args:
        path: the CSV file, e.g. `<run>/log.csv`.
    """

    def __init__(self, path):
        super().__init__()
        self.path = pathlib.Path(path)

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch, **(logs or {})}
        header = self._header()
        if not set(row) <= set(header):
            self._rewrite(["epoch", *sorted((set(header) | set(row)) - {"epoch"})])
            header = self._header()
        with open(self.path, "a", newline="") as file:
            csv.writer(file).writerow([row.get(key, "NA") for key in header])
            file.flush()

    def _header(self) -> list[str]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as file:
            return next(csv.reader(file), [])

    def _rewrite(self, header: list[str]):
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as file:
                rows = list(csv.DictReader(file))
        with files.atomic_path(self.path) as partial, open(partial, "w", newline="") as file:
            writer = csv.DictWriter(file, header, restval="NA")
            writer.writeheader()
            writer.writerows(rows)


class SampleGrid(keras.callbacks.Callback):
    """Every `every_epochs` epochs, sample a grid from fixed seeds with the EMA network.

    The same seeds each time make grids comparable across training. Written as
    `<folder>/step_<step>.png` (the optimizer step) and, when `log_dir` is given, as a TensorBoard image.

    Args:
        folder: where the PNGs go.
        num_images: images in the grid (a square number reads best).
        every_epochs: sampling interval.
        sampler, steps, eta: how to sample (a cheap deterministic DDIM by default).
        labels: for conditional models, the labels of the grid (default: classes in turn).
        log_dir: TensorBoard log directory, or None.
    """

    def __init__(self, folder, num_images=64, every_epochs=1, sampler="ddim", steps=50, eta=0.0,
                 labels=None, log_dir=None, seed=0):
        super().__init__()
        self.folder = pathlib.Path(folder)
        self.num_images = num_images
        self.every_epochs = every_epochs
        self.sampler = sampler
        self.steps = steps
        self.eta = eta
        self.labels = labels
        self.seed = seed
        self.log_dir = log_dir
        self.writer = None

    def on_train_begin(self, logs=None):
        if self.log_dir:
            self.writer = tf.summary.create_file_writer(str(self.log_dir))

    def on_train_end(self, logs=None):
        if self.writer:  # its event file and thread end with the run, not with the process
            self.writer.close()
            self.writer = None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_epochs:
            return
        labels = self.labels if self.labels is not None else labels_in_turn(self.num_images, self.model.num_classes)
        images = self.model.generate(
            self.num_images, seed=self.seed, steps=self.steps, sampler=self.sampler, eta=self.eta, labels=labels
        )
        step = optimizer_step(self.model)
        plots.save_image_grid(self.folder / f"step_{step:07d}.png", images)
        if self.writer:
            with self.writer.as_default():
                tf.summary.image("samples", plots.image_grid(images)[None], step=step)
            self.writer.flush()


class TrainingCurves(keras.callbacks.Callback):
    """Redraws the training-curve PNG (loss; SWD and face FD when monitored) from the CSV log after every epoch
    (place it after the CSV log)."""

    def __init__(self, csv_path, png_path):
        super().__init__()
        self.csv_path = csv_path
        self.png_path = png_path

    def on_epoch_end(self, epoch, logs=None):
        plots.plot_training_curves(self.csv_path, self.png_path)


class SWDMonitor(keras.callbacks.Callback):
    """Tracks the sliced Wasserstein distance of EMA samples to real images and keeps the best EMA weights.

    At the end of the first epoch of every `fit()` and then every `every_epochs` epochs, draws
    `len(real_images)` images with the EMA network from fixed seeds (the same images each time, up to the
    training), computes `sliced_wasserstein_distance(samples, real_images)["swd_mean"]` (x 1e3, lower is
    better) and puts it into the epoch's logs as `swd`. When it is the lowest so far, the EMA weights are
    saved to `best_weights_path` and the score, epoch and step to the `.json` beside it, which a resumed run
    reads back so that it keeps its best.

    Place it before the CSV log and `TensorBoard` in the callback list: Keras hands one logs dict to the
    callbacks in list order, so only the callbacks after this one see `swd`. The first epoch is always
    measured so that a CSV log has the `swd` column from its first row; epochs that are not measured show `NA`.

    With `face=True` the same samples are also scored by the face metric (`keras_ddpm.metrics.face`: MTCNN,
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
        samples = generate_in_batches(self.model, num_images, self.batch_size, self.seed, verbose=False,
                                      sampler=self.sampler, steps=self.steps, eta=self.eta,
                                      labels=labels_in_turn(num_images, self.model.num_classes))
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
        return face_metric.score_faces(samples, self._real_faces)

    def _save_best(self, epoch: int, swd: float):
        """Write the EMA weights, then their record; each file is replaced atomically."""
        if self.best_weights_path is None:
            return
        with files.atomic_path(self.best_weights_path) as partial:
            self.model.ema_network.save_weights(partial)
        record = {"swd": swd, "epoch": epoch + 1, "step": optimizer_step(self.model)}
        files.write_text(self.best_record_path, json.dumps(record) + "\n")
