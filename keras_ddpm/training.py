"""A resumable training run: run directory, precision, distribution strategy, optimizer, callbacks, export.

Layout of a run directory:

    config.json          model and training configuration (a rerun must match the model part)
    checkpoints/         tf.train.CheckpointManager: `ckpt-<step>` with network, EMA network and optimizer
    log.csv              per-epoch loss, step, images seen, learning rate (appended across restarts)
    loss.png             the loss curve, redrawn every epoch
    samples/step_*.png   sample grids from fixed seeds
    best_ema.weights.h5  EMA weights with the lowest SWD so far, and best_ema.json (with --swd_every_epochs)
    tensorboard/         scalars and sample images
    savedmodel/1/        the exported EMA model (written when training finishes)
    workertemp_*/        a multi-worker run's non-chief copies, deleted when training ends (see worker_directory)

A Keras "epoch" here is `steps_per_epoch` optimizer steps and ends with a checkpoint, so a killed run
restarted with the same command resumes at the last checkpoint with the same step count, EMA and optimizer
state. The optimizer's step count is the run's clock: the steps left, the checkpoint numbers and log.csv's
`step` column come from it, so a rerun may change `--steps_per_epoch`. Checkpoints are kept only from weights
that train well (see `callbacks.Checkpoint`); a damaged or diverged newest checkpoint falls back to the
newest one that restores, and `restore_checkpoint` goes back to an earlier one on purpose.
"""

import csv
import dataclasses
import logging
import math
import os
import pathlib
import shutil

import keras
import tensorflow as tf

from keras_ddpm import callbacks as run_callbacks
from keras_ddpm import plots
from keras_ddpm.config import ModelConfig, read_json, write_json
from keras_ddpm.data import load_images, make_dataset

logger = logging.getLogger(__name__)

PROBE_IMAGES = 16  # images in the batch on which weights must score a sane loss before they are saved
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: data, optimisation, precision, distribution, logging (see train.py's flags for each)."""

    dataset: str = "celeba"
    data_dir: str | None = None
    crop: str = "celeba64"
    cache: str | None = "memory"
    batch_size: int = 128
    train_steps: int = 100_000
    steps_per_epoch: int = 1000
    keep_checkpoints: int = 3
    learning_rate: float = 2e-4
    warmup_steps: int = 5000
    weight_decay: float = 0.0
    clipnorm: float | None = 1.0
    precision: str = "auto"
    jit_compile: bool = False
    strategy: str = "auto"
    seed: int = 0
    sample_every_epochs: int = 1
    num_samples: int = 64
    sample_steps: int = 50
    validation_images: int = 0
    swd_every_epochs: int = 0
    swd_images: int = 512
    monitor_face: bool = False
    export: bool = True
    export_sampler: str = "ddim"
    export_steps: int = 50
    export_eta: float = 0.0
    export_max_batch: int = 64
    restore_checkpoint: int | None = None  # resume from ckpt-<this step> instead of the newest
    verbose: int | str = "auto"

    def __post_init__(self):
        counts = ("batch_size", "train_steps", "steps_per_epoch", "keep_checkpoints", "sample_every_epochs",
                  "num_samples", "sample_steps", "swd_images", "export_steps", "export_max_batch")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.validation_images < 0 or self.swd_every_epochs < 0:
            raise ValueError("validation_images and swd_every_epochs must be >= 0 (0 = off).")


@keras.saving.register_keras_serializable(package="keras_ddpm")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate rising linearly from 0 to `peak` over `warmup_steps`, then constant (as in DDPM's code)."""

    def __init__(self, peak: float, warmup_steps: int):
        self.peak = peak
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        progress = (tf.cast(step, tf.float32) + 1.0) / max(self.warmup_steps, 1)
        return self.peak * tf.minimum(progress, 1.0)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps}


# CPU flags (as Linux names them in /proc/cpuinfo) of instructions that multiply bfloat16 natively; oneDNN
# runs bf16 convolutions on them several times faster than fp32 ones. Without them bf16 is emulated, and slow.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bf16_cpu_flags(cpuinfo_path="/proc/cpuinfo") -> list[str]:
    """The NATIVE_BF16_CPU_FLAGS this CPU reports; empty where /proc/cpuinfo does not exist (not Linux)."""
    try:
        text = pathlib.Path(cpuinfo_path).read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]


def resolve_precision(precision: str, cpuinfo_path="/proc/cpuinfo") -> tuple[str, str]:
    """The dtype policy for `precision`, and why: `auto` picks per device.

    `auto` means mixed_float16 on a GPU, mixed_bfloat16 on a CPU with native bf16 instructions (AMX-BF16 or
    AVX512_BF16) and float32 on other CPUs, where float16 and bfloat16 are emulated and slower than float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {PRECISIONS}.")
    if precision != "auto":
        return precision, "set by --precision"
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16", "auto: a GPU is visible"
    bf16_flags = native_bf16_cpu_flags(cpuinfo_path)
    if bf16_flags:
        return "mixed_bfloat16", f"auto: no GPU, and the CPU has native bf16 ({', '.join(bf16_flags)})"
    return "float32", "auto: no GPU, and the CPU has no native bf16 (amx_bf16 or avx512_bf16)"


def make_strategy(name: str) -> tf.distribute.Strategy:
    """A tf.distribute strategy by name; `auto` mirrors over several GPUs and uses one device otherwise.

    `multi_worker` must come before anything initialises TensorFlow's runtime (listing logical devices does):
    it configures the collective ops, which is only possible at program start-up.
    """
    if name == "multi_worker":  # the cluster comes from the TF_CONFIG environment variable
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "one_device"
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "tpu":
        # TPU_NAME names a TPU node; without it, the TPU attached to this TPU VM ("local").
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", "local"))
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"Unknown strategy {name!r}; choose one of {STRATEGIES}.")


class GlobalClipAdam(keras.optimizers.Adam):
    """Adam whose `global_clipnorm` bounds the gradient of the global batch under any tf.distribute strategy.

    Keras 3.15 clips in `apply()`, before `_backend_update_step` sums the replicas' gradients, so with N
    replicas `global_clipnorm` bounds each replica's share, and a clipped step differs from the same step on
    one device. This optimizer clips after the sum; on one device nothing changes. (Only `global_clipnorm`
    moves; `make_optimizer` sets no other clipping.)
    """

    def _clip_gradients(self, grads):
        return grads if self.global_clipnorm else super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        grads_and_vars = super()._all_reduce_sum_gradients(grads_and_vars)
        if not self.global_clipnorm:
            return grads_and_vars
        gradients, variables = zip(*grads_and_vars)
        clipped, _ = tf.clip_by_global_norm(list(gradients), self.global_clipnorm)
        return list(zip(clipped, variables))


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    """Adam with linear warm-up, optional decoupled weight decay and global-norm gradient clipping."""
    return GlobalClipAdam(
        learning_rate=LinearWarmup(config.learning_rate, config.warmup_steps),
        weight_decay=config.weight_decay or None,
        global_clipnorm=config.clipnorm or None,
    )


def check_same_model(output_dir, model_config: ModelConfig) -> None:
    """Refuse an existing run directory that holds a run of a different model; reads only."""
    config_path = pathlib.Path(output_dir) / "config.json"
    if config_path.exists():
        saved = ModelConfig.from_dict(read_json(config_path)["model"])
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
    output_dir = plots.check_writable(output_dir)
    clean_stale_files(output_dir)
    write_json(output_dir / "config.json", {"model": model_config.to_dict(), "train": dataclasses.asdict(train_config)})
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
    from keras_ddpm.export import clean_stale_exports

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
    `callbacks.weights_problem` on `probe_batch` (images, labels) is skipped with a warning, and the one
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
    candidates = list(state.all_model_checkpoint_paths) if state else []
    if step is not None:
        wanted = [path for path in candidates if pathlib.Path(path).name == f"ckpt-{step}"]
        if not wanted:
            available = ", ".join(pathlib.Path(path).name.removeprefix("ckpt-") for path in candidates) or "none"
            raise ValueError(f"No checkpoint of step {step} in {checkpoint_dir} (steps available: {available}).")
        candidates = wanted
    if candidates:
        # Create the optimizer's slots first so that they are restored now, not deferred.
        model.optimizer.build(model.network.trainable_variables)
    usable = (lambda: run_callbacks.weights_problem(model, *probe_batch)) if probe_batch else None
    path = restore_newest(checkpoint, candidates, usable)
    step_restored = run_callbacks.optimizer_step(model)
    if path is not None:
        if owns_checkpoints:
            _discard_newer_checkpoints(checkpoint_dir, state, path)
        logger.info("Resumed from %s (step %d).", path, step_restored)
    # The manager reads the pruned index of the folder it saves into.
    manager = tf.train.CheckpointManager(checkpoint, pathlib.Path(output_dir) / "checkpoints", max_to_keep=keep)
    return manager, step_restored


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
        partial = log_path.with_name(log_path.name + ".partial")
        partial.write_text("".join(complete[:1] + kept))
        partial.replace(log_path)
    else:
        log_path.unlink()


def train(model_config: ModelConfig, train_config: TrainConfig, output_dir):
    """Train (or resume) a model in `output_dir`; returns the trained `DiffusionModel`.

    Raises:
        ValueError / FileNotFoundError / PermissionError: bad configuration, data or run directory.
        TrainingDiverged: the loss diverged (NaN, infinite or huge); only checkpoints that train well are kept.
    """
    cfg = train_config
    strategy = make_strategy(cfg.strategy)  # first: a multi-worker strategy must precede any TensorFlow work
    if cfg.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"--batch_size={cfg.batch_size} (the global batch) must be a multiple of the "
                         f"{strategy.num_replicas_in_sync} replicas, so that each gets the same number of images.")
    precision, reason = resolve_precision(cfg.precision)
    logger.info("Precision: %s (%s).", precision, reason)
    keras.mixed_precision.set_dtype_policy(precision)
    keras.utils.set_random_seed(cfg.seed)
    run_dir = pathlib.Path(output_dir)
    check_same_model(run_dir, model_config)
    data_options = dict(data_dir=cfg.data_dir, crop=cfg.crop, with_labels=model_config.num_classes > 0,
                        seed=cfg.seed, channels=model_config.channels)
    dataset = make_dataset(cfg.dataset, "train", model_config.image_size, cfg.batch_size, cache=cfg.cache,
                           **data_options)
    validation = None
    if cfg.validation_images:
        validation = make_dataset(cfg.dataset, "validation", model_config.image_size, cfg.batch_size,
                                  cache=cfg.cache, num_images=cfg.validation_images, **data_options)
    # A fixed batch on which weights must score a sane loss before they are checkpointed.
    probe = next(iter(make_dataset(cfg.dataset, "train", model_config.image_size, PROBE_IMAGES, cache=None,
                                   training=False, num_images=PROBE_IMAGES, **data_options)))
    probe = probe if model_config.num_classes else (probe, None)

    with strategy.scope():
        model = model_config.build(seed=cfg.seed)  # before the run directory is written: a bad config fails here
        model.compile(optimizer=make_optimizer(cfg), jit_compile=cfg.jit_compile)
    output_dir = prepare_run_directory(worker_directory(run_dir, strategy), model_config, cfg)
    with strategy.scope():
        manager, start_step = restore_checkpoint(output_dir, model, cfg.keep_checkpoints, cfg.restore_checkpoint,
                                                 probe, restore_dir=run_dir)
    trim_log(output_dir / "log.csv", start_step)

    guard = run_callbacks.NaNGuard()
    checkpoints = run_callbacks.Checkpoint(manager, *probe)
    swd_monitor = []
    if cfg.swd_every_epochs:
        real_images = load_images(cfg.dataset, "validation", model_config.image_size, cfg.swd_images,
                                  data_dir=cfg.data_dir, crop=cfg.crop, channels=model_config.channels)
        swd_monitor = [run_callbacks.SWDMonitor(
            real_images, cfg.swd_every_epochs, output_dir / "best_ema.weights.h5", steps=cfg.sample_steps,
            eta=cfg.export_eta, batch_size=cfg.batch_size, seed=cfg.seed, face=cfg.monitor_face,
        )]
    callbacks = [
        run_callbacks.RunProgress(cfg.batch_size, cfg.train_steps),
        guard,
        *swd_monitor,  # before the CSV log and TensorBoard, which log its `swd` (and face metrics)
        run_callbacks.CSVLog(output_dir / "log.csv"),
        checkpoints,  # after the CSV log (see callbacks.Checkpoint)
        run_callbacks.LossCurve(output_dir / "log.csv", output_dir / "loss.png"),
        keras.callbacks.TensorBoard(str(output_dir / "tensorboard"), write_graph=False),
        run_callbacks.SampleGrid(
            output_dir / "samples", cfg.num_samples, cfg.sample_every_epochs, steps=cfg.sample_steps,
            eta=cfg.export_eta, log_dir=output_dir / "tensorboard" / "samples", seed=cfg.seed,
        ),
    ]
    steps_left = cfg.train_steps - start_step
    if steps_left > 0:
        first_epoch = start_step // cfg.steps_per_epoch
        model.fit(
            dataset, epochs=first_epoch + math.ceil(steps_left / cfg.steps_per_epoch), initial_epoch=first_epoch,
            steps_per_epoch=cfg.steps_per_epoch, validation_data=validation, callbacks=callbacks, verbose=cfg.verbose,
        )
    if guard.diverged_at is not None or checkpoints.refused:
        raise run_callbacks.TrainingDiverged(divergence_message(manager, start_step, guard, checkpoints))
    if cfg.export:
        export_run(model, output_dir, model_config, cfg)
    if not strategy.extended.should_checkpoint:  # a worker's temporary folder (see worker_directory)
        shutil.rmtree(output_dir, ignore_errors=True)
    return model


def divergence_message(manager, start_step: int, guard, checkpoints) -> str:
    """What diverged, what is kept, and the ways on: lower the learning rate or step back a checkpoint."""
    what = (f"The loss diverged (NaN, infinite or above {run_callbacks.DIVERGED_LOSS:g}) at step {guard.diverged_at}"
            if guard.diverged_at is not None else f"The weights diverged ({checkpoints.refused})")
    steps = [int(pathlib.Path(path).name.removeprefix("ckpt-")) for path in manager.checkpoints]
    kept = f"Checkpoints kept in {manager.directory} (steps {', '.join(map(str, steps))})" if steps else "No checkpoint"
    message = f"{what}; nothing after the last good weights was saved. {kept}. "
    if start_step and not checkpoints.saved and len(steps) > 1:
        message += (f"It diverged right after resuming from step {start_step}: if that checkpoint is to blame, "
                    f"step back with --restore_checkpoint={steps[-2]} (newer checkpoints are then deleted); ")
    return message + "lower --learning_rate, set --clipnorm, or use --precision=float32."


def export_run(model, output_dir, model_config: ModelConfig, train_config: TrainConfig):
    """Export the EMA network to `<output_dir>/savedmodel/1` with the run's metadata."""
    from keras_ddpm.export import export_savedmodel

    metadata = {
        "dataset": train_config.dataset,
        "training_steps": run_callbacks.optimizer_step(model),
        "model_config": model_config.to_dict(),
    }
    return export_savedmodel(model, pathlib.Path(output_dir) / "savedmodel", version=1,
                             sampler=train_config.export_sampler, steps=train_config.export_steps,
                             eta=train_config.export_eta, metadata=metadata,
                             max_batch_size=train_config.export_max_batch)


def load_run(output_dir, use_checkpoint: str | None = None):
    """Rebuild the model of a run directory and restore its newest checkpoint that loads (or a given one)."""
    output_dir = pathlib.Path(output_dir)
    config_path = output_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{output_dir} is not a training run directory (no config.json).")
    model_config = ModelConfig.from_dict(read_json(config_path)["model"])
    model = model_config.build()
    checkpoint = tf.train.Checkpoint(network=model.network, ema_network=model.ema_network)
    if use_checkpoint:
        paths = [use_checkpoint]
    else:
        state = tf.train.get_checkpoint_state(str(output_dir / "checkpoints"))
        paths = list(state.all_model_checkpoint_paths) if state else []
    if restore_newest(checkpoint, paths) is None:
        raise FileNotFoundError(f"{output_dir / 'checkpoints'} holds no checkpoint yet.")
    return model, model_config
