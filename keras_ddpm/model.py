"""`DiffusionModel`: a U-Net, its EMA copy and a noise schedule, trained with `fit()` and sampled with `generate()`."""

from typing import Literal, get_args

import keras
import numpy as np
import tensorflow as tf

from keras_ddpm import generation, samplers
from keras_ddpm.schedule import NoiseSchedule, Objective

LossWeighting = Literal["none", "min_snr"]
TimestepSampling = Literal["uniform", "log_normal"]
# EDM's training distribution of noise levels, ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1).
EDM_LOG_SIGMA_MEAN, EDM_LOG_SIGMA_STD = -1.2, 1.2


@keras.saving.register_keras_serializable(package="keras_ddpm")
class DiffusionModel(keras.Model):
    """A denoising diffusion model (Ho et al. 2020) with a custom `train_step` and a compiled sampler.

    Training (`fit()`): for each image draw t ~ U{0, ..., T-1} and noise ~ N(0, I), form
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise and regress the network's output on the noise
    (`objective="epsilon"`, L_simple of Ho et al. 2020, Eq. 14) or on v (`objective="v"`, Salimans & Ho 2022),
    optionally weighted by min-SNR-gamma (Hang et al. 2023). With `timestep_sampling="log_normal"`, t is instead
    the step whose noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is nearest a draw of
    ln(sigma) ~ N(-1.2, 1.2^2), EDM's training distribution (Karras et al. 2022, Sec. 5 and Table 1). With v it
    is EDM's recipe for data of unit scale: v-prediction is EDM's preconditioning with sigma_data = 1 and its
    loss weight lambda(sigma) c_out(sigma)^2 = 1. Under `mixed_float16` the loss is scaled by the
    `LossScaleOptimizer` that `compile()` wraps around the optimizer. After each update an exponential moving
    average of the weights is kept in `ema_network`; sampling and export use it.

    Conditional networks (built with `num_classes > 0`) take labels; with probability `label_dropout` a label
    is replaced by the null label `num_classes`, which trains the unconditional model used by
    classifier-free guidance (Ho & Salimans 2022) at the same time.

    Args:
        network: a U-Net from `build_unet`, called as `network([x_t, t])` or `network([x_t, t, labels])`.
        schedule: the `NoiseSchedule` (default: linear, T = 1000).
        objective: `"epsilon"` or `"v"`: what the network predicts.
        loss_weighting: `"none"` or `"min_snr"`.
        min_snr_gamma: gamma of min-SNR weighting.
        timestep_sampling: `"uniform"` or `"log_normal"`: how training draws t.
        ema_decay: the EMA's decay; the update after optimizer step n uses min(ema_decay, (1 + n) / (10 + n)).
        label_dropout: probability of training a conditional model on the null label.
        seed: seeds the training draws (timesteps, noise, label dropout) of `train_step`; default: drawn from
            NumPy's global generator, which `keras.utils.set_random_seed` seeds.
        metadata: descriptive entries added to `metadata`, such as `{"dataset": "celeba"}`.

    The defaults are `keras_ddpm.config.ModelConfig`'s (tests/test_config.py keeps them equal).

    Example:
    >>> from keras_ddpm.unet import build_unet
    >>> network = build_unet(image_size=16, width=16, channel_multipliers=(1, 2), norm_groups=8)
    >>> model = DiffusionModel(network)
    >>> model.compile(optimizer=keras.optimizers.Adam(2e-4))
    >>> history = model.fit(tf.random.uniform([8, 16, 16, 3], -1, 1), batch_size=4, epochs=1, verbose=0)
    >>> images = model.generate(4, steps=10)  # uint8 [4, 16, 16, 3]
    """

    def __init__(
        self,
        network: keras.Model,
        schedule: NoiseSchedule | None = None,
        objective: Objective = "epsilon",
        loss_weighting: LossWeighting = "none",
        min_snr_gamma: float = 5.0,
        timestep_sampling: TimestepSampling = "uniform",
        ema_decay: float = 0.9999,
        label_dropout: float = 0.1,
        seed: int | None = None,
        metadata: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value, kind in (("objective", objective, Objective), ("loss_weighting", loss_weighting, LossWeighting),
                                  ("timestep_sampling", timestep_sampling, TimestepSampling)):
            if value not in get_args(kind):
                raise ValueError(f"Unknown {name} {value!r}; choose one of {get_args(kind)}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")
        self.network = network
        self.schedule = schedule or NoiseSchedule()
        self.objective = objective
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma
        self.timestep_sampling = timestep_sampling
        self.ema_decay = ema_decay
        self.label_dropout = label_dropout
        self.seed = int(np.random.randint(2**31)) if seed is None else int(seed)
        self.extra_metadata = dict(metadata or {})
        self.ema_network = keras.models.clone_model(network)
        self.ema_network.set_weights(network.get_weights())
        self.ema_network.trainable = False
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.ema_loss_tracker = keras.metrics.Mean(name="ema_loss")
        self._sample_functions = {}
        self.built = True  # both networks already own their weights; Keras need not trace call() to build

    # -- what the network looks like -------------------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.network.inputs[0].shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of real classes of a conditional network (label `num_classes` is the null label); 0 if unconditional."""
        if len(self.network.inputs) < 3:
            return 0
        return self.network.get_layer("label_embedding").input_dim - 1

    # A model in memory takes any number of seeds per call; an export caps them (see `generation.Generator`).
    max_batch_size = None
    # EDM's sampler churns in the library's band; an export records the band its graphs were built with
    churn_sigmas = samplers.EDM_CHURN_SIGMAS

    @property
    def metadata(self) -> dict:
        """What the model is and how `generate` samples by default (the `generation.Generator` protocol)."""
        height, width, channels = self.image_shape
        return {
            "dataset": None,
            **self.extra_metadata,
            "image_size": [height, width],
            "channels": channels,
            "num_classes": self.num_classes,
            "schedule": self.schedule.get_config(),
            "objective": self.objective,
            "sampler": "ddim",
            "eta": 0.0,
            "spacing": None,  # each sampler's default (samplers.DEFAULT_SPACING)
        }

    @property
    def metrics(self):
        return [self.loss_tracker, self.ema_loss_tracker]

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    # -- training ----------------------------------------------------------------------------------------

    def _split_batch(self, data):
        """Accept `images` or `(images, labels)` batches; labels are required iff the network is conditional."""
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        if self.num_classes and labels is None:
            raise ValueError("This network is conditional (num_classes > 0): the dataset must yield (images, labels).")
        if not self.num_classes:
            labels = None
        return tf.cast(images, tf.float32), labels

    def diffusion_loss(self, network, images, labels, training, draws=None):
        """The per-batch training objective: E_t,noise [ w(t) ||target - network(x_t, t)||^2 ].

        `draws` is `(timesteps, noises, label_coins)` from `training_draws`; by default they are drawn afresh.
        """
        batch_size = tf.shape(images)[0]
        if draws is None:
            draws = (
                self._draw_timesteps([batch_size]),
                tf.random.normal(tf.shape(images)),
                tf.random.uniform([batch_size]),
            )
        timesteps, noises, label_coins = draws
        noisy_images = self.schedule.q_sample(images, timesteps, noises)
        inputs = [noisy_images, timesteps]
        if labels is not None:
            inputs.append(self._drop_labels(labels, label_coins) if training else tf.cast(labels, tf.int32))
        prediction = network(inputs, training=training)
        target = noises if self.objective == "epsilon" else self.schedule.velocity(images, timesteps, noises)
        per_image_error = tf.reduce_mean(tf.square(target - prediction), axis=[1, 2, 3])
        return tf.reduce_mean(self._loss_weights(timesteps) * per_image_error)

    def _drop_labels(self, labels, coins):
        """Replace each label by the null label with probability `label_dropout` (classifier-free guidance)."""
        return tf.where(coins < self.label_dropout, self.num_classes, tf.cast(labels, tf.int32))

    def training_draws(self, images):
        """Timesteps, noise and label-dropout coins for the images of this replica's part of the batch.

        Every draw is a function of (seed, optimizer step, the image's place in the global batch) alone. Under
        tf.distribute all replicas run the same program with the same seeds, so draws keyed by anything less
        would repeat across workers; keyed like this, each image gets its own draw, the same one whatever the
        number of replicas or workers, and a resumed run draws what the uninterrupted run would have drawn.
        Replica r holds images [r * B, (r + 1) * B) of the global batch (how tf.distribute splits a batch).
        """
        local_batch = tf.shape(images)[0]
        replica_context = tf.distribute.get_replica_context()
        replica_id = replica_context.replica_id_in_sync_group if replica_context else 0
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        places = tf.cast(replica_id * local_batch + tf.range(local_batch), tf.int64)
        step = tf.cast(self.optimizer.iterations, tf.int64)
        step_keys = tf.random.experimental.stateless_split(tf.stack([tf.constant(self.seed, tf.int64), step]), 2)

        def mine(values):  # a global-batch draw cut to this replica's images: cheap for scalars per image
            return tf.gather(values, places)

        global_batch = [local_batch * num_replicas]
        timesteps = mine(self._draw_timesteps(global_batch, step_keys[0]))
        label_coins = mine(tf.random.stateless_uniform(global_batch, step_keys[1]))
        noises = samplers.per_image_noise(places + ((self.seed % 2**31) << 32), step, self.image_shape)
        return timesteps, noises, label_coins

    def _draw_timesteps(self, shape, key=None):
        """Training timesteps, uniform or log-normal in noise level (see the class docstring); stateless given `key`."""
        if self.timestep_sampling == "uniform":
            bounds = {"minval": 0, "maxval": self.schedule.num_timesteps, "dtype": tf.int32}
            if key is None:
                return tf.random.uniform(shape, **bounds)
            return tf.random.stateless_uniform(shape, key, **bounds)
        normal = tf.random.normal(shape) if key is None else tf.random.stateless_normal(shape, key)
        return self.schedule.nearest_timesteps(EDM_LOG_SIGMA_MEAN + EDM_LOG_SIGMA_STD * normal)

    def _loss_weights(self, timesteps):
        """min-SNR-gamma weights (Hang et al. 2023, Eq. 8) expressed for the chosen objective; 1 otherwise."""
        if self.loss_weighting == "none":
            return tf.ones_like(timesteps, tf.float32)
        snr = self.schedule.snr(timesteps)
        clipped_snr = tf.minimum(snr, self.min_snr_gamma)
        # ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2, so the
        # x0-space weight min(SNR, gamma) becomes min(SNR, gamma) / SNR or min(SNR, gamma) / (SNR + 1).
        return clipped_snr / snr if self.objective == "epsilon" else clipped_snr / (snr + 1.0)

    def compile(self, *args, **kwargs):
        """`keras.Model.compile`, then the optimizer's slots for the network's weights.

        Built here, before the first train step, the slots make TensorFlow trace that step once. Built inside
        it, as Keras otherwise does, they are variables created in a `tf.function`, which traces it twice.
        """
        super().compile(*args, **kwargs)
        if not self.optimizer.built:
            self.optimizer.build(self.network.trainable_variables)

    def train_step(self, data):
        images, labels = self._split_batch(data)
        with tf.GradientTape() as tape:
            loss = self.diffusion_loss(self.network, images, labels, training=True, draws=self.training_draws(images))
            # Gradients are summed over replicas, so each replica contributes its share of the mean.
            replica_loss = loss / tf.distribute.get_strategy().num_replicas_in_sync
            scaled_loss = self.optimizer.scale_loss(replica_loss)
        trainable_weights = self.network.trainable_weights
        gradients = tape.gradient(scaled_loss, trainable_weights)
        self.optimizer.apply(gradients, trainable_weights)
        self._update_ema()
        self.loss_tracker.update_state(loss)
        return step_logs([self.loss_tracker])

    def test_step(self, data):
        images, labels = self._split_batch(data)
        self.loss_tracker.update_state(self.diffusion_loss(self.network, images, labels, training=False))
        self.ema_loss_tracker.update_state(self.diffusion_loss(self.ema_network, images, labels, training=False))
        return step_logs(self.metrics)

    def _update_ema(self):
        """ema <- decay * ema + (1 - decay) * weights, with the warm-up decay of tf.train.ExponentialMovingAverage.

        Under a strategy that mirrors variables the update runs once per variable in cross-replica context (like
        the optimizer's own updates), so mirrored EMA variables stay in sync. With plain variables (no strategy, or
        one device) each EMA variable is assigned directly: the same arithmetic, and a quarter of the tracing time.
        """
        num_updates = tf.cast(self.optimizer.iterations, tf.float32)
        decay = tf.minimum(self.ema_decay, (1.0 + num_updates) / (10.0 + num_updates))
        pairs = [(ema.value, weight.value) for ema, weight in zip(self.ema_network.weights, self.network.weights)]
        if not isinstance(pairs[0][0], tf.distribute.DistributedValues):
            for ema_variable, variable in pairs:
                ema_variable.assign(decay * ema_variable + (1.0 - decay) * variable)
            return

        def update(distribution, pairs):
            for ema_variable, variable in pairs:
                distribution.extended.update(
                    ema_variable, lambda e, v: e.assign(decay * e + (1.0 - decay) * v), args=(variable,), group=False
                )

        # The same helper Keras' optimizers use: merge_call where the strategy needs it, a direct call otherwise.
        tf.__internal__.distribute.interim.maybe_merge_call(update, tf.distribute.get_strategy(), pairs)

    # -- sampling ------------------------------------------------------------------------------------------

    def network_output(self, inputs, use_ema: bool = True) -> tf.Tensor:
        """The EMA network's (or, with `use_ema=False`, the trained network's) raw prediction, not training."""
        network = self.ema_network if use_ema else self.network
        return network(inputs, training=False)

    def sample_function(self, sampler="ddim", spacing=None, return_trajectory=False, use_ema=True,
                        report_steps=False, churn_sigmas=None):
        """The compiled sampler: f(seeds int64 [B], steps, eta, labels int32 [B], guidance) -> float32 images.

        One `tf.function` per (sampler, spacing, trajectory, weights, step reports, EDM's churn band, by default
        `churn_sigmas`) (see `generation.compile_sampler`), so new seeds, batch sizes or step counts never retrace.
        """
        churn_sigmas = tuple(churn_sigmas or self.churn_sigmas)
        key = (sampler, spacing, return_trajectory, use_ema, report_steps, churn_sigmas)
        if key not in self._sample_functions:
            self._sample_functions[key] = generation.compile_sampler(
                lambda inputs: self.network_output(inputs, use_ema), self.schedule, self.objective, self.image_shape,
                self.num_classes, sampler, spacing, return_trajectory, report_steps, churn_sigmas,
            )
        return self._sample_functions[key]

    def generate(
        self,
        num_images: int | None = None,
        *,
        seed: int = 0,
        seeds=None,
        steps: int | None = None,
        sampler: samplers.SamplerName | None = None,
        eta: float | None = None,
        spacing: samplers.Spacing | None = None,
        labels=None,
        guidance: float = 1.0,
        churn_sigmas=None,
        use_ema: bool = True,
        return_trajectory: bool = False,
        on_step: generation.StepCallback | None = None,
    ):
        """Generate images with the EMA network; returns uint8 [N, H, W, C] as a numpy array.

        Image i is drawn from seed `seed + i` (or `seeds[i]`); the same seed always gives the same image,
        whatever the batch, and an export's `serving_default` gives it for the same seed too when called with the
        export's sampler, steps and eta.

        Args:
            num_images: how many images (or pass `seeds`).
            seed: the first seed.
            seeds: explicit int seeds, one per image.
            steps: network evaluations; default T for `"ddpm"`, 50 for `"ddim"`, 20 for `"dpm++"`, 199 for `"edm"`.
            sampler: `"ddpm"`, `"ddim"`, `"dpm++"` or `"edm"` (see `keras_ddpm.samplers`); default
                `metadata["sampler"]` (`"ddim"`).
            eta: the noise of DDIM, DPM-Solver++ and EDM in [0, 1] (0: the ODE; EDM: 1 is its largest churn);
                default `metadata["eta"]` (0) for the default sampler, else 0.
            spacing: timestep spacing (`samplers.SPACINGS`); default `samplers.DEFAULT_SPACING[sampler]`:
                `"logsnr"` for `"dpm++"`, `"karras"` for `"edm"`, `"uniform"` otherwise.
            labels: for conditional models, one int or one per image; `num_classes` (the null label)
                samples unconditionally.
            guidance: classifier-free guidance scale w (1 = no guidance).
            churn_sigmas: the noise levels (S_tmin, S_tmax) EDM's sampler churns in; default `churn_sigmas`,
                (0.05, 1). `samplers.EDM_IMAGENET_CHURN_SIGMAS`, (0.05, 50), mends more broken faces and moves
                the coarse statistics further from real faces (REPORT.md 6.23). Other samplers ignore it.
            use_ema: sample with the EMA weights (default) or the raw training weights.
            return_trajectory: also return the float x_t before every step, [S, N, H, W, C].
            on_step: `on_step(calls_done)` after each network call, for a progress bar.
        """
        request = generation.check_request(self, num_images, seed, seeds, steps, sampler, eta, spacing, labels,
                                           guidance, churn_sigmas)
        sample = self.sample_function(request.sampler, spacing, return_trajectory, use_ema, on_step is not None,
                                      request.churn_sigmas)
        return generation.run_sampler(sample, request, return_trajectory, on_step)

    # -- serialisation ------------------------------------------------------------------------------------

    def get_config(self):
        return {
            **super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
            "schedule": self.schedule.get_config(),
            "objective": self.objective,
            "loss_weighting": self.loss_weighting,
            "min_snr_gamma": self.min_snr_gamma,
            "timestep_sampling": self.timestep_sampling,
            "ema_decay": self.ema_decay,
            "label_dropout": self.label_dropout,
            "seed": self.seed,
            "metadata": dict(self.extra_metadata),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        config["schedule"] = NoiseSchedule.from_config(config["schedule"])
        return cls(**config)


def step_logs(metrics) -> dict:
    """`{name: result}` of a train or test step, with a length-1 axis under a multi-worker strategy.

    Keras 3.15 averages a step's outputs over workers with `strategy.reduce(MEAN, value, axis=0)` (same test as
    here), which fails on scalars. Metric variables sum their updates over replicas, so every replica holds the
    same result and the mean of [result] is the result: the logs still get scalars.
    """
    logs = {metric.name: metric.result() for metric in metrics}
    strategy = tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode():
        logs = {name: value[tf.newaxis] for name, value in logs.items()}
    return logs

