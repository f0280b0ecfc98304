"""A resumable training run: precision, distribution strategy, optimizer, callbacks, export.

The run directory, its checkpoints and their restore live in `keras_ddpm.runs` (see its layout). A Keras
"epoch" here is `steps_per_epoch` optimizer steps and ends with a checkpoint, so a killed run restarted with
the same command resumes at the last checkpoint with the same step count, EMA and optimizer state. The
optimizer's step count is the run's clock: the steps left, the checkpoint numbers and log.csv's `step` column
come from it, so a rerun may change `--steps_per_epoch`. Checkpoints are kept only from weights that train
well (see `callbacks.Checkpoint`); a damaged or diverged newest checkpoint falls back to the newest one that
restores, and `restore_checkpoint` goes back to an earlier one on purpose.
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
from keras_ddpm import samplers
from keras_ddpm.config import STRATEGIES, ModelConfig, TrainConfig
from keras_ddpm.data import load_images, make_dataset
from keras_ddpm.errors import TrainingDiverged
from keras_ddpm.precision import dtype_policy, resolve_precision
from keras_ddpm.runs import (DIVERGED_LOSS, check_same_model, checkpoint_paths, export_run, initialise_from,
                             optimizer_step, prepare_run_directory, read_run_config, restore_checkpoint, trim_log,
                             worker_directory)

logger = logging.getLogger(__name__)

PROBE_IMAGES = 16  # images in the batch on which weights must score a sane loss before they are saved


@keras.saving.register_keras_serializable(package="keras_ddpm")
class WarmupStableDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate: linear warm-up from 0 to `peak`, constant, then an optional linear cool-down to 0.

    With `cooldown_steps=0` this is DDPM's schedule (warm-up, then constant). A cool-down over the last
    `cooldown_steps` of `total_steps` is the "warmup-stable-decay" schedule (Hägele et al. 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations"): the constant phase does not depend on where the run
    will end, so a long run can be forked at any checkpoint and the copy cooled down to finish it.
    `cooldown_steps` lies in [0, total_steps] (`TrainConfig` checks it).
    """

    def __init__(self, peak: float, warmup_steps: int, cooldown_steps: int = 0, total_steps: int = 0):
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.cooldown_steps = cooldown_steps
        self.total_steps = total_steps

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        factor = tf.minimum((step + 1.0) / max(self.warmup_steps, 1), 1.0)
        if self.cooldown_steps:
            factor = tf.minimum(factor, tf.maximum(self.total_steps - step, 0.0) / self.cooldown_steps)
        return self.peak * factor

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "cooldown_steps": self.cooldown_steps,
                "total_steps": self.total_steps}


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
    """Adam whose `global_clipnorm` bounds the gradient of the global batch under any tf.distribute strategy,
    updating each variable with TensorFlow's fused Adam kernel.

    Keras 3.15 clips in `apply()`, before `_backend_update_step` sums the replicas' gradients, so with N
    replicas `global_clipnorm` bounds each replica's share, and a clipped step differs from the same step on
    one device. This optimizer clips after the sum; on one device nothing changes. (Only `global_clipnorm`
    moves; `make_optimizer` sets no other clipping.)
    """

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        """Adam's update (Kingma & Ba 2015, Algorithm 1 in the form at the end of their Section 2):

            m <- m + (1 - beta_1) (g - m),   v <- v + (1 - beta_2) (g^2 - v),
            variable <- variable - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)

        Keras' `update_step` builds this from about 40 graph ops per variable, half of the CPU recipe's train
        step graph, and tracing and optimising that graph is most of the first step's time. Here the scalars are
        computed once per step and each variable takes one fused `ResourceApplyAdam` op: the same arithmetic.
        The slot variables stay Keras', so checkpoints do not change.
        """
        if self.amsgrad:
            return super()._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1, beta_2 = tf.constant(self.beta_1, tf.float32), tf.constant(self.beta_2, tf.float32)
        scalars = dict(beta1_power=beta_1**step, beta2_power=beta_2**step, beta1=beta_1, beta2=beta_2,
                       epsilon=tf.constant(self.epsilon, tf.float32))

        def fused_adam(variable, gradient, learning_rate):
            index = self._get_variable_index(variable)
            as_variable = {name: tf.cast(value, variable.dtype)  # float32: no op
                           for name, value in {**scalars, "lr": learning_rate}.items()}
            tf.raw_ops.ResourceApplyAdam(var=variable.handle, m=self._momentums[index].handle,
                                         v=self._velocities[index].handle, grad=tf.cast(gradient, variable.dtype),
                                         **as_variable)

        # The learning rate goes in as an argument: with several local replicas it is a per-replica value, which
        # `update` hands to each replica's copy of the variable (as in Keras' own `_distributed_tf_update_step`).
        for gradient, variable in grads_and_vars:
            distribution.extended.update(variable, fused_adam, args=(gradient, learning_rate), group=False)

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
    """Adam with linear warm-up (and cool-down), optional decoupled weight decay and global-norm gradient clipping."""
    return GlobalClipAdam(
        learning_rate=WarmupStableDecay(config.learning_rate, config.warmup_steps, config.cooldown_steps,
                                        config.train_steps),
        weight_decay=config.weight_decay or None,
        global_clipnorm=config.clipnorm or None,
    )


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
    for name in ("sample_steps", "export_steps"):  # else they would fail at the first grid, or after training
        samplers.check_steps_and_eta(getattr(cfg, name), cfg.export_eta, model_config.num_timesteps,
                                     names=(f"--{name}", "--export_eta"))
    precision, reason = resolve_precision(cfg.precision)
    logger.info("Precision: %s (%s).", precision, reason)
    with dtype_policy(precision):  # the caller's own policy comes back afterwards
        return _train_under_policy(model_config, cfg, output_dir, strategy)


def _train_under_policy(model_config: ModelConfig, cfg: TrainConfig, output_dir, strategy):
    """`train` after its checks, with the run's dtype policy set: data, model, fit, export."""
    keras.utils.set_random_seed(cfg.seed)
    run_dir = pathlib.Path(output_dir)
    check_same_model(run_dir, model_config)
    data_options = dict(data_dir=cfg.data_dir, crop=cfg.crop, with_labels=model_config.num_classes > 0,
                        seed=cfg.seed, channels=model_config.channels)
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
    cfg = start_weights(model, model_config, cfg, run_dir)
    output_dir = prepare_run_directory(worker_directory(run_dir, strategy), model_config, cfg)
    with strategy.scope():
        manager, start_step = restore_checkpoint(output_dir, model, cfg.keep_checkpoints, cfg.restore_checkpoint,
                                                 probe, restore_dir=run_dir)
    trim_log(output_dir / "log.csv", start_step)
    # One batch a step: a resumed run goes on with the batches an uninterrupted run would have trained on.
    if start_step:
        logger.info("Resuming at step %d: the data stream goes on at batch %d.", start_step, start_step)
    dataset = make_dataset(cfg.dataset, "train", model_config.image_size, cfg.batch_size, cache=cfg.cache,
                           start_batch=start_step, **data_options)

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
        run_callbacks.TrainingCurves(output_dir / "log.csv", output_dir / "loss.png"),
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
        raise TrainingDiverged(divergence_message(manager, start_step, guard, checkpoints))
    if cfg.export:
        export_run(model, output_dir / "savedmodel", model_config, cfg, optimizer_step(model))
    if not strategy.extended.should_checkpoint:  # a worker's temporary folder (see worker_directory)
        shutil.rmtree(output_dir, ignore_errors=True)
    return model


def start_weights(model, model_config: ModelConfig, cfg: TrainConfig, run_dir: pathlib.Path) -> TrainConfig:
    """Check --restore_checkpoint and apply --init_from before the run directory is written (so bad flags leave
    nothing behind); returns `cfg` with the `init_from` the run's weights really came from.

    A run that already has checkpoints resumes from its own weights: it keeps the `init_from` it started with.
    """
    own_checkpoints = checkpoint_paths(run_dir / "checkpoints", cfg.restore_checkpoint)
    if own_checkpoints:
        started_from = read_run_config(run_dir)[1].init_from
        if cfg.init_from != started_from:
            logger.warning("Resuming %s from its own checkpoints: --init_from=%s is ignored (the run started from "
                           "%s).", run_dir, cfg.init_from, started_from)
        return dataclasses.replace(cfg, init_from=started_from)
    if cfg.init_from:
        source_steps = initialise_from(model, model_config, cfg.init_from)
        logger.info("Starting from the EMA weights of %s (%s training steps), with a fresh optimizer.",
                    cfg.init_from, source_steps)
    return cfg


def divergence_message(manager, start_step: int, guard, checkpoints) -> str:
    """What diverged, what is kept, and the ways on: lower the learning rate or step back a checkpoint."""
    what = (f"The loss diverged (NaN, infinite or above {DIVERGED_LOSS:g}) at step {guard.diverged_at}"
            if guard.diverged_at is not None else f"The weights diverged ({checkpoints.refused})")
    steps = [int(pathlib.Path(path).name.removeprefix("ckpt-")) for path in manager.checkpoints]
    kept = f"Checkpoints kept in {manager.directory} (steps {', '.join(map(str, steps))})" if steps else "No checkpoint"
    message = f"{what}; nothing after the last good weights was saved. {kept}. "
    if start_step and not checkpoints.saved and len(steps) > 1:
        message += (f"It diverged right after resuming from step {start_step}: if that checkpoint is to blame, "
                    f"step back with --restore_checkpoint={steps[-2]} (newer checkpoints are then deleted); ")
    return message + "lower --learning_rate, set --clipnorm, or use --precision=float32."
