"""The DDPM U-Net (Ho et al. 2020, appendix B; the `model` of the official DDPM code, as in improved-DDPM).

Given a noisy image `x_t` and its timestep `t` (and optionally a class label) it predicts, per pixel,
the noise (or v); the caller decides which. Layout, for channel_multipliers (1, 2, 2, 2) at 32x32:

- Conditioning: sinusoidal features of t -> Dense -> swish -> Dense (4 * width), plus a learnt label
  embedding; this vector enters every ResidualBlock.
- Encoder: a 3x3 stem conv, then one level per multiplier (32, 16, 8, 4 pixels): `num_res_blocks`
  ResidualBlocks at `width * multiplier` channels, then a stride-2 conv (not after the last level).
  The stem, every block and every downsampling keep their activation as a skip connection.
- Middle (at the lowest resolution): ResidualBlock, AttentionBlock (if bottleneck_attention), ResidualBlock.
- Decoder: the mirror image with `num_res_blocks + 1` blocks per level; each block first
  concatenates one skip (last in, first out), so every skip is consumed; nearest x2 + conv between levels.
- Attention: an AttentionBlock after each encoder/decoder ResidualBlock whose resolution is listed in
  `attention_resolutions` (DDPM: 16), and in the middle.
- Head: GroupNorm -> swish -> zero-initialised 3x3 conv, so the untrained network outputs 0.
"""

import numbers
from typing import Sequence

import keras

from keras_ddpm.layers import AttentionBlock
from keras_ddpm.layers import Downsample
from keras_ddpm.layers import ResidualBlock
from keras_ddpm.layers import SinusoidalEmbedding
from keras_ddpm.layers import Upsample
from keras_ddpm.layers import group_normalization


def build_unet(
    image_size: int,
    channels: int = 3,
    width: int = 64,
    channel_multipliers: Sequence[int] = (1, 2, 2, 2),
    num_res_blocks: int = 2,
    attention_resolutions: Sequence[int] = (),
    bottleneck_attention: bool = True,
    num_heads: int = 4,
    dropout: float = 0.0,
    num_classes: int = 0,
    norm_groups: int = 32,
    name: str = "unet",
) -> keras.Model:
    """Builds the DDPM U-Net as a functional `keras.Model`.

    DDPM's CIFAR-10 model is `build_unet(32, width=128, channel_multipliers=(1, 2, 2, 2),
    attention_resolutions=(16,), dropout=0.1)`; its CelebA-HQ 256 model uses
    `channel_multipliers=(1, 1, 2, 2, 4, 4)`.

    Args:
        image_size: height and width of the (square) images; must be divisible by
            `2 ** (len(channel_multipliers) - 1)`.
        channels: number of image channels, in and out.
        width: channels of the first level; level `i` has `width * channel_multipliers[i]`.
        channel_multipliers: one entry per resolution level, from full resolution down.
        num_res_blocks: ResidualBlocks per level in the encoder (the decoder has one more).
        attention_resolutions: image sizes (e.g. 16 for 16x16 feature maps) at which every
            ResidualBlock is followed by an AttentionBlock; each must be reached by the network.
        bottleneck_attention: whether the middle has an AttentionBlock between its two blocks.
        num_heads: attention heads; must divide the channel count wherever attention is used.
        dropout: dropout rate inside every ResidualBlock.
        num_classes: 0 for an unconditional model. Otherwise the model takes a third input,
            `labels`, with ids in `[0, num_classes]`: the extra id `num_classes` is the "null"
            label meaning "no class", which classifier-free guidance (Ho & Salimans 2022)
            trains on by dropping labels and uses for the unconditional prediction.
        norm_groups: GroupNormalization groups (32 in DDPM); every channel count must be a
            multiple of it (small widths use `min(norm_groups, channels)` groups).
        name: name of the model.

    Returns:
        A `keras.Model` called as `unet([noisy_images, timesteps])` or
        `unet([noisy_images, timesteps, labels])`, with inputs `noisy_images` (float32
        `[B, image_size, image_size, channels]`), `timesteps` (int32 `[B]`) and `labels`
        (int32 `[B]`, only when `num_classes > 0`), returning float32
        `[B, image_size, image_size, channels]` even under `mixed_float16`.

    Raises:
        ValueError: if the arguments describe a network that cannot be built.
    """
    channel_multipliers = tuple(channel_multipliers)
    attention_resolutions = tuple(attention_resolutions)
    _check_arguments(
        image_size, channels, width, channel_multipliers, num_res_blocks, attention_resolutions, num_heads, dropout,
        num_classes,
    )
    # Plain ints from here on: numpy integers would leak into the layers' configs.
    image_size, channels, width, num_classes = int(image_size), int(channels), int(width), int(num_classes)
    channel_multipliers = tuple(int(m) for m in channel_multipliers)
    num_levels = len(channel_multipliers)

    noisy_images = keras.Input(shape=(image_size, image_size, channels), dtype="float32", name="noisy_images")
    timesteps = keras.Input(shape=(), dtype="int32", name="timesteps")
    inputs = [noisy_images, timesteps]

    embedding = SinusoidalEmbedding(width, name="timestep_features")(timesteps)
    embedding = keras.layers.Dense(4 * width, activation="swish", name="time_mlp_1")(embedding)
    embedding = keras.layers.Dense(4 * width, name="time_mlp_2")(embedding)
    if num_classes:
        labels = keras.Input(shape=(), dtype="int32", name="labels")
        inputs.append(labels)
        label_embedding = keras.layers.Embedding(num_classes + 1, 4 * width, name="label_embedding")(labels)
        embedding = keras.layers.Add(name="conditioning")([embedding, label_embedding])

    def residual_block(x, out_channels, block_name):
        return ResidualBlock(out_channels, dropout=dropout, norm_groups=norm_groups, name=block_name)([x, embedding])

    def attention_block(x, block_name):
        return AttentionBlock(num_heads=num_heads, norm_groups=norm_groups, name=block_name)(x)

    x = keras.layers.Conv2D(width, 3, padding="same", name="stem")(noisy_images)
    skips = [x]
    resolution = image_size
    for level, multiplier in enumerate(channel_multipliers):
        for block in range(num_res_blocks):
            x = residual_block(x, width * multiplier, f"down_{level}_block_{block}")
            if resolution in attention_resolutions:
                x = attention_block(x, f"down_{level}_attention_{block}")
            skips.append(x)
        if level < num_levels - 1:
            x = Downsample(x.shape[-1], name=f"down_{level}_downsample")(x)
            skips.append(x)
            resolution //= 2

    middle_channels = x.shape[-1]
    x = residual_block(x, middle_channels, "middle_block_0")
    if bottleneck_attention:
        x = attention_block(x, "middle_attention")
    x = residual_block(x, middle_channels, "middle_block_1")

    for level in reversed(range(num_levels)):
        for block in range(num_res_blocks + 1):
            x = keras.layers.Concatenate(name=f"up_{level}_skip_{block}")([x, skips.pop()])
            x = residual_block(x, width * channel_multipliers[level], f"up_{level}_block_{block}")
            if resolution in attention_resolutions:
                x = attention_block(x, f"up_{level}_attention_{block}")
        if level > 0:
            x = Upsample(x.shape[-1], name=f"up_{level}_upsample")(x)
            resolution *= 2

    x = group_normalization(x.shape[-1], norm_groups, name="head_norm")(x)
    x = keras.layers.Activation("swish", name="head_swish")(x)
    x = keras.layers.Conv2D(channels, 3, padding="same", kernel_initializer="zeros", name="head_conv")(x)
    # Under mixed_float16 the network computes in float16; the loss and the sampler want float32.
    prediction = keras.layers.Activation("linear", dtype="float32", name="prediction")(x)
    return keras.Model(inputs, prediction, name=name)


def _check_arguments(
    image_size, channels, width, channel_multipliers, num_res_blocks, attention_resolutions, num_heads, dropout,
    num_classes,
):
    """Raises a ValueError naming the first argument of `build_unet` that cannot work."""
    for argument_name, value in [
        ("image_size", image_size), ("channels", channels), ("width", width),
        ("num_res_blocks", num_res_blocks), ("num_heads", num_heads),
    ]:
        if not _is_positive_int(value):
            raise ValueError(f"{argument_name} must be a positive integer, got {value!r}.")
    if not channel_multipliers or not all(_is_positive_int(m) for m in channel_multipliers):
        raise ValueError(
            f"channel_multipliers must be a non-empty sequence of positive integers, got {channel_multipliers!r}."
        )
    total_downsampling = 2 ** (len(channel_multipliers) - 1)
    if image_size % total_downsampling:
        raise ValueError(
            f"image_size={image_size} must be divisible by {total_downsampling} because "
            f"{len(channel_multipliers)} channel_multipliers mean {len(channel_multipliers) - 1} halvings; "
            f"use fewer levels or another image size."
        )
    reached = [image_size // 2**level for level in range(len(channel_multipliers))]
    unreached = [r for r in attention_resolutions if r not in reached]
    if unreached:
        raise ValueError(
            f"attention_resolutions {unreached} are never reached; at image_size={image_size} with "
            f"{len(channel_multipliers)} levels the feature maps are {reached} pixels wide."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    if not (isinstance(num_classes, numbers.Integral) and not isinstance(num_classes, bool) and num_classes >= 0):
        raise ValueError(
            f"num_classes must be a non-negative integer (0 for an unconditional model), got {num_classes!r}."
        )


def _is_positive_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0
