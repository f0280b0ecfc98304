"""`ModelConfig` and `TrainConfig`: the one place where the project's defaults live.

A field's default is DDPM's setting (Ho et al. 2020: epsilon-prediction, learning rate 2e-4 with 5,000 warm-up
steps, batch 128, EMA 0.9999) where DDPM has one; the recipes in `celeba.flags` and `flags/` set their own values
on top (v-prediction, precision, XLA, run length). A field's `help` metadata is the text of the command-line flag
that `keras_ddpm.cli` derives from it, so a default or its description cannot drift between the scripts,
`config.json` and the library. Run directories store both as `config.json` (`keras_ddpm.runs`).
`DiffusionModel` and `NoiseSchedule` take the same defaults; `build_unet` too, except its `width`,
`attention_resolutions` and `dropout` (see tests/test_config.py, which pins them).

This module imports none of the model code (`ModelConfig.build` does, when called), so defining the scripts'
flags loads no U-Net, sampler or metric.
"""

import dataclasses
from typing import Any

DATASETS = ("celeba", "celeba_tfds", "fashion_mnist", "cifar10", "synthetic")
CROPS = ("celeba64", "center140")
SCHEDULES = ("linear", "cosine")
OBJECTIVES = ("epsilon", "v")
LOSS_WEIGHTINGS = ("none", "min_snr")
TIMESTEP_SAMPLINGS = ("uniform", "log_normal")
SAMPLERS = ("ddpm", "ddim", "dpm++", "edm")
SPACINGS = ("uniform", "quadratic", "logsnr", "karras")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
AUTO_PRECISION = ("auto: mixed_float16 on a GPU, mixed_bfloat16 on a CPU with native bf16 (AMX-BF16 or AVX512_BF16), "
                  "float32 elsewhere")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


def setting(default: Any, help: str, choices: tuple | None = None, flag: str | None = None) -> Any:
    """A dataclass field with a default and the help text of its flag.

    Args:
        default: the default value (tuples for sequences: the dataclasses are frozen and hashable).
        help: the flag's help text.
        choices: the allowed values, for an enum flag.
        flag: the flag's name when it differs from the field's; "" for a field that has no flag.
    """
    metadata = {"help": help, "choices": choices, "flag": flag}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The U-Net, schedule and objective of a diffusion model (see `build_unet` and `DiffusionModel` for each field).

    Example:
    >>> config = ModelConfig(image_size=32, width=32, channel_multipliers=(1, 2), dropout=0.0)
    >>> config.to_dict()["width"]
    32
    """

    image_size: int = setting(64, "Image side; default: the dataset's usual size.")
    channels: int = setting(3, "Image channels (set by the dataset).", flag="")
    num_classes: int = setting(0, "Real classes of a conditional model, 0 if unconditional (set by the dataset).",
                               flag="")
    width: int = setting(128, "Channels at the first U-Net level.")
    channel_multipliers: tuple[int, ...] = setting((1, 2, 2, 2), "Width multiplier per resolution level.")
    num_res_blocks: int = setting(2, "Residual blocks per level.")
    attention_resolutions: tuple[int, ...] = setting(
        (16,), "Resolutions with self-attention (besides the bottleneck).")
    bottleneck_attention: bool = setting(True, "Self-attention in the middle block.")
    num_heads: int = setting(4, "Attention heads.")
    dropout: float = setting(0.1, "Dropout in residual blocks.")
    norm_groups: int = setting(32, "GroupNormalization groups.")
    schedule: str = setting("linear", "Noise schedule.", SCHEDULES)
    num_timesteps: int = setting(1000, "Diffusion steps T.")
    beta_start: float = setting(1e-4, "beta_1 of the linear schedule (Ho et al. 2020).")
    beta_end: float = setting(0.02, "beta_T of the linear schedule (Ho et al. 2020).")
    objective: str = setting("epsilon", "What the network predicts.", OBJECTIVES)
    loss_weighting: str = setting("none", "Loss weighting over timesteps.", LOSS_WEIGHTINGS)
    min_snr_gamma: float = setting(5.0, "gamma of min-SNR-gamma loss weighting (Hang et al. 2023).")
    timestep_sampling: str = setting(
        "uniform", "Training timesteps: uniform, or log_normal noise levels as in EDM (Karras et al. 2022).",
        TIMESTEP_SAMPLINGS)
    ema_decay: float = setting(0.9999, "EMA decay of the sampling weights.")
    label_dropout: float = setting(0.1, "Classifier-free guidance: probability of the null label in training.")

    def build(self, seed: int | None = None, metadata: dict | None = None) -> "DiffusionModel":  # noqa: F821
        """A fresh `DiffusionModel` (build it inside a `tf.distribute` scope to place its variables there).

        `seed` seeds its training draws (see `DiffusionModel`); every worker of a multi-worker run passes the same.
        `metadata` adds descriptive entries (such as the dataset) to the model's `metadata`.
        """
        # Imported here, not at the top: defining and parsing flags from this module must not load TensorFlow.
        from keras_ddpm.model import DiffusionModel
        from keras_ddpm.schedule import NoiseSchedule
        from keras_ddpm.unet import build_unet

        network = build_unet(
            image_size=self.image_size,
            channels=self.channels,
            width=self.width,
            channel_multipliers=self.channel_multipliers,
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=self.attention_resolutions,
            bottleneck_attention=self.bottleneck_attention,
            num_heads=self.num_heads,
            dropout=self.dropout,
            num_classes=self.num_classes,
            norm_groups=self.norm_groups,
        )
        return DiffusionModel(
            network,
            NoiseSchedule(self.schedule, self.num_timesteps, self.beta_start, self.beta_end),
            objective=self.objective,
            loss_weighting=self.loss_weighting,
            min_snr_gamma=self.min_snr_gamma,
            timestep_sampling=self.timestep_sampling,
            ema_decay=self.ema_decay,
            label_dropout=self.label_dropout,
            seed=seed,
            metadata=metadata,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        """The config of a `to_dict()`; keys added to the class since (e.g. `min_snr_gamma`) take their defaults."""
        return config_from_dict(cls, values)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: data, optimisation, precision, distribution, logging (each field's `help` says what it does)."""

    # Data
    dataset: str = setting("celeba", "Training data.", DATASETS)
    data_dir: str | None = setting(None, "CelebA image folder (or its parent); TFDS data dir for TFDS datasets.")
    crop: str = setting("celeba64", "CelebA crop box (see keras_ddpm/data/celeba.py).", CROPS)
    cache: str | None = setting("memory", "tf.data cache after crop+resize: 'memory', a directory, or 'none'.")
    # Optimisation
    learning_rate: float = setting(2e-4, "Peak Adam learning rate.")
    warmup_steps: int = setting(5000, "Linear learning-rate warm-up steps.")
    cooldown_steps: int = setting(
        0, "Final steps of --train_steps over which the learning rate falls linearly to 0 (0: constant to the end). "
        "To finish a long run, copy its directory and resume the copy with a nearer --train_steps and this.")
    weight_decay: float = setting(0.0, "Decoupled weight decay.")
    clipnorm: float | None = setting(1.0, "Global gradient-norm clip (0 = off).")
    batch_size: int = setting(128, "Global batch size (split across replicas).")
    train_steps: int = setting(100_000, "Total optimizer steps.")
    steps_per_epoch: int = setting(1000, "Steps per Keras epoch; a checkpoint, a log row and maybe a grid each.")
    keep_checkpoints: int = setting(3, "Checkpoints kept (only weights that train well are saved).")
    restore_checkpoint: int | None = setting(
        None, "Resume from checkpoints/ckpt-N (N = its step) instead of the newest; newer checkpoints are deleted.")
    init_from: str | None = setting(
        None, "Start a new run from the EMA weights of this export or run directory (same network), with a fresh "
        "optimizer: to train a model further after its cool-down. A run that resumes from its own checkpoint ignores it.")
    # Hardware
    precision: str = setting(
        "auto", f"{AUTO_PRECISION}.", PRECISIONS)
    jit_compile: bool = setting(False, "Compile the train step with XLA (jit_compile).", flag="xla")
    strategy: str = setting("auto", "tf.distribute strategy.", STRATEGIES)
    # Run
    seed: int = setting(0, "Random seed.")
    sample_every_epochs: int = setting(1, "Sample-grid interval in epochs.")
    num_samples: int = setting(64, "Images in each sample grid.")
    sample_steps: int = setting(50, "DDIM steps (at --export_eta) for the sample grids and the SWD monitor.")
    validation_images: int = setting(0, "Held-out images for val_loss each epoch (0 = none).")
    swd_every_epochs: int = setting(
        0, "Log the SWD of EMA samples vs validation images every N epochs and keep best_ema.weights.h5 (0 = off).")
    swd_images: int = setting(512, "Samples and validation images per SWD measurement.")
    monitor_face: bool = setting(
        False, "With --swd_every_epochs: also log face_rate, face_fd and face_landmark_fd (MTCNN, offline) beside SWD.")
    export: bool = setting(True, "Export <output_dir>/savedmodel/1 at the end.")
    export_sampler: str = setting("ddim", "The export's default sampler (serving_default).", SAMPLERS)
    export_steps: int = setting(50, "The export's default number of sampling steps.")
    export_eta: float = setting(
        0.0, "The export's default eta in [0, 1] (DDIM's, DPM-Solver++'s and EDM's noise; 0: the ODE); also used for "
        "sample grids and SWD.")
    export_max_batch: int = setting(
        64, "Most seeds (or denoise images) one request to the export may hold; more fail with INVALID_ARGUMENT.")
    verbose: int | str = setting("auto", "Keras' fit() verbosity.", flag="")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The config of `dataclasses.asdict()` (a run's config.json); keys added since take their defaults."""
        return config_from_dict(cls, values)

    def __post_init__(self):
        counts = ("batch_size", "train_steps", "steps_per_epoch", "keep_checkpoints", "sample_every_epochs",
                  "num_samples", "sample_steps", "swd_images", "export_steps", "export_max_batch")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.validation_images < 0 or self.swd_every_epochs < 0:
            raise ValueError("validation_images and swd_every_epochs must be >= 0 (0 = off).")
        if not 0 <= self.cooldown_steps <= self.train_steps:
            raise ValueError(f"cooldown_steps must lie in [0, train_steps={self.train_steps}], got "
                             f"{self.cooldown_steps}.")


def config_from_dict(config_class, values: dict):
    """A `config_class` from a dict of its fields (JSON lists back to tuples); missing fields take their defaults."""
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"Unknown {config_class.__name__} keys {sorted(unknown)}; known keys: {sorted(known)}.")
    return config_class(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})
