"""The NLL bound of keras_ddpm.metrics (Ho et al. 2020, Eq. 5) against closed forms on Gaussian data.

Data x0 ~ N(MU, STD^2), independent per pixel, has a closed-form optimal denoiser (see tests/test_samplers.py),
which is linear in x_t. With it:

1. Continuous data, continuous Gaussian decoder (`variational_bound`): the expected bound equals the data's
   differential entropy 0.5 log(2 pi e STD^2) plus KL(q(x_{0:T}) || p(x_{0:T})). For this model that KL is a
   sum of one-dimensional Gaussian KLs between the true reverse conditionals q(x_{t-1} | x_t), read off the
   forward process's joint Gaussians, and the model's N(same mean, beta_tilde_t): a route that never uses
   the posterior q(x_{t-1} | x_t, x_0) the implementation is built on. (The bound is not the entropy itself:
   the fixed variance beta_tilde_t is smaller than the true reverse variance, by a factor ~2 near t = 0.)
2. 8-bit data (a rounded Gaussian, ~2% of pixels in the clipped top bin) with the discretised decoder,
   through `nll_bits_per_dim`: every term in closed form except the decoder's expectation, done by
   Gauss-Hermite quadrature over the noise and an exact sum over the 256 levels.
3. The discretised decoder itself against mpmath at 50 digits, and its 256 probabilities summing to 1.

Tolerance: with 512 images of 16x16 and 100 timestep draws, the Monte Carlo standard error of 1 and 2 is
about 0.005 nats/dim; we require agreement within 0.02 nats/dim (0.029 bits/dim), 4 standard errors, and
check that the standard error really is below 0.0055 nats/dim. A denoiser whose noise estimate is 20% off
misses the reference by 12 times that tolerance.
"""

import mpmath
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from keras_ddpm import metrics
from keras_ddpm.schedule import NoiseSchedule

MU, STD = 0.2, 0.4
IMAGE_SHAPE = (16, 16, 1)
NUM_IMAGES = 512
DRAWS = 100
TOLERANCE_NATS = 0.02
MAX_STDERR_NATS = 0.0055


def optimal_predict(schedule, objective="epsilon", noise_error=1.0):
    """The network output of the minimum-MSE denoiser of N(MU, STD^2) data, optionally scaled by `noise_error`."""

    def predict(x_t, t):
        signal_rates, noise_rates = schedule.rates(t)
        alpha_bars = tf.square(signal_rates)
        noises = noise_error * noise_rates * (x_t - signal_rates * MU) / (alpha_bars * STD**2 + 1.0 - alpha_bars)
        if objective == "epsilon":
            return noises
        images = (x_t - noise_rates * noises) / signal_rates
        return signal_rates * noises - noise_rates * images

    return predict


def gaussian_data(seed):
    return (MU + STD * np.random.default_rng(seed).standard_normal((NUM_IMAGES, *IMAGE_SHAPE))).astype(np.float32)


def forward_process(schedule):
    """float64 betas, alpha_bar_t, alpha_bar_{t-1} (1 at t = 0) and beta_tilde_t for t = 0..T-1."""
    betas = schedule.betas_np
    alpha_bars = np.cumprod(1.0 - betas)
    alpha_bars_prev = np.concatenate([[1.0], alpha_bars[:-1]])
    beta_tildes = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)
    return betas, alpha_bars, alpha_bars_prev, beta_tildes


def expected_continuous_bound(schedule):
    """E[bound] in nats/dim for N(MU, STD^2) data, the optimal denoiser and a continuous decoder: H + KL."""
    betas, alpha_bars, _, beta_tildes = forward_process(schedule)
    entropy = 0.5 * np.log(2.0 * np.pi * np.e * STD**2)
    marginal_variances = alpha_bars * STD**2 + 1.0 - alpha_bars  # Var(x_t)
    previous_variances = np.concatenate([[STD**2], marginal_variances[:-1]])  # Var(x_{t-1}), x_{-1} = x_0
    # x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) noise, so Cov(x_{t-1}, x_t) = sqrt(1 - beta_t) Var(x_{t-1}).
    reverse_variances = previous_variances - (1.0 - betas) * previous_variances**2 / marginal_variances
    # The model's variances: beta_tilde_t, and beta_tilde_1 for the decoder (beta_tilde_0 = 0).
    model_variances = np.concatenate([[beta_tildes[1]], beta_tildes[1:]])
    ratios = reverse_variances / model_variances  # the means agree: the denoiser is optimal
    reverse_kl = 0.5 * (ratios - 1.0 - np.log(ratios)).sum()
    final_mean, final_variance = np.sqrt(alpha_bars[-1]) * MU, marginal_variances[-1]
    prior_kl = 0.5 * (final_variance + final_mean**2 - 1.0 - np.log(final_variance))
    return entropy + prior_kl + reverse_kl


def rounded_gaussian_pmf():
    """Grid values x_u = u / 127.5 - 1 and the probabilities of u = round(127.5 (1 + x)), x ~ N(MU, STD^2), clipped."""
    levels = np.arange(256)
    values = levels / 127.5 - 1.0
    lower = np.where(levels == 0, -np.inf, values - 1.0 / 255.0)
    upper = np.where(levels == 255, np.inf, values + 1.0 / 255.0)
    return values, lower, upper, scipy.stats.norm.cdf((upper - MU) / STD) - scipy.stats.norm.cdf((lower - MU) / STD)


def expected_discrete_bound(schedule):
    """E[bound] in nats/dim of rounded Gaussian data under the (linear) N(MU, STD^2) denoiser, discretised decoder."""
    betas, alpha_bars, alpha_bars_prev, beta_tildes = forward_process(schedule)
    values, lower, upper, pmf = rounded_gaussian_pmf()
    first_moment, second_moment = pmf @ values, pmf @ values**2
    # x0_hat = A x_t + B with x_t = sqrt(ab) x0 + sqrt(1 - ab) noise.
    marginal_variances = alpha_bars * STD**2 + 1.0 - alpha_bars
    slopes = np.sqrt(alpha_bars) * STD**2 / marginal_variances
    offsets = MU * (1.0 - alpha_bars) / marginal_variances
    kept = 1.0 - slopes * np.sqrt(alpha_bars)
    squared_errors = (  # E[(x0 - x0_hat)^2]
        kept**2 * second_moment - 2 * kept * offsets * first_moment + offsets**2 + slopes**2 * (1.0 - alpha_bars)
    )
    # L_t = (posterior mean's x0 coefficient)^2 E[(x0 - x0_hat)^2] / (2 beta_tilde_t) (Ho et al. 2020, Eqs. 7-8).
    x0_coefficients = np.sqrt(alpha_bars_prev) * betas / (1.0 - alpha_bars)
    diffusion = (x0_coefficients[1:] ** 2 * squared_errors[1:] / (2.0 * beta_tildes[1:])).sum()
    prior = 0.5 * (alpha_bars[-1] * second_moment - alpha_bars[-1] - np.log(1.0 - alpha_bars[-1]))
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    weights = weights / np.sqrt(2.0 * np.pi)
    x_first = np.sqrt(alpha_bars[0]) * values[:, None] + np.sqrt(1.0 - alpha_bars[0]) * nodes[None]
    means = slopes[0] * x_first + offsets[0]
    scale = np.sqrt(beta_tildes[1])
    z_lower, z_upper = (lower[:, None] - means) / scale, (upper[:, None] - means) / scale
    right = z_lower + z_upper > 0  # subtract survival functions there: no cancellation near 1
    bin_probabilities = np.where(
        right,
        scipy.stats.norm.sf(z_lower) - scipy.stats.norm.sf(z_upper),
        scipy.stats.norm.cdf(z_upper) - scipy.stats.norm.cdf(z_lower),
    )
    decoder = pmf @ (-np.log(bin_probabilities) @ weights)
    return prior + diffusion + decoder


@pytest.mark.parametrize("kind, objective", [("linear", "epsilon"), ("cosine", "v")])
def test_continuous_bound_is_entropy_plus_reverse_kl(kind, objective):
    schedule = NoiseSchedule(kind, 1000)
    terms = metrics.variational_bound(
        optimal_predict(schedule, objective), schedule, objective, gaussian_data(seed=1), decoder="continuous",
        num_timestep_draws=DRAWS, batch_size=256, clip_denoised=False, verbose=False,
    )
    estimate = terms["total"].mean()
    stderr = terms["total"].std(ddof=1) / np.sqrt(NUM_IMAGES)
    expected = expected_continuous_bound(schedule)
    assert stderr < MAX_STDERR_NATS
    assert abs(estimate - expected) < TOLERANCE_NATS, (estimate, expected, stderr)
    assert expected > 0.5 * np.log(2.0 * np.pi * np.e * STD**2) + 0.4  # the bound is loose, as the docstring says


def test_wrong_denoiser_is_caught():
    schedule = NoiseSchedule("linear", 1000)
    terms = metrics.variational_bound(
        optimal_predict(schedule, noise_error=0.8), schedule, "epsilon", gaussian_data(seed=2),
        decoder="continuous", num_timestep_draws=DRAWS, batch_size=256, clip_denoised=False, verbose=False,
    )
    assert terms["total"].mean() - expected_continuous_bound(schedule) > 10 * TOLERANCE_NATS  # 0.24 nats/dim


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_bits_per_dim_of_8bit_data(kind):
    schedule = NoiseSchedule(kind, 1000)
    noise = np.random.default_rng(3).standard_normal((NUM_IMAGES, *IMAGE_SHAPE))
    images = np.clip(np.round(127.5 * (1.0 + MU + STD * noise)), 0, 255).astype(np.uint8)
    result = metrics.nll_bits_per_dim(
        optimal_predict(schedule), schedule, "epsilon", images, num_timestep_draws=DRAWS, batch_size=256,
        clip_denoised=False, verbose=False,
    )
    expected_bits = expected_discrete_bound(schedule) / np.log(2.0)
    assert result["stderr"] < MAX_STDERR_NATS / np.log(2.0)
    assert abs(result["bpd"] - expected_bits) < TOLERANCE_NATS / np.log(2.0), (result, expected_bits)
    parts = result["prior_bpd"] + result["diffusion_bpd"] + result["decoder_bpd"]
    assert result["bpd"] == pytest.approx(parts)
    assert result["num_images"] == NUM_IMAGES and result["num_timestep_draws"] == DRAWS


def test_result_depends_on_seed_not_batch_size():
    schedule = NoiseSchedule("linear", 100)
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)

    def run(**options):
        return metrics.nll_bits_per_dim(optimal_predict(schedule), schedule, "epsilon", images, num_timestep_draws=8,
                                        verbose=False, **options)

    reference = run(batch_size=10, seed=5)
    assert run(batch_size=3, seed=5) == pytest.approx(reference, rel=1e-6)
    assert run(batch_size=10, seed=6)["bpd"] != reference["bpd"]


def test_all_timesteps_when_draws_reach_t_minus_1():
    schedule = NoiseSchedule("linear", 50)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 1), dtype=np.uint8)
    result = metrics.nll_bits_per_dim(optimal_predict(schedule), schedule, "epsilon", images, num_timestep_draws=500,
                                      verbose=False)
    assert result["num_timestep_draws"] == 49
    assert np.isfinite(result["bpd"])
    every_timestep = metrics.nll_bits_per_dim(optimal_predict(schedule), schedule, "epsilon", images,
                                              num_timestep_draws=49, verbose=False)
    assert every_timestep == result


def exact_log_probability(x, mean, scale):
    """log P(bin of x) with 50-digit arithmetic, bins of -1 and +1 open-ended."""
    mpmath.mp.dps = 50
    x, mean, scale = mpmath.mpf(float(x)), mpmath.mpf(float(mean)), mpmath.mpf(float(scale))
    upper = mpmath.inf if x > 0.999 else (x + mpmath.mpf(1) / 255 - mean) / scale
    lower = -mpmath.inf if x < -0.999 else (x - mpmath.mpf(1) / 255 - mean) / scale
    if lower + upper > 0:  # Phi(u) - Phi(l) = Phi(-l) - Phi(-u); 50 digits cannot resolve 1 - (1 - 1e-700)
        lower, upper = -upper, -lower
    return float(mpmath.log(mpmath.ncdf(upper) - mpmath.ncdf(lower)))


def test_discretized_decoder_matches_exact_arithmetic():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, 60) / 127.5 - 1.0
    x[:4] = [-1.0, 1.0, -1.0, 1.0]
    means = np.concatenate([[0.9, -0.9, -1.3, 1.3], rng.uniform(-1.2, 1.2, 56)])
    scales = np.exp(rng.uniform(np.log(1e-3), np.log(2.0), 60))
    scales[:4] = [0.01, 0.01, 0.5, 0.5]
    # Far tails (x - mean up to ~1800 standard deviations): where DDPM's 1e-12 floor would give -27.6.
    x[-3:], means[-3:], scales[-3:] = [0.0, 1.0, -0.5], [0.5, -0.8, 0.5], [0.02, 1e-3, 0.05]
    computed = metrics.discretized_gaussian_log_likelihood(x, means, np.log(scales))
    expected = np.array([exact_log_probability(*arguments) for arguments in zip(x, means, scales)])
    np.testing.assert_allclose(computed, expected, rtol=1e-9, atol=1e-12)
    assert computed[-3] < -300


@pytest.mark.parametrize("mean, scale", [(0.0, 0.3), (0.37, 0.004), (-0.999, 0.01), (1.5, 0.1), (0.2, 1e-4)])
def test_discretized_decoder_probabilities_sum_to_one(mean, scale):
    grid = np.arange(256) / 127.5 - 1.0
    probabilities = np.exp(metrics.discretized_gaussian_log_likelihood(grid, mean, np.log(scale)))
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-12)


def test_rejects_float_images():
    schedule = NoiseSchedule("linear", 20)
    with pytest.raises(ValueError, match="uint8"):
        metrics.nll_bits_per_dim(optimal_predict(schedule), schedule, "epsilon", np.zeros((2, 16, 16, 1)))
