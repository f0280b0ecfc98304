"""`ModelConfig`: everything needed to rebuild a `DiffusionModel`, stored as `config.json` in a run directory."""

import dataclasses
import json
import pathlib

from keras_ddpm.model import DiffusionModel
from keras_ddpm.schedule import NoiseSchedule
from keras_ddpm.unet import build_unet


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The U-Net, schedule and objective of a diffusion model (see `build_unet` and `DiffusionModel` for each field).

    Example:
    >>> model = ModelConfig(image_size=32, width=32, channel_multipliers=(1, 2)).build()
    """

    image_size: int = 64
    channels: int = 3
    num_classes: int = 0
    width: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    bottleneck_attention: bool = True
    num_heads: int = 4
    dropout: float = 0.1
    norm_groups: int = 32
    schedule: str = "linear"
    num_timesteps: int = 1000
    objective: str = "epsilon"
    loss_weighting: str = "none"
    ema_decay: float = 0.9999
    label_dropout: float = 0.1

    def build(self, seed: int | None = None) -> DiffusionModel:
        """A fresh `DiffusionModel` (build it inside a `tf.distribute` scope to place its variables there).

        `seed` seeds its training draws (see `DiffusionModel`); every worker of a multi-worker run passes the same.
        """
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
            NoiseSchedule(self.schedule, self.num_timesteps),
            objective=self.objective,
            loss_weighting=self.loss_weighting,
            ema_decay=self.ema_decay,
            label_dropout=self.label_dropout,
            seed=seed,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"Unknown model config keys {sorted(unknown)}; known keys: {sorted(known)}.")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)


def read_json(path) -> dict:
    with open(path) as file:
        return json.load(file)


def write_json(path, values: dict) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of one."""
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    partial.replace(path)
