"""Sampler correctness without training: the closed-form optimal denoiser of Gaussian data.

If the data is x0 ~ N(mu, s^2) (every pixel independent), then x_t is Gaussian too and the
minimum-MSE predictions are known exactly:
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab),
    E[x0 | x_t]  = (x_t - sqrt(1 - ab) E[eps | x_t]) / sqrt(ab).
A correct sampler driven by this denoiser must return samples with mean mu and std s.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_ddpm import samplers
from keras_ddpm.schedule import NoiseSchedule

MU, STD = 0.3, 0.5
IMAGE_SHAPE = (16, 16, 1)
NUM_IMAGES = 32  # 8,192 pixels: standard errors ~0.006 on the mean and ~0.004 on the std


def gaussian_denoiser(schedule, objective="epsilon", broken=False):
    """The optimal denoiser, returned through the network-output path of `split_prediction`."""

    def denoise(x_t, t):
        signal_rates, noise_rates = schedule.rates(t)
        alpha_bar = tf.square(signal_rates)
        pred_noises = noise_rates * (x_t - signal_rates * MU) / (alpha_bar * STD**2 + 1.0 - alpha_bar)
        if broken:  # a deliberately wrong coefficient: the check below must catch it
            pred_noises = 0.9 * pred_noises
        pred_images = (x_t - noise_rates * pred_noises) / signal_rates
        prediction = pred_noises if objective == "epsilon" else signal_rates * pred_noises - noise_rates * pred_images
        return schedule.split_prediction(prediction, x_t, t, objective)

    return denoise


def run(sampler, steps, schedule=None, objective="epsilon", broken=False, **kwargs):
    schedule = schedule or NoiseSchedule()
    seeds = tf.range(NUM_IMAGES, dtype=tf.int64)
    images = tf.function(samplers.sample)(
        gaussian_denoiser(schedule, objective, broken), schedule, seeds, IMAGE_SHAPE, steps, sampler, **kwargs
    )
    return images.numpy()


def assert_gaussian(images, mean_tol=0.025, std_rtol=0.04):
    assert abs(images.mean() - MU) < mean_tol, f"sample mean {images.mean():.4f}, data mean {MU}"
    assert abs(images.std() / STD - 1) < std_rtol, f"sample std {images.std():.4f}, data std {STD}"


def reference_moments(sampler, timesteps, eta=0.0, mu=MU, std=STD):
    """Exact mean and std of DDIM or DPM-Solver++(2M) output on Gaussian data, in float64, for any eta.

    With the optimal Gaussian denoiser every quantity is affine in the independent standard normal draws (the
    initial noise, then one per step), so it is kept as its vector of coefficients on the draws with the constant
    last: the output's mean is the constant and its std the norm of the rest.
    Written from the papers' equations, independently of keras_ddpm.samplers.
    """
    T = 1000
    alpha_bars = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    half_log_snr = lambda t: 0.5 * np.log(alpha_bars[t] / (1 - alpha_bars[t]))  # noqa: E731
    draws = np.eye(len(timesteps) + 1)  # draws[j]: the j-th normal draw; draws[-1]: the constant 1

    def denoise(x, t):  # the affine forms of x0_hat and eps_hat
        ab = alpha_bars[t]
        eps = np.sqrt(1 - ab) / (ab * std**2 + 1 - ab) * (x - np.sqrt(ab) * mu * draws[-1])
        return (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), eps

    x, previous_x0 = draws[0], None
    for i, t in enumerate(timesteps[:-1]):
        t_next, noise = timesteps[i + 1], draws[i + 1]
        ab, ab_next = alpha_bars[t], alpha_bars[t_next]
        x0, eps = denoise(x, t)
        if sampler == "ddim":  # Song et al. 2021, Eq. 12 with sigma_t(eta) of Eq. 16
            noise_std = eta * np.sqrt((1 - ab_next) / (1 - ab) * (1 - ab / ab_next))
            x = np.sqrt(ab_next) * x0 + np.sqrt(1 - ab_next - noise_std**2) * eps + noise_std * noise
        else:  # Lu et al. 2022: Algorithm 2 at eta = 0, SDE-DPM-Solver++(2M) at eta = 1
            h = half_log_snr(t_next) - half_log_snr(t)
            if previous_x0 is None:
                d = x0
            else:
                r = (half_log_snr(t) - half_log_snr(timesteps[i - 1])) / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous_x0
            x = (np.sqrt((1 - ab_next) / (1 - ab)) * np.exp(-eta * h) * x
                 + np.sqrt(ab_next) * (1 - np.exp(-(1 + eta) * h)) * d
                 + np.sqrt(1 - ab_next) * np.sqrt(1 - np.exp(-2 * eta * h)) * noise)
            previous_x0 = x0
    x0, _ = denoise(x, timesteps[-1])
    return x0[-1], np.linalg.norm(x0[:-1])


def edm_reference_moments(levels, raised_levels, euler_only_first, mu=MU, std=STD):
    """Exact mean and std of EDM's Algorithm 2 (Karras et al. 2022) on Gaussian data, in float64, as above: x is
    in the sigma space, where the optimal denoiser is D(x; sigma) = mu + std^2 / (std^2 + sigma^2) (x - mu).
    `raised_levels[i]` is the timestep level i is churned up to (the library's snapping, as `levels` is)."""
    alpha_bars = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    sigma = lambda t: 0.0 if t < 0 else np.sqrt((1 - alpha_bars[t]) / alpha_bars[t])  # noqa: E731
    draws = np.eye(len(levels) + 2)  # draws[0]: the initial noise, [i + 1]: level i's churn, [-1]: the constant 1
    denoise = lambda x, s: mu * draws[-1] + std**2 / (std**2 + s**2) * (x - mu * draws[-1])  # noqa: E731
    x = draws[0] * np.sqrt(1 + sigma(levels[0]) ** 2)
    for i, (t, t_hat) in enumerate(zip(levels, raised_levels)):
        s, s_hat, s_next = sigma(t), sigma(t_hat), sigma(levels[i + 1] if i + 1 < len(levels) else -1)
        x_hat = x + np.sqrt(s_hat**2 - s**2) * draws[i + 1]
        d = (x_hat - denoise(x_hat, s_hat)) / s_hat
        x = x_hat + (s_next - s_hat) * d
        if s_next > 0 and not (euler_only_first and i == 0):
            x = x_hat + (s_next - s_hat) * 0.5 * (d + (x - denoise(x, s_next)) / s_next)
    return x[-1], np.linalg.norm(x[:-1])


@pytest.mark.parametrize(
    "sampler, steps, kwargs",
    [
        ("edm", 199, {}),
        ("edm", 199, {"eta": 1.0}),
        ("ddpm", 1000, {}),
        ("ddpm", 1000, {"ddpm_variance": "beta"}),
        ("ddim", 1000, {"eta": 1.0}),
        ("dpm++", 10, {}),
        ("dpm++", 20, {}),
        ("dpm++", 20, {"eta": 1.0}),
    ],
)
def test_samplers_recover_gaussian_data(sampler, steps, kwargs):
    assert_gaussian(run(sampler, steps, **kwargs))


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
@pytest.mark.parametrize("steps, spacing", [(10, "uniform"), (50, "uniform"), (20, "quadratic"), (20, "logsnr")])
def test_deterministic_samplers_match_float64_reference(sampler, steps, spacing):
    """Few-step DDIM is biased on this data (std 0.36 at 10 uniform steps, not 0.5): that bias is the
    method's, so the check is against the exact moments of the same update computed independently."""
    timesteps = samplers.sampling_timesteps(NoiseSchedule(), steps, spacing).numpy()
    mean, std = reference_moments(sampler, timesteps)
    images = run(sampler, steps, spacing=spacing)
    assert images.mean() == pytest.approx(mean, abs=0.02)
    assert images.std() == pytest.approx(std, rel=0.03)


@pytest.mark.parametrize("sampler, steps, eta", [("ddim", 20, 1.0), ("dpm++", 10, 1.0), ("dpm++", 20, 0.5)])
def test_stochastic_samplers_match_float64_reference(sampler, steps, eta):
    """The noise each step adds enters the reference as its own draw, so the exact std includes it."""
    timesteps = samplers.sampling_timesteps(NoiseSchedule(), steps, samplers.DEFAULT_SPACING[sampler]).numpy()
    mean, std = reference_moments(sampler, timesteps, eta)
    images = run(sampler, steps, eta=eta)
    assert images.mean() == pytest.approx(mean, abs=0.02)
    assert images.std() == pytest.approx(std, rel=0.03)


@pytest.mark.parametrize("steps, eta", [(39, 0.0), (40, 0.0), (39, 1.0), (80, 0.5), (2, 0.0)])
def test_edm_matches_float64_reference(steps, eta):
    """EDM's Heun steps and churn against their equations computed independently, for odd and even budgets (an
    even one skips the first level's correction); the reference takes the library's snapped levels."""
    schedule = NoiseSchedule()
    levels = samplers.edm_levels(schedule, steps)
    gamma = eta * (np.sqrt(2) - 1)
    band = samplers.EDM_CHURN_SIGMAS  # the library's, which `run` samples in
    raised = [int(samplers.edm_churned_timestep(schedule, t, gamma, band)) for t in levels]
    mean, std = edm_reference_moments(levels.numpy(), raised, euler_only_first=steps % 2 == 0)
    images = run("edm", steps, eta=eta)
    assert images.mean() == pytest.approx(mean, abs=0.02)
    assert images.std() == pytest.approx(std, rel=0.03)


def test_edm_takes_as_many_network_calls_as_steps():
    """The budget counts network calls (2 per Heun-corrected level): odd and even budgets alike, none more or fewer."""
    schedule = NoiseSchedule()
    denoise = gaussian_denoiser(schedule)
    calls = tf.Variable(0)

    def counted_denoise(x_t, t):
        calls.assign_add(1)
        return denoise(x_t, t)

    for steps in (1, 2, 7, 8):
        calls.assign(0)
        samplers.sample(counted_denoise, schedule, tf.range(2, dtype=tf.int64), IMAGE_SHAPE, steps, "edm")
        assert int(calls.numpy()) == steps


def test_sde_dpm_solver_starts_with_the_ddpm_posterior_step():
    """First order, SDE-DPM-Solver++ with eta = 1 is DDIM with eta = 1: the same image from the same noise."""
    np.testing.assert_allclose(run("dpm++", 2, eta=1.0, spacing="uniform"), run("ddim", 2, eta=1.0), atol=1e-5)


def test_ddim_converges_to_the_data_distribution_as_steps_grow():
    errors = []
    for steps in [10, 20, 50, 100, 200]:
        timesteps = samplers.sampling_timesteps(NoiseSchedule(), steps).numpy()
        errors.append(abs(reference_moments("ddim", timesteps)[1] - STD))
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 0.01 * STD * 2


@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("dpm++", 20)])
def test_v_prediction_and_cosine_schedule(sampler, steps):
    schedule = NoiseSchedule("cosine")
    images = run(sampler, steps, schedule=schedule, objective="v")
    epsilon_images = run(sampler, steps, schedule=schedule, objective="epsilon")
    np.testing.assert_allclose(images, epsilon_images, atol=2e-3)  # the same denoiser, read through v
    assert_gaussian(images, std_rtol=0.06)


@pytest.mark.parametrize("sampler, steps", [("ddpm", 1000), ("dpm++", 20), ("edm", 199)])
def test_a_broken_denoiser_fails_the_check(sampler, steps):
    with pytest.raises(AssertionError):
        assert_gaussian(run(sampler, steps, broken=True))


def test_a_broken_update_fails_the_check(monkeypatch):
    """A wrong coefficient in the DDIM update (sqrt(ab_prev) -> ab_prev) must be caught."""
    correct = samplers.ddim_step

    def broken_step(schedule, pred_images, pred_noises, t, t_prev, noise, eta):
        return correct(schedule, pred_images, pred_noises, t, t_prev, noise, eta) - (
            tf.sqrt(schedule.alpha_bar_at(t_prev)) - schedule.alpha_bar_at(t_prev)
        ) * pred_images

    monkeypatch.setattr(samplers, "ddim_step", broken_step)
    mean, std = reference_moments("ddim", samplers.sampling_timesteps(NoiseSchedule(), 50).numpy())
    images = run("ddim", 50)
    assert abs(images.mean() - mean) > 0.02 or abs(images.std() / std - 1) > 0.03


@pytest.mark.parametrize("spacing", samplers.SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 10, 50, 999, 1000])
def test_timesteps_are_strictly_decreasing_from_T_minus_1_to_0(spacing, steps):
    timesteps = samplers.sampling_timesteps(NoiseSchedule(), steps, spacing).numpy()
    assert len(timesteps) == steps
    assert timesteps[0] == 999
    assert steps == 1 or timesteps[-1] == 0
    assert np.all(np.diff(timesteps) < 0)


def test_per_image_noise_depends_only_on_the_image_seed():
    batch = samplers.per_image_noise(tf.constant([5, 6, 7], tf.int64), 3, (4, 4, 3)).numpy()
    alone = samplers.per_image_noise(tf.constant([6], tf.int64), 3, (4, 4, 3)).numpy()
    np.testing.assert_array_equal(batch[1], alone[0])
    assert not np.allclose(batch[0], batch[1])


def test_to_uint8_rounds_and_clips():
    values = tf.constant([-1.5, -1.0, 0.0, 1.0, 2.0])
    np.testing.assert_array_equal(samplers.to_uint8(values).numpy(), [0, 0, 128, 255, 255])


def test_a_churn_band_is_two_noise_levels_in_order():
    assert samplers.check_churn_sigmas(["0.05", "50"]) == (0.05, 50.0)  # as the --edm_churn_sigmas flag gives it
    bad_bands = [(["1"], "two noise levels"), ("ab", "two noise levels"), (None, "two noise levels"),
                 ((5.0, 1.0), "S_tmin < S_tmax"), ((-1.0, 1.0), "0 <= S_tmin"), ((0.0, float("nan")), "S_tmax")]
    for bad, message in bad_bands:
        with pytest.raises(ValueError, match=message):
            samplers.check_churn_sigmas(bad)
