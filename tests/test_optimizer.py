"""The train step's optimizer: Keras' Adam arithmetic and variables, TensorFlow's fused kernel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ddpm.config import TrainConfig
from keras_ddpm.training import GlobalClipAdam, WarmupStableDecay, make_optimizer

SHAPES = [(3, 3, 4, 8), (8,), (5, 7)]


def run_steps(optimizer, steps=6):
    """Apply `steps` seeded random gradients to fresh variables in a `tf.function`; returns the optimizer."""
    variables = [keras.Variable(tf.random.stateless_normal(shape, [index, 0]), name=f"weight_{index}")
                 for index, shape in enumerate(SHAPES)]
    optimizer.build(variables)

    @tf.function
    def apply(step):
        gradients = [tf.random.stateless_normal(shape, [index, step + 1]) for index, shape in enumerate(SHAPES)]
        optimizer.apply(gradients, variables)

    for step in range(steps):
        apply(tf.constant(step))
    return optimizer


def values(optimizer) -> dict:
    """The optimizer's variables by name (its own name left out), in order."""
    return {variable.path.split("/", 1)[1]: variable.numpy() for variable in optimizer.variables}


@pytest.mark.parametrize("clipnorm", [None, 1.0])
def test_the_fused_update_is_keras_adam(clipnorm):
    # Standard normal gradients over 331 weights have a norm near 18, so a clipnorm of 1 really clips.
    schedule = dict(learning_rate=WarmupStableDecay(1e-2, 3), global_clipnorm=clipnorm)
    fused = values(run_steps(GlobalClipAdam(**schedule)))
    keras_adam = values(run_steps(keras.optimizers.Adam(**schedule)))
    assert list(fused) == list(keras_adam)  # the same slots, names and order: checkpoints still load
    for path, value in keras_adam.items():
        np.testing.assert_allclose(fused[path], value, rtol=1e-5, atol=1e-7, err_msg=path)
    assert any(not np.array_equal(value, 0.0) for path, value in fused.items() if "momentum" in path)


def test_the_variables_move():
    optimizer = make_optimizer(TrainConfig(learning_rate=1e-2, warmup_steps=1))
    variables = [keras.Variable(tf.ones(shape)) for shape in SHAPES]
    optimizer.build(variables)
    optimizer.apply([tf.ones(shape) for shape in SHAPES], variables)
    # Adam's first step moves every weight by the learning rate against the gradient's sign.
    for variable in variables:
        np.testing.assert_allclose(variable.numpy(), 1.0 - 1e-2, rtol=1e-6)
    assert int(optimizer.iterations) == 1


def test_warmup_stable_decay():
    schedule = WarmupStableDecay(1.0, warmup_steps=4, cooldown_steps=5, total_steps=20)
    rates = [float(schedule(step)) for step in range(22)]
    np.testing.assert_allclose(rates[:4], [0.25, 0.5, 0.75, 1.0])  # warm-up
    assert rates[4:16] == [1.0] * 12  # stable
    np.testing.assert_allclose(rates[16:], [0.8, 0.6, 0.4, 0.2, 0.0, 0.0], atol=1e-7)  # cool-down, then 0
    # Without a cool-down it is DDPM's warm-up-then-constant schedule, wherever the run ends.
    assert float(WarmupStableDecay(1.0, warmup_steps=4)(10**6)) == 1.0


def test_the_learning_rate_follows_the_config():
    optimizer = make_optimizer(TrainConfig(learning_rate=1e-3, warmup_steps=10, train_steps=100, cooldown_steps=50))
    optimizer.iterations.assign(75)
    np.testing.assert_allclose(float(optimizer.learning_rate), 5e-4, rtol=1e-6)


@pytest.mark.parametrize("cooldown_steps", [-1, 101])
def test_a_cooldown_outside_the_run_is_refused(cooldown_steps):
    with pytest.raises(ValueError, match=r"cooldown_steps must lie in \[0, train_steps=100\]"):
        TrainConfig(train_steps=100, cooldown_steps=cooldown_steps)
