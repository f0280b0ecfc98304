"""Tests of keras_ddpm.layers and keras_ddpm.unet: shapes, dtypes, conditioning, serialisation, errors."""

import math

import keras
import numpy as np
import pytest

from keras_ddpm.layers import AttentionBlock
from keras_ddpm.layers import Downsample
from keras_ddpm.layers import ResidualBlock
from keras_ddpm.layers import SinusoidalEmbedding
from keras_ddpm.layers import Upsample
from keras_ddpm.unet import build_unet

# Tiny networks keep the whole file fast on two CPU cores.
TINY = dict(width=16, num_res_blocks=1, norm_groups=8, num_heads=2)


def randomise_zero_kernels(layer, seed=0):
    """Gives every zero-initialised kernel random values, so conditioning can reach the output.

    At initialisation each ResidualBlock's last conv and the head conv are zero, which makes the
    output 0 whatever the timestep or label; tests of conditioning must undo that first.
    """
    initializer = keras.initializers.GlorotUniform(seed=seed)
    randomised = 0
    for variable in layer.weights:
        if variable.path.endswith("kernel") and not np.any(variable.numpy()):
            variable.assign(initializer(variable.shape))
            randomised += 1
    assert randomised, "expected zero-initialised kernels to randomise"


def random_inputs(model, batch_size=2, seed=0):
    rng = np.random.default_rng(seed)
    image_shape = model.inputs[0].shape[1:]
    noisy_images = rng.standard_normal((batch_size, *image_shape)).astype("float32")
    timesteps = rng.integers(0, 1000, size=batch_size).astype("int32")
    if len(model.inputs) == 3:
        return [noisy_images, timesteps, np.zeros(batch_size, "int32")]
    return [noisy_images, timesteps]


def count_attention_layers(model):
    return sum(
        isinstance(layer, AttentionBlock) and isinstance(layer.attention, keras.layers.MultiHeadAttention)
        for layer in model.layers
    )


@pytest.mark.parametrize(
    "image_size, channels, channel_multipliers",
    [(28, 1, (1, 2, 2)), (32, 3, (1, 2, 2)), (64, 3, (1, 1, 2, 2))],
)
def test_output_is_float32_with_input_shape_and_zero_at_init(image_size, channels, channel_multipliers):
    unet = build_unet(image_size, channels=channels, channel_multipliers=channel_multipliers, **TINY)

    prediction = unet(random_inputs(unet))

    assert [tensor.name for tensor in unet.inputs] == ["noisy_images", "timesteps"]
    assert tuple(prediction.shape) == (2, image_size, image_size, channels)
    assert prediction.dtype == "float32"
    np.testing.assert_array_equal(prediction, 0.0)


@pytest.mark.parametrize(
    "attention_resolutions, bottleneck_attention, expected_count",
    [
        ((), False, 0),
        ((), True, 1),
        # num_res_blocks=1: one block in the encoder and two in the decoder at 16x16.
        ((16,), False, 3),
        ((32, 16), True, 7),
    ],
)
def test_attention_blocks_sit_where_asked(attention_resolutions, bottleneck_attention, expected_count):
    unet = build_unet(
        32, channel_multipliers=(1, 2, 2), attention_resolutions=attention_resolutions,
        bottleneck_attention=bottleneck_attention, **TINY,
    )
    assert count_attention_layers(unet) == expected_count


def test_attention_block_attends_over_all_positions():
    block = AttentionBlock(num_heads=2, norm_groups=8)  # 16 channels, 8 groups: channels 0 and 1 share a group
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 16)).astype("float32")
    changed = x.copy()
    changed[0, 3, 3, [0, 1]] = x[0, 3, 3, [1, 0]]  # swap two channels of one group at one corner

    difference = np.abs(np.asarray(block(changed) - block(x)))[0]

    # The swap keeps every group's mean and variance, so GroupNormalization passes the other positions on
    # unchanged: only attention can carry the change from one corner to the opposite one.
    np.testing.assert_allclose(np.asarray(block.norm(changed))[0, 0], np.asarray(block.norm(x))[0, 0], atol=1e-6)
    assert difference[0, 0].max() > 1e-6


def test_conditional_model_takes_labels_and_they_change_the_output():
    unet = build_unet(28, channels=1, channel_multipliers=(1, 2, 2), num_classes=10, **TINY)
    randomise_zero_kernels(unet)
    noisy_images, timesteps, _ = random_inputs(unet)

    outputs = [
        np.asarray(unet([noisy_images, timesteps, np.full(2, label, "int32")]))
        for label in (0, 3, 10)  # 10 = num_classes is the null label of classifier-free guidance
    ]

    assert [tensor.name for tensor in unet.inputs] == ["noisy_images", "timesteps", "labels"]
    assert unet.get_layer("label_embedding").input_dim == 11
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(outputs[i] - outputs[j]).max() > 1e-4


def test_unconditional_model_has_no_labels_input():
    unet = build_unet(28, channels=1, channel_multipliers=(1, 2, 2), **TINY)
    assert len(unet.inputs) == 2
    with pytest.raises(ValueError):
        unet.get_layer("label_embedding")


def test_timestep_changes_the_output():
    unet = build_unet(32, channel_multipliers=(1, 2), **TINY)
    randomise_zero_kernels(unet)
    noisy_images, _ = random_inputs(unet)

    early = np.asarray(unet([noisy_images, np.array([10, 10], "int32")]))
    late = np.asarray(unet([noisy_images, np.array([900, 900], "int32")]))
    again = np.asarray(unet([noisy_images, np.array([10, 10], "int32")]))

    assert np.abs(early - late).max() > 1e-4
    np.testing.assert_array_equal(early, again)


def test_sinusoidal_embedding_matches_ddpm_reference():
    dim, timesteps = 16, np.array([0, 1, 37, 999])
    # DDPM's get_timestep_embedding (diffusion_tf/nn.py), in float64.
    half_dim = dim // 2
    frequencies = np.exp(-math.log(10000) / (half_dim - 1) * np.arange(half_dim))
    angles = timesteps[:, None] * frequencies[None, :]
    expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    embedding = SinusoidalEmbedding(dim)(timesteps.astype("int32"))

    assert embedding.dtype == "float32"
    np.testing.assert_allclose(embedding, expected, atol=1e-4)


def test_sinusoidal_embedding_computes_in_float32_under_mixed_precision():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    # 999.25 is not a float16 number; autocasting it first would round it to 999.0.
    timesteps = np.array([999.25], "float32")
    features = SinusoidalEmbedding(8)(timesteps)
    keras.mixed_precision.set_dtype_policy("float32")
    reference = SinusoidalEmbedding(8)(timesteps)

    assert features.dtype == "float16"
    np.testing.assert_allclose(np.asarray(features, "float32"), reference, atol=2e-3)


def test_residual_block_is_identity_at_init_and_projects_skip_when_channels_change():
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 16)).astype("float32")
    embedding = np.ones((2, 32), "float32")

    np.testing.assert_allclose(ResidualBlock(16, norm_groups=8)([x, embedding]), x, atol=1e-6)

    widening = ResidualBlock(24, norm_groups=8)
    np.testing.assert_allclose(widening([x, embedding]), widening.skip_projection(x), atol=1e-6)


def test_residual_block_dropout_only_in_training():
    block = ResidualBlock(16, dropout=0.5, norm_groups=8)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 16)).astype("float32")
    embedding = np.ones((2, 32), "float32")
    block([x, embedding])
    randomise_zero_kernels(block)

    inference = [np.asarray(block([x, embedding], training=False)) for _ in range(2)]
    training = np.asarray(block([x, embedding], training=True))

    np.testing.assert_array_equal(inference[0], inference[1])
    assert np.abs(training - inference[0]).max() > 1e-4


def normal(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype("float32")


@pytest.mark.parametrize(
    "make_layer, inputs",
    [
        (lambda: SinusoidalEmbedding(8, max_period=500), np.array([3, 700], "int32")),
        (lambda: ResidualBlock(24, dropout=0.1, norm_groups=8), [normal(2, 8, 8, 16), normal(2, 32)]),
        (lambda: AttentionBlock(num_heads=2, norm_groups=4), normal(2, 4, 4, 16)),
        (lambda: Downsample(12), normal(2, 8, 8, 4)),
        (lambda: Upsample(12), normal(2, 4, 4, 4)),
    ],
    ids=["SinusoidalEmbedding", "ResidualBlock", "AttentionBlock", "Downsample", "Upsample"],
)
def test_layer_config_round_trip(make_layer, inputs):
    layer = make_layer()
    layer(inputs)
    layer.set_weights([normal(*weight.shape) * 0.1 for weight in layer.get_weights()])

    clone = type(layer).from_config(layer.get_config())
    clone(inputs)
    clone.set_weights(layer.get_weights())
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))

    assert clone.get_config() == layer.get_config()
    np.testing.assert_array_equal(clone(inputs), layer(inputs))
    assert type(restored) is type(layer) and restored.get_config() == layer.get_config()


def test_model_config_and_keras_file_round_trip(tmp_path):
    unet = build_unet(
        16, channel_multipliers=(1, 2), attention_resolutions=(8,), num_classes=3, dropout=0.1, **TINY
    )
    randomise_zero_kernels(unet)
    inputs = random_inputs(unet)
    expected = np.asarray(unet(inputs))

    from_config = keras.Model.from_config(unet.get_config())
    from_config.set_weights(unet.get_weights())
    path = tmp_path / "unet.keras"
    unet.save(path)
    loaded = keras.saving.load_model(path)

    assert [tensor.name for tensor in loaded.inputs] == ["noisy_images", "timesteps", "labels"]
    np.testing.assert_array_equal(from_config(inputs), expected)
    np.testing.assert_array_equal(loaded(inputs), expected)


def test_mixed_float16_gives_finite_float32_close_to_float32_model():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    mixed = build_unet(32, channel_multipliers=(1, 2), attention_resolutions=(16,), num_classes=2, **TINY)
    keras.mixed_precision.set_dtype_policy("float32")
    full = build_unet(32, channel_multipliers=(1, 2), attention_resolutions=(16,), num_classes=2, **TINY)
    randomise_zero_kernels(full)
    mixed.set_weights(full.get_weights())
    inputs = random_inputs(full)

    prediction = np.asarray(mixed(inputs))

    assert mixed.get_layer("down_1_block_0").compute_dtype == "float16"
    assert mixed.output.dtype == "float32" and prediction.dtype == np.float32
    assert np.isfinite(prediction).all()
    reference = np.asarray(full(inputs))
    assert np.abs(prediction - reference).max() < 0.02 * np.abs(reference).max()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(image_size=30, channel_multipliers=(1, 2, 2)), "divisible by 4"),
        (dict(image_size=32, attention_resolutions=(8,), channel_multipliers=(1, 2)), r"\[8\] are never reached"),
        (dict(image_size=32, num_classes=-1), "num_classes"),
        (dict(image_size=32, num_classes=2.5), "num_classes"),
        (dict(image_size=32, channel_multipliers=()), "channel_multipliers"),
        (dict(image_size=32, channel_multipliers=(1, 0)), "channel_multipliers"),
        (dict(image_size=0), "image_size"),
        (dict(image_size=32, dropout=1.0), "dropout"),
        (dict(image_size=32, width=24, norm_groups=16), "24 channels into 16 groups"),
        (dict(image_size=32, width=16, num_heads=3), "num_heads=3"),
    ],
)
def test_bad_arguments_raise_clear_errors(arguments, message):
    arguments = {"channel_multipliers": (1, 2), "num_res_blocks": 1, "norm_groups": 8, **arguments}
    with pytest.raises(ValueError, match=message):
        build_unet(**arguments)


def test_sinusoidal_embedding_rejects_odd_dim():
    with pytest.raises(ValueError, match="even dim"):
        SinusoidalEmbedding(7)
