import numpy as np
import pytest
import tensorflow as tf

from keras_ddpm.schedule import NoiseSchedule


def reference_linear_alpha_bars(T=1000, beta_start=1e-4, beta_end=0.02):
    """An independent float64 computation, term by term, of prod_s (1 - beta_s)."""
    betas = [beta_start + (beta_end - beta_start) * i / (T - 1) for i in range(T)]
    alpha_bars, product = [], 1.0
    for beta in betas:
        product *= 1.0 - beta
        alpha_bars.append(product)
    return np.array(betas), np.array(alpha_bars)


def test_linear_tables_match_float64_reference():
    schedule = NoiseSchedule("linear", 1000)
    betas, alpha_bars = reference_linear_alpha_bars()
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(schedule.alpha_bars.numpy(), alpha_bars, rtol=1e-5, atol=1e-9)
    assert schedule.alpha_bars.dtype == tf.float32
    # Known values of the DDPM schedule: almost no noise at t=0, almost pure noise at t=T-1.
    assert schedule.alpha_bars.numpy()[0] == pytest.approx(0.9999)
    assert schedule.alpha_bars.numpy()[-1] == pytest.approx(4.04e-5, rel=0.01)


def test_cosine_schedule_follows_its_closed_form():
    T, s = 1000, 0.008
    schedule = NoiseSchedule("cosine", T)
    t = np.arange(1, T + 1)
    f = np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
    # Equal to the closed form until the max_beta clip bites in the last steps.
    np.testing.assert_allclose(schedule.alpha_bars.numpy()[:-5], f[:-5], rtol=1e-4, atol=1e-7)
    assert np.all(np.diff(schedule.alpha_bars.numpy()) < 0)


def test_alpha_bar_of_minus_one_is_clean_data():
    schedule = NoiseSchedule()
    assert schedule.alpha_bar_at(tf.constant([-1])).numpy()[0] == 1.0


def test_q_sample_moments():
    schedule = NoiseSchedule()
    t = tf.fill([20000], 300)
    x0 = tf.fill([20000, 1, 1, 1], 0.7)
    x_t = schedule.q_sample(x0, t, tf.random.stateless_normal([20000, 1, 1, 1], seed=[1, 2])).numpy()
    alpha_bar = schedule.alpha_bars_np[300]
    assert x_t.mean() == pytest.approx(np.sqrt(alpha_bar) * 0.7, abs=0.02)
    assert x_t.var() == pytest.approx(1 - alpha_bar, rel=0.03)


def test_predictions_invert_the_forward_process():
    schedule = NoiseSchedule("cosine")
    x0 = tf.random.stateless_uniform([4, 8, 8, 3], seed=[0, 1], minval=-1, maxval=1)
    noise = tf.random.stateless_normal([4, 8, 8, 3], seed=[0, 2])
    t = tf.constant([0, 10, 500, 990])
    x_t = schedule.q_sample(x0, t, noise)
    for objective, target in [("epsilon", noise), ("v", schedule.velocity(x0, t, noise))]:
        pred_images, pred_noises = schedule.split_prediction(target, x_t, t, objective)
        np.testing.assert_allclose(pred_images.numpy(), x0.numpy(), atol=2e-3)
        np.testing.assert_allclose(pred_noises.numpy(), noise.numpy(), atol=2e-3)


def test_posterior_matches_ddpm_formulas():
    schedule = NoiseSchedule()
    betas, alpha_bars = schedule.betas_np, schedule.alpha_bars_np
    t = 400
    x0, x_t = tf.fill([1, 1, 1, 1], 0.5), tf.fill([1, 1, 1, 1], -0.2)
    mean, variance = schedule.posterior_mean_variance(x0, x_t, tf.constant([t]))
    # Ho et al. 2020, Eq. 7, in float64.
    mean_ref = (np.sqrt(alpha_bars[t - 1]) * betas[t] / (1 - alpha_bars[t]) * 0.5
                + np.sqrt(1 - betas[t]) * (1 - alpha_bars[t - 1]) / (1 - alpha_bars[t]) * -0.2)
    var_ref = (1 - alpha_bars[t - 1]) / (1 - alpha_bars[t]) * betas[t]
    assert float(tf.squeeze(mean)) == pytest.approx(mean_ref, rel=1e-4)
    assert float(tf.squeeze(variance)) == pytest.approx(var_ref, rel=1e-4)
    _, large = schedule.posterior_mean_variance(x0, x_t, tf.constant([t]), variance="beta")
    assert float(tf.squeeze(large)) == pytest.approx(betas[t], rel=1e-4)


def test_snr_and_config_round_trip():
    schedule = NoiseSchedule("cosine", 500)
    ab = schedule.alpha_bars_np[[0, 250]]
    np.testing.assert_allclose(schedule.snr(tf.constant([0, 250])).numpy(), ab / (1 - ab), rtol=1e-4)
    clone = NoiseSchedule.from_config(schedule.get_config())
    np.testing.assert_array_equal(clone.alpha_bars.numpy(), schedule.alpha_bars.numpy())


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="linear"):
        NoiseSchedule("quadratic")


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("num_timesteps", [0, 1])
def test_too_few_timesteps_is_a_clear_error(kind, num_timesteps):
    with pytest.raises(ValueError, match=f"num_timesteps must be at least 2, got {num_timesteps}"):
        NoiseSchedule(kind, num_timesteps)
