"""Training timesteps drawn log-normal in noise level (EDM, Karras et al. 2022) against their distribution.

sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is the noise level of x_t / sqrt(alpha_bar_t) = x_0 + sigma_t noise;
with `timestep_sampling="log_normal"`, ln(sigma_t) of the drawn steps should follow N(-1.2, 1.2^2) up to the
schedule's grid and its ends.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ddpm.config import ModelConfig
from keras_ddpm.model import EDM_LOG_SIGMA_MEAN, EDM_LOG_SIGMA_STD, DiffusionModel
from keras_ddpm.schedule import NoiseSchedule
from keras_ddpm.unet import build_unet

NETWORK = dict(image_size=8, width=8, channel_multipliers=(1,), num_res_blocks=1, norm_groups=4,
               attention_resolutions=(), bottleneck_attention=False)


def log_sigmas_float64(num_timesteps=1000, beta_start=1e-4, beta_end=0.02) -> np.ndarray:
    alpha_bar = np.cumprod(1.0 - np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))
    return 0.5 * np.log((1.0 - alpha_bar) / alpha_bar)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_nearest_timesteps_inverts_the_noise_levels(kind):
    schedule = NoiseSchedule(kind, 1000)
    alpha_bar = schedule.alpha_bars_np.astype(np.float64)
    log_sigmas = 0.5 * np.log((1.0 - alpha_bar) / alpha_bar)
    np.testing.assert_array_equal(schedule.nearest_timesteps(log_sigmas).numpy(), np.arange(1000))
    # Beyond the ends: the first and last steps.
    ends = schedule.nearest_timesteps([log_sigmas[0] - 5.0, log_sigmas[-1] + 5.0]).numpy()
    np.testing.assert_array_equal(ends, [0, 999])


def test_nearest_timesteps_picks_the_nearer_neighbour():
    schedule = NoiseSchedule("linear", 1000)
    log_sigmas = log_sigmas_float64()
    t = 500
    just_below_midpoint = (log_sigmas[t] + log_sigmas[t + 1]) / 2 - 1e-4
    just_above_midpoint = (log_sigmas[t] + log_sigmas[t + 1]) / 2 + 1e-4
    assert schedule.nearest_timesteps([just_below_midpoint, just_above_midpoint]).numpy().tolist() == [t, t + 1]


@pytest.mark.parametrize("stateless", [False, True])
def test_log_normal_draws_follow_edm_distribution(stateless):
    model = DiffusionModel(build_unet(**NETWORK), NoiseSchedule("linear", 1000), timestep_sampling="log_normal")
    key = tf.constant([3, 4], tf.int64) if stateless else None
    timesteps = model._draw_timesteps([50_000], key).numpy()
    drawn = log_sigmas_float64()[timesteps]
    # The linear schedule covers ln(sigma) in [-4.6, 5.0]: below -4.6 (0.3% of the normal) lands on step 0.
    assert abs(np.median(drawn) - EDM_LOG_SIGMA_MEAN) < 0.03
    assert abs(np.std(drawn) - EDM_LOG_SIGMA_STD) < 0.05
    # Uniform draws put half the steps above t = 500; the log-normal, its upper tail beyond ln(sigma) = 1.2 (2%).
    edge = (log_sigmas_float64()[500] + log_sigmas_float64()[501]) / 2
    tail = 0.5 * math.erfc((edge - EDM_LOG_SIGMA_MEAN) / (EDM_LOG_SIGMA_STD * math.sqrt(2)))
    assert abs(np.mean(timesteps > 500) - tail) < 0.003


def test_uniform_draws_are_unchanged():
    """The default keeps the draws of earlier runs, so their resumed training draws what it drew before."""
    model = DiffusionModel(build_unet(**NETWORK), NoiseSchedule("linear", 1000))
    key = tf.constant([7, 8], tf.int64)
    expected = tf.random.stateless_uniform([64], key, 0, 1000, dtype=tf.int32)
    np.testing.assert_array_equal(model._draw_timesteps([64], key).numpy(), expected.numpy())


def test_log_normal_trains_and_round_trips():
    model = ModelConfig(image_size=8, width=8, channel_multipliers=(1,), num_res_blocks=1, norm_groups=4,
                        attention_resolutions=(), bottleneck_attention=False, dropout=0.0, objective="v",
                        timestep_sampling="log_normal").build(seed=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(tf.random.uniform([8, 8, 8, 3], -1, 1), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    restored = DiffusionModel.from_config(model.get_config())
    assert restored.timestep_sampling == "log_normal"


def test_unknown_timestep_sampling_is_refused():
    with pytest.raises(ValueError, match="timestep_sampling"):
        DiffusionModel(build_unet(**NETWORK), timestep_sampling="logit_normal")
