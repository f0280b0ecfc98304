"""KerasHub-style layer tests (`TestCase.run_layer_test`): output shape, dtype policy, `.keras` round trip.

The config round trip of each layer is in tests/test_unet.py (`test_layer_config_round_trip`).
"""

import keras
import numpy as np
import pytest

from keras_ddpm.layers import AttentionBlock, Downsample, ResidualBlock, SinusoidalEmbedding, Upsample


def normal(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype("float32")


# (layer factory taking keyword arguments such as dtype, inputs, expected output shape)
CASES = {
    "SinusoidalEmbedding": (lambda **kw: SinusoidalEmbedding(8, max_period=500, **kw), np.array([3, 700], "int32"),
                            (2, 8)),
    "ResidualBlock": (lambda **kw: ResidualBlock(24, dropout=0.1, norm_groups=8, **kw),
                      [normal(2, 8, 8, 16), normal(2, 32)], (2, 8, 8, 24)),
    "AttentionBlock": (lambda **kw: AttentionBlock(num_heads=2, norm_groups=4, **kw), normal(2, 4, 4, 16),
                       (2, 4, 4, 16)),
    "Downsample": (lambda **kw: Downsample(12, **kw), normal(2, 8, 8, 4), (2, 4, 4, 12)),
    "Upsample": (lambda **kw: Upsample(12, **kw), normal(2, 4, 4, 4), (2, 8, 8, 12)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_shape(name):
    make_layer, inputs, expected_shape = CASES[name]
    assert tuple(make_layer()(inputs).shape) == expected_shape


@pytest.mark.parametrize("name", sorted(CASES))
def test_mixed_precision_policy_computes_in_bfloat16_and_keeps_float32_weights(name):
    make_layer, inputs, expected_shape = CASES[name]
    layer = make_layer(dtype="mixed_bfloat16")
    outputs = layer(inputs)

    assert layer.compute_dtype == "bfloat16" and layer.variable_dtype == "float32"
    assert all(weight.dtype == "float32" for weight in layer.weights)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    assert tuple(outputs.shape) == expected_shape
    # Sublayers follow the layer's policy (else a float32 sublayer would silently undo mixed precision).
    for sublayer in layer._flatten_layers(include_self=False):
        assert sublayer.dtype_policy.name == "mixed_bfloat16", sublayer.name


@pytest.mark.parametrize("name", sorted(CASES))
def test_keras_file_round_trip_gives_identical_outputs(name, tmp_path):
    make_layer, inputs, _ = CASES[name]
    layer = make_layer()
    layer(inputs)
    layer.set_weights([normal(*weight.shape) * 0.1 for weight in layer.get_weights()])
    is_tensor_input = not isinstance(inputs, list)
    model_inputs = ([keras.Input(inputs.shape[1:], dtype=str(inputs.dtype))] if is_tensor_input else
                    [keras.Input(tensor.shape[1:]) for tensor in inputs])
    model = keras.Model(model_inputs, layer(model_inputs[0] if is_tensor_input else model_inputs))
    path = tmp_path / f"{name}.keras"
    model.save(path)

    loaded = keras.saving.load_model(path)

    np.testing.assert_array_equal(loaded(inputs), model(inputs))
    assert type(loaded.layers[-1]) is type(layer)
