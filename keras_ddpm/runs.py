"""Run directories: what a training run writes, how its checkpoints are restored, and how a model is loaded back.

Layout of a run directory:

    config.json          model and training configuration (a rerun must match the model part)
    checkpoints/         tf.train.CheckpointManager: `ckpt-<step>` with network, EMA network and optimizer
    log.csv              per-epoch loss, step, images seen, learning rate (appended across restarts)
    loss.png             the loss curve (and SWD, face FD when monitored), redrawn every epoch
    samples/step_*.png   sample grids from fixed seeds
    best_ema.weights.h5  EMA weights with the lowest SWD so far, and best_ema.json (with --swd_every_epochs)
    tensorboard/         scalars and sample images
    savedmodel/1/        the exported EMA model (written when training finishes; export.py exports any checkpoint)
    workertemp_*/        a multi-worker run's non-chief copies, deleted when training ends (see worker_directory)

The optimizer's step count is the run's clock (`optimizer_step`): checkpoints are named `ckpt-<step>` and
log.csv's `step` column comes from it. Checkpoints are kept only from weights that train well
(`weights_problem`); a damaged or diverged newest checkpoint falls back to the newest one that restores.
Training (`keras_ddpm.training`), sampling and evaluation (`load_generator`) all read runs through here.
"""

import csv
import dataclasses
import logging
import math
import pathlib
import shutil

import keras
import numpy as np
import tensorflow as tf

from keras_ddpm import files
from keras_ddpm.config import ModelConfig, TrainConfig
from keras_ddpm.export import (DEFAULT_MAX_BATCH_SIZE, EXPORT_METADATA_KEYS, clean_stale_exports, export_savedmodel,
                               find_version_dir, load_savedmodel, read_metadata)
from keras_ddpm.generation import Generator, SavedModelGenerator, resolve_sampling
from keras_ddpm.model import DiffusionModel
from keras_ddpm.precision import dtype_policy, resolve_precision

logger = logging.getLogger(__name__)

# Predicting zeros scores a loss of about 1 (the targets, noise or v, have unit variance at most), so a network
# 100 times worse than that has diverged even while its loss is still a finite number.
DIVERGED_LOSS = 100.0


def optimizer_step(model) -> int:
    """The optimizer's step count: the run's clock. (`int()` of a multi-worker variable fails; `.numpy()` works.)"""
    return int(model.optimizer.iterations.numpy())


def is_diverged(loss) -> bool:
    """A loss that is not finite or that is far worse than predicting zeros (see `DIVERGED_LOSS`)."""
    loss = float(loss)
    return not math.isfinite(loss) or loss > DIVERGED_LOSS


def weights_problem(model, probe_images, probe_labels=None) -> str | None:
    """Why the model's current weights must not be checkpointed, or None when they are fine.

    The weights after an update have not produced a loss yet (the last batch's loss came from the weights
    before it), and one wild update can wreck them while every logged loss is still small. So all
    variables must be finite, and the network and its EMA copy must score a sane loss on `probe_images`.
    """
    variables = [*model.network.weights, *model.ema_network.weights, *model.optimizer.variables]
    for variable in variables:
        if "float" in str(variable.dtype) and not np.isfinite(keras.ops.convert_to_numpy(variable)).all():
            return f"variable {variable.path} is not finite"
    for name in ("network", "ema_network"):
        loss = float(model.diffusion_loss(getattr(model, name), probe_images, probe_labels, training=False))
        if is_diverged(loss):
            return f"the {name.replace('_', ' ')} scores a loss of {loss:.4g} on a probe batch"
    return None


def check_same_model(output_dir, model_config: ModelConfig) -> None:
    """Refuse an existing run directory that holds a run of a different model; reads only."""
    if (pathlib.Path(output_dir) / "config.json").exists():
        saved, _ = read_run_config(output_dir)
        if saved != model_config:
            changed = {
                key: (value, getattr(model_config, key))
                for key, value in saved.to_dict().items()
                if value != getattr(model_config, key)
            }
            raise ValueError(
                f"{output_dir} holds a run of a different model (saved vs requested: {changed}). "
                "Use a new --output_dir, or the same model flags to resume."
            )


def prepare_run_directory(output_dir, model_config: ModelConfig, train_config: TrainConfig) -> pathlib.Path:
    """Create the run directory, clean what killed runs left there, and write its config.json.

    Call it once everything that can be checked has been: a failed run must not leave a config.json behind.
    """
    check_same_model(output_dir, model_config)
    output_dir = files.check_writable(output_dir)
    clean_stale_files(output_dir)
    files.write_json(output_dir / "config.json", {"model": model_config.to_dict(), "train": dataclasses.asdict(train_config)})
    return output_dir


def worker_directory(run_dir, strategy: tf.distribute.Strategy) -> pathlib.Path:
    """Where this process writes: the run directory on the chief, a temporary `workertemp_*` folder in it elsewhere.

    Under MultiWorkerMirroredStrategy every worker runs the whole program, saves included (saving may involve
    collective ops, says the tf.distribute multi-worker guide), but only the chief's files are kept: the other
    workers write into a folder of their own, which `train()` deletes at the end and a restarted worker clears.
    """
    if strategy.extended.should_checkpoint:
        return pathlib.Path(run_dir)
    resolver = strategy.cluster_resolver
    folder = pathlib.Path(run_dir) / f"workertemp_{resolver.task_type}_{resolver.task_id}"
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def clean_stale_files(output_dir) -> None:
    """Remove what a killed run leaves: half-written checkpoints and exports (nothing is being written now)."""
    checkpoint_dir = pathlib.Path(output_dir) / "checkpoints"
    if checkpoint_dir.is_dir():
        for stale in checkpoint_dir.glob("*_temp"):  # TensorFlow's staging folder of a checkpoint being written
            logger.info("Removing %s, left by a run killed while saving.", stale)
            shutil.rmtree(stale, ignore_errors=True)
        state = tf.train.get_checkpoint_state(str(checkpoint_dir))
        if state is not None:  # files of a checkpoint whose save never reached the index
            listed = {pathlib.Path(path).name for path in state.all_model_checkpoint_paths}
            for stale in checkpoint_dir.glob("ckpt-*.*"):
                if stale.name.split(".")[0] not in listed:
                    logger.info("Removing %s, a checkpoint file that is not in the index.", stale)
                    stale.unlink()
    clean_stale_exports(pathlib.Path(output_dir) / "savedmodel")


def restore_checkpoint(output_dir, model, keep: int = 3, step: int | None = None, probe_batch=None, restore_dir=None):
    """Restore the newest checkpoint that loads (or `ckpt-<step>`); returns (manager, restored step).

    A newest checkpoint that fails to load (a full disk can truncate it) or whose weights fail
    `weights_problem` on `probe_batch` (images, labels) is skipped with a warning, and the one
    before it is tried. Checkpoints newer than the one restored are deleted, so the run's next saves do not
    mix with them. The step is 0 when there was nothing to restore.

    The manager saves into `output_dir`; the checkpoints restored are those of `restore_dir` (default
    `output_dir`): the chief's run directory, for a worker that writes into a `worker_directory` of its own.
    Only the process that owns the checkpoints (restore_dir is output_dir) deletes any.
    """
    checkpoint_dir = pathlib.Path(restore_dir or output_dir) / "checkpoints"
    owns_checkpoints = restore_dir is None or pathlib.Path(restore_dir) == pathlib.Path(output_dir)
    checkpoint = tf.train.Checkpoint(network=model.network, ema_network=model.ema_network, optimizer=model.optimizer)
    state = tf.train.get_checkpoint_state(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    candidates = checkpoint_paths(checkpoint_dir, step)
    if candidates:
        # Create the optimizer's slots first so that they are restored now, not deferred.
        model.optimizer.build(model.network.trainable_variables)
    usable = (lambda: weights_problem(model, *probe_batch)) if probe_batch else None
    path = restore_newest(checkpoint, candidates, usable)
    step_restored = optimizer_step(model)
    if path is not None:
        if owns_checkpoints:
            _discard_newer_checkpoints(checkpoint_dir, state, path)
        logger.info("Resumed from %s (step %d).", path, step_restored)
    # The manager reads the pruned index of the folder it saves into.
    manager = tf.train.CheckpointManager(checkpoint, pathlib.Path(output_dir) / "checkpoints", max_to_keep=keep)
    return manager, step_restored


def checkpoint_paths(checkpoint_dir, step: int | None = None) -> list[str]:
    """The checkpoints listed in `checkpoint_dir`'s index, oldest first; only `ckpt-<step>` when a step is given."""
    checkpoint_dir = pathlib.Path(checkpoint_dir)
    state = tf.train.get_checkpoint_state(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    paths = list(state.all_model_checkpoint_paths) if state else []
    if step is None:
        return paths
    wanted = [path for path in paths if pathlib.Path(path).name == f"ckpt-{step}"]
    if not wanted:
        available = ", ".join(pathlib.Path(path).name.removeprefix("ckpt-") for path in paths) or "none"
        raise ValueError(f"No checkpoint of step {step} in {checkpoint_dir} (steps available: {available}).")
    return wanted


def restore_newest(checkpoint: tf.train.Checkpoint, paths: list[str], problem=None) -> str | None:
    """Restore the newest of `paths` (oldest first) that loads and passes `problem()`; returns it.

    Each one skipped is logged. Returns None when `paths` is empty; raises ValueError when none restores.
    """
    problems = []
    for path in reversed(paths):
        reason = _restore(checkpoint, path) or (problem() if problem else None)
        if not reason:
            return path
        problems.append(f"{pathlib.Path(path).name}: {reason}")
        logger.warning("Cannot use checkpoint %s (%s); trying the one before.", path, reason)
    if problems:
        raise ValueError(
            f"No checkpoint in {pathlib.Path(paths[0]).parent} can be used ({'; '.join(problems)}). If they were "
            "written by a different architecture, use a new --output_dir."
        )
    return None


def _restore(checkpoint: tf.train.Checkpoint, path: str) -> str | None:
    """Restore `path` into `checkpoint`'s objects; returns why it failed, or None."""
    try:
        checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, IndexError, OSError, tf.errors.OpError) as error:
        return (getattr(error, "message", None) or str(error) or type(error).__name__).strip().splitlines()[0]
    return None


def _discard_newer_checkpoints(checkpoint_dir: pathlib.Path, state, restored: str) -> None:
    """Delete the checkpoints after `restored` and make `restored` the latest one in the index."""
    paths = list(state.all_model_checkpoint_paths)
    kept = paths[: paths.index(restored) + 1]
    if kept == paths:
        return
    for path in paths[len(kept):]:
        logger.warning("Discarding %s, newer than the checkpoint the run resumes from.", path)
        for file in pathlib.Path(path).parent.glob(pathlib.Path(path).name + ".*"):
            file.unlink()
    # The index writer CheckpointManager itself uses (the public one is deprecated in TF 2).
    tf.__internal__.train.update_checkpoint_state(
        str(checkpoint_dir), restored, all_model_checkpoint_paths=kept, save_relative_paths=True,
        all_model_checkpoint_timestamps=list(state.all_model_checkpoint_timestamps)[: len(kept)] or None,
        last_preserved_timestamp=state.last_preserved_timestamp,
    )


def trim_log(log_path, last_step: int) -> None:
    """Keep the rows of log.csv up to `last_step` (the checkpoint resumed from) and drop a torn last line.

    The log is written before each checkpoint, so a killed run may have logged steps it then lost; the
    resumed run logs them again.
    """
    log_path = pathlib.Path(log_path)
    if not log_path.exists():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]
    rows = list(csv.DictReader(complete))
    kept = [line for line, row in zip(complete[1:], rows) if (row.get("step") or "").isdigit()
            and int(row["step"]) <= last_step]
    if kept == complete[1:] and len(complete) == len(lines):
        return
    if kept:
        files.write_text(log_path, "".join(complete[:1] + kept))
    else:
        log_path.unlink()


def read_run_config(output_dir) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs a run directory was trained with (its config.json).

    Fields the config classes have gained since take their defaults. Training fields they no longer have (or that
    a newer version wrote) are dropped with a warning: reading a run needs only the model to match exactly.
    """
    config_path = pathlib.Path(output_dir) / "config.json"
    if not pathlib.Path(output_dir).is_dir():
        raise FileNotFoundError(f"No run directory at {output_dir}.")
    if not config_path.exists():
        raise FileNotFoundError(f"{output_dir} is not a training run directory (no config.json).")
    config = files.read_json(config_path)
    train_values = config.get("train", {})
    unknown = sorted(set(train_values) - {field.name for field in dataclasses.fields(TrainConfig)})
    if unknown:
        logger.warning("%s: ignoring training settings this version does not know: %s.", config_path, unknown)
    try:
        return ModelConfig.from_dict(config["model"]), TrainConfig.from_dict(
            {key: value for key, value in train_values.items() if key not in unknown})
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{config_path} does not hold a valid run config: {error}") from error


def load_run(output_dir, step: int | None = None, precision: str = "float32") -> tuple[DiffusionModel, ModelConfig]:
    """Rebuild the model of a run directory and restore its newest checkpoint that loads (or `ckpt-<step>`).

    Only the network and EMA network are restored (no optimizer): sampling and evaluation read a run, never
    change it. The model's `metadata` names the run's dataset and the checkpoint's `training_steps`.
    `precision` is the dtype policy the network computes in (e.g. "mixed_bfloat16"); its weights stay float32
    either way.
    """
    output_dir = pathlib.Path(output_dir)
    model_config, train_config = read_run_config(output_dir)
    with dtype_policy(precision):
        model = model_config.build(metadata={"dataset": train_config.dataset})
    checkpoint = tf.train.Checkpoint(network=model.network, ema_network=model.ema_network)
    path = restore_newest(checkpoint, checkpoint_paths(output_dir / "checkpoints", step))
    if path is None:
        raise FileNotFoundError(f"{output_dir / 'checkpoints'} holds no checkpoint yet.")
    model.extra_metadata["training_steps"] = int(pathlib.Path(path).name.removeprefix("ckpt-"))
    return model, model_config


def load_export(path, precision: str | None = None) -> tuple[DiffusionModel, dict]:
    """Rebuild the `DiffusionModel` of an export from its metadata's `model_config`, with the export's EMA weights
    as both its network and its EMA network, and return it with the export's metadata: to re-export a model whose
    run directory is gone with other sampling defaults (`python export.py --model=<export>`).

    Weights are matched by their Keras paths (the SavedModel's variable names), every one of them, so a model
    config that does not describe the export fails here rather than exporting half-loaded weights.
    """
    version_dir = find_version_dir(path)
    metadata = read_metadata(version_dir)
    if "model_config" not in metadata:
        raise ValueError(f"{version_dir} has no model_config in its metadata (exports before it was recorded), so "
                         "its network cannot be rebuilt; export from its training run instead.")
    with dtype_policy(precision or metadata["dtype_policy"]):
        model = ModelConfig.from_dict(metadata["model_config"]).build(metadata={"dataset": metadata["dataset"]})
    loaded = tf.saved_model.load(str(version_dir))
    saved = {variable.name.removesuffix(":0"): variable for variable in loaded.captured_variables}
    assign_by_path(model, saved, f"{version_dir}'s variables do not match its model_config's network")
    model.extra_metadata["training_steps"] = metadata.get("training_steps")
    return model, metadata


def load_run_or_export(path) -> tuple[DiffusionModel, ModelConfig]:
    """The `DiffusionModel` and model config of a run directory (`load_run`, its newest checkpoint that loads) or
    of an export (`load_export`)."""
    if (pathlib.Path(path) / "config.json").is_file():
        return load_run(path)
    model, metadata = load_export(path)
    return model, ModelConfig.from_dict(metadata["model_config"])


def initialise_from(model, model_config: ModelConfig, source) -> int | None:
    """Set `model`'s network and EMA network to the EMA weights of `source` (a run directory, at its newest
    checkpoint that loads, or an export, whose network must be `model`'s) and return the steps `source` trained for.

    Settings without weights (objective, schedule, loss weighting...) may differ, to fine-tune on purpose; each
    difference is logged as a warning.
    """
    if not pathlib.Path(source).exists():
        raise FileNotFoundError(f"--init_from={source}: no export or run directory there.")
    try:
        source_model, source_config = load_run_or_export(source)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"--init_from={source} cannot be loaded: {error}") from error
    assign_by_path(model, {weight.path: weight for weight in source_model.ema_network.weights},
                   f"--init_from={source} holds a different network from this run's (pass the model flags it was "
                   "trained with)")
    changed = {key: (value, getattr(model_config, key)) for key, value in source_config.to_dict().items()
               if value != getattr(model_config, key)}
    if changed:
        logger.warning("--init_from=%s was trained with other model settings (source vs this run): %s.", source,
                       changed)
    return source_model.extra_metadata.get("training_steps")


def assign_by_path(model, saved: dict, mismatch: str) -> None:
    """Assign `saved` (Keras weight path -> value) to `model`'s network and EMA network, all or nothing: any weight
    missing on either side, or of another shape, raises a ValueError that starts with `mismatch`."""
    shapes = {weight.path: tuple(weight.shape) for weight in model.network.weights}
    misfits = sorted(set(saved) ^ set(shapes)) or [path for path in shapes if tuple(saved[path].shape) != shapes[path]]
    if misfits:
        raise ValueError(f"{mismatch}: {len(misfits)} weights differ in name or shape, e.g. {misfits[:3]}.")
    for network in (model.network, model.ema_network):
        for weight in network.weights:
            weight.assign(saved[weight.path])


def reexport(source, export_dir, version: int = 1, sampler=None, steps=None, eta=None, max_batch_size=None,
             precision: str | None = None) -> pathlib.Path:
    """Export an export's network again to `<export_dir>/<version>/` (`load_export`), keeping its metadata (dataset,
    training steps, model config) but sampling with `sampler`, `steps`, `eta` and `max_batch_size` where given (None
    keeps the source's; another sampler takes its own steps and eta, as in `resolve_sampling`)."""
    model, source_metadata = load_export(source, precision)
    sampler, steps, eta = resolve_sampling(source_metadata, model.schedule.num_timesteps, sampler, steps, eta)
    kept = {key: value for key, value in source_metadata.items() if key not in EXPORT_METADATA_KEYS}
    max_batch_size = source_metadata.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE) if max_batch_size is None else max_batch_size
    return export_savedmodel(model, export_dir, version, sampler=sampler, steps=steps, eta=eta, metadata=kept,
                             max_batch_size=max_batch_size)


def export_run(model, export_dir, model_config: ModelConfig, train_config: TrainConfig, training_steps: int,
               version: int = 1, sampler=None, steps=None, eta=None, max_batch_size=None) -> pathlib.Path:
    """Export a run's EMA network to `<export_dir>/<version>/` with the run's metadata.

    The export samples with the run's `export_sampler`, `export_steps`, `export_eta` and `export_max_batch`
    unless `sampler`, `steps`, `eta` or `max_batch_size` say otherwise (None keeps the run's; another sampler
    takes its own steps and eta 0, as in `resolve_sampling`).
    """
    run_defaults = dict(sampler=train_config.export_sampler, steps=train_config.export_steps, eta=train_config.export_eta)
    sampler, steps, eta = resolve_sampling(run_defaults, model.schedule.num_timesteps, sampler, steps, eta)
    max_batch_size = train_config.export_max_batch if max_batch_size is None else max_batch_size
    metadata = {"dataset": train_config.dataset, "training_steps": training_steps,
                "model_config": model_config.to_dict()}
    if train_config.init_from:  # `training_steps` counts this run's steps only
        metadata["init_from"] = train_config.init_from
    return export_savedmodel(model, export_dir, version, sampler=sampler, steps=steps, eta=eta, metadata=metadata,
                             max_batch_size=max_batch_size)


def sampling_precision(path, precision: str | None = None) -> tuple[str, str]:
    """The dtype policy the model at `path` samples in when asked for `precision`, and why.

    A run directory computes in float32 unless asked otherwise (`"auto"` picks per device, see
    `resolve_precision`). An exported model computes in the policy it was exported with (its metadata's
    `dtype_policy`), the one its seeds' images are defined by; it accepts only that policy, or `"auto"`.
    FileNotFoundError if there is nothing at `path`.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No model at {path}: pass a SavedModel folder (e.g. savedmodel) or a run directory.")
    if (path / "config.json").is_file():
        return resolve_precision(precision) if precision else ("float32", "the default for run directories")
    exported = read_metadata(find_version_dir(path)).get("dtype_policy", "float32")
    if precision not in (None, "auto", exported):
        raise ValueError(f"{path} is an exported model, which samples in {exported} as it was exported (so a seed "
                         f"gives the same image everywhere); precision {precision!r} needs a run directory.")
    return exported, "as exported"


def load_generator(path, step: int | None = None, precision: str | None = None) -> Generator:
    """A `Generator` from a run directory (its `DiffusionModel`, at `ckpt-<step>` if given) or an export folder
    (a `SavedModelGenerator`), sampling under the dtype policy `sampling_precision(path, precision)` picks."""
    path = pathlib.Path(path)
    policy, _ = sampling_precision(path, precision)  # an export refuses any policy but its own
    if (path / "config.json").is_file():
        model, _ = load_run(path, step, policy)
        return model
    if step is not None:
        raise ValueError(f"{path} is an exported model, which has no checkpoints: a step needs a run directory.")
    return SavedModelGenerator(*load_savedmodel(path))
