"""A resumable training run: run directory, precision, distribution strategy, optimizer, callbacks, export.

Layout of a run directory:

    config.json          model and training configuration (a rerun must match the model part)
    checkpoints/         tf.train.CheckpointManager: network, EMA network, optimizer, finished epochs
    log.csv              per-epoch loss, step, images seen, learning rate (appended across restarts)
    loss.png             the loss curve, redrawn every epoch
    samples/step_*.png   sample grids from fixed seeds
    best_ema.weights.h5  EMA weights with the lowest SWD so far, and best_ema.json (with --swd_every_epochs)
    tensorboard/         scalars and sample images
    savedmodel/1/        the exported EMA model (written when training finishes)
    workertemp_*/        a multi-worker run's non-chief copies, deleted when training ends (see worker_directory)

A Keras "epoch" here is `steps_per_epoch` optimizer steps and ends with a checkpoint, so a killed run
restarted with the same command resumes at the last finished epoch with the same step count, EMA and
optimizer state.
"""

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
    verbose: int | str = "auto"


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


def prepare_run_directory(output_dir, model_config: ModelConfig, train_config: TrainConfig) -> pathlib.Path:
    """Create the run directory and its config.json, or check that an existing run has the same model."""
    output_dir = plots.check_writable(output_dir)
    config_path = output_dir / "config.json"
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
    write_json(config_path, {"model": model_config.to_dict(), "train": dataclasses.asdict(train_config)})
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


def restore_checkpoint(output_dir, model, keep: int = 3, restore_dir=None):
    """Build the checkpoint and its manager and restore the latest one; returns (manager, finished_epochs).

    The manager saves into `output_dir`; the checkpoint restored is the latest of `restore_dir` (default
    `output_dir`): the chief's run directory, for a worker that writes into a `worker_directory` of its own.
    """
    epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_done")
    checkpoint = tf.train.Checkpoint(
        network=model.network, ema_network=model.ema_network, optimizer=model.optimizer, epochs_done=epochs_done
    )
    manager = tf.train.CheckpointManager(checkpoint, pathlib.Path(output_dir) / "checkpoints", max_to_keep=keep)
    latest_checkpoint = tf.train.latest_checkpoint(str(pathlib.Path(restore_dir or output_dir) / "checkpoints"))
    if latest_checkpoint:
        # Create the optimizer's slots first so that they are restored now, not deferred.
        model.optimizer.build(model.network.trainable_variables)
        try:
            checkpoint.restore(latest_checkpoint).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise ValueError(
                f"The checkpoint {latest_checkpoint} does not fit this model ({str(error).splitlines()[0]}). "
                "It was probably written by a different architecture; use a new --output_dir."
            ) from error
        logger.info("Resumed from %s (epoch %d).", latest_checkpoint, int(epochs_done.numpy()))
    return manager, epochs_done


def train(model_config: ModelConfig, train_config: TrainConfig, output_dir):
    """Train (or resume) a model in `output_dir`; returns the trained `DiffusionModel`.

    Raises:
        ValueError / FileNotFoundError / PermissionError: bad configuration, data or run directory.
        TrainingDiverged: the loss became NaN or infinite.
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
    output_dir = prepare_run_directory(worker_directory(run_dir, strategy), model_config, cfg)
    dataset = make_dataset(
        cfg.dataset, "train", model_config.image_size, cfg.batch_size, data_dir=cfg.data_dir, crop=cfg.crop,
        with_labels=model_config.num_classes > 0, cache=cfg.cache, seed=cfg.seed, channels=model_config.channels,
    )
    validation = None
    if cfg.validation_images:
        validation = make_dataset(
            cfg.dataset, "validation", model_config.image_size, cfg.batch_size, data_dir=cfg.data_dir,
            crop=cfg.crop, with_labels=model_config.num_classes > 0, cache=cfg.cache, seed=cfg.seed,
            num_images=cfg.validation_images, channels=model_config.channels,
        )

    with strategy.scope():
        model = model_config.build(seed=cfg.seed)
        model.compile(optimizer=make_optimizer(cfg), jit_compile=cfg.jit_compile)
        manager, epochs_done = restore_checkpoint(output_dir, model, cfg.keep_checkpoints, restore_dir=run_dir)

    total_epochs = math.ceil(cfg.train_steps / cfg.steps_per_epoch)
    guard = run_callbacks.NaNGuard()
    swd_monitor = []
    if cfg.swd_every_epochs:
        real_images = load_images(cfg.dataset, "validation", model_config.image_size, cfg.swd_images,
                                  data_dir=cfg.data_dir, crop=cfg.crop, channels=model_config.channels)
        swd_monitor = [run_callbacks.SWDMonitor(
            real_images, cfg.swd_every_epochs, output_dir / "best_ema.weights.h5", steps=cfg.sample_steps,
            eta=cfg.export_eta, batch_size=cfg.batch_size, seed=cfg.seed, face=cfg.monitor_face,
        )]
    callbacks = [
        run_callbacks.RunProgress(cfg.steps_per_epoch, cfg.batch_size),
        guard,
        run_callbacks.Checkpoint(manager, epochs_done),
        *swd_monitor,  # before CSVLogger and TensorBoard, which log its `swd` (and face metrics)
        keras.callbacks.CSVLogger(str(output_dir / "log.csv"), append=True),
        run_callbacks.LossCurve(output_dir / "log.csv", output_dir / "loss.png"),
        keras.callbacks.TensorBoard(str(output_dir / "tensorboard"), write_graph=False),
        run_callbacks.SampleGrid(
            output_dir / "samples", cfg.steps_per_epoch, cfg.num_samples, cfg.sample_every_epochs,
            steps=cfg.sample_steps, eta=cfg.export_eta, log_dir=output_dir / "tensorboard" / "samples", seed=cfg.seed,
        ),
    ]
    if int(epochs_done.numpy()) < total_epochs:
        model.fit(
            dataset, epochs=total_epochs, initial_epoch=int(epochs_done.numpy()), steps_per_epoch=cfg.steps_per_epoch,
            validation_data=validation, callbacks=callbacks, verbose=cfg.verbose,
        )
    if guard.bad_batch is not None:
        raise run_callbacks.TrainingDiverged(
            f"The loss became NaN or infinite in epoch {int(epochs_done.numpy()) + 1}, batch {guard.bad_batch}. "
            f"The last good checkpoint is kept in {output_dir / 'checkpoints'}; lower --learning_rate, "
            "set --clipnorm, or use --precision=float32."
        )
    if cfg.export:
        export_run(model, output_dir, model_config, cfg)
    if not strategy.extended.should_checkpoint:  # a worker's temporary folder (see worker_directory)
        shutil.rmtree(output_dir, ignore_errors=True)
    return model


def export_run(model, output_dir, model_config: ModelConfig, train_config: TrainConfig):
    """Export the EMA network to `<output_dir>/savedmodel/1` with the run's metadata."""
    from keras_ddpm.export import export_savedmodel

    metadata = {
        "dataset": train_config.dataset,
        "training_steps": int(model.optimizer.iterations.numpy()),  # (int() fails on a distributed variable)
        "model_config": model_config.to_dict(),
    }
    return export_savedmodel(model, pathlib.Path(output_dir) / "savedmodel", version=1,
                             sampler=train_config.export_sampler, steps=train_config.export_steps,
                             eta=train_config.export_eta, metadata=metadata)


def load_run(output_dir, use_checkpoint: str | None = None):
    """Rebuild the model of a run directory and restore its latest (or a given) checkpoint."""
    output_dir = pathlib.Path(output_dir)
    config_path = output_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{output_dir} is not a training run directory (no config.json).")
    model_config = ModelConfig.from_dict(read_json(config_path)["model"])
    model = model_config.build()
    checkpoint = tf.train.Checkpoint(network=model.network, ema_network=model.ema_network)
    path = use_checkpoint or tf.train.latest_checkpoint(str(output_dir / "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"{output_dir / 'checkpoints'} holds no checkpoint yet.")
    checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
    return model, model_config
