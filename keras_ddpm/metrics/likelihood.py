"""The NLL (Ho et al. 2020): the variational bound on held-out images, in bits per dimension.

It needs the model, not samples, and no pretrained weights. `variational_bound`, its core, takes data in [-1, 1].
"""

from typing import Callable, Literal

import keras
import numpy as np
import scipy.special
import tensorflow as tf

from keras_ddpm import samplers
from keras_ddpm.metrics.images import check_images
from keras_ddpm.schedule import NoiseSchedule, Objective


Decoder = Literal["discretized", "continuous"]


# Each draw takes one timestep from one stratum of t; the strata are spaced quadratically in t, so
# they are single timesteps near t = 0, where the bound's terms are largest and change fastest. On
# Gaussian data (linear or cosine schedule, T = 1000) plain uniform draws of t leave a per-image
# standard deviation of 1.4-4.7 nats/dim at 20-100 draws; quadratic strata 0.5 (20 draws), 0.08 (50)
# and 0.015 (100).
NLL_STRATA_SPACING = "quadratic"


NLL_TIMESTEP_DRAWS = 50


def _log1mexp(a: np.ndarray) -> np.ndarray:
    """log(1 - exp(a)) for a <= 0, accurate at both ends (Maechler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    with np.errstate(divide="ignore"):
        return np.where(a > -np.log(2.0), np.log(-np.expm1(a)), np.log1p(-np.exp(a)))


def _log_normal_probability_between(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """log(Phi(upper) - Phi(lower)) for lower < upper (either may be infinite), without cancellation."""
    # Phi(u) - Phi(l) = Phi(-l) - Phi(-u): intervals right of 0 are mirrored to the left, where both CDF
    # values are small and log_ndtr keeps their full precision.
    mirrored = lower + upper > 0
    lower, upper = np.where(mirrored, -upper, lower), np.where(mirrored, -lower, upper)
    log_upper = scipy.special.log_ndtr(upper)
    return log_upper + _log1mexp(scipy.special.log_ndtr(lower) - log_upper)


def discretized_gaussian_log_likelihood(x, means, log_scales) -> np.ndarray:
    """log p(x) of 8-bit data under a Gaussian discretised to 256 bins: DDPM's decoder (Ho et al. 2020, Eq. 13).

    Pixel values x = 2u/255 - 1 (u = 0..255) own the bins [x - 1/255, x + 1/255]; the bins of -1 and +1
    extend to -inf and +inf, so the 256 probabilities sum to 1. Like `discretized_gaussian_log_likelihood`
    in the DDPM code, but with the exact normal CDF evaluated in log space instead of a tanh
    approximation floored at 1e-12, so a pixel far in the tail gets its true (very negative) log-probability.

    Args:
        x: data on the grid 2u/255 - 1, any shape.
        means, log_scales: mean and log standard deviation of the Gaussian, broadcastable to `x`.

    Returns:
        float64 log-probabilities in nats, the broadcast shape.
    """
    x, means, log_scales = (np.asarray(value, np.float64) for value in (x, means, log_scales))
    inverse_scales = np.exp(-log_scales)
    half_bin = 1.0 / 255.0
    lower = np.where(x < -1.0 + half_bin, -np.inf, (x - means - half_bin) * inverse_scales)
    upper = np.where(x > 1.0 - half_bin, np.inf, (x - means + half_bin) * inverse_scales)
    return _log_normal_probability_between(lower, upper)


def _normal_kl(mean_1, variance_1, mean_2, variance_2):
    """KL(N(mean_1, variance_1) || N(mean_2, variance_2)) per element, in nats."""
    return 0.5 * (np.log(variance_2 / variance_1) + variance_1 / variance_2 - 1.0 + (mean_1 - mean_2) ** 2 / variance_2)


def _timestep_strata(schedule: NoiseSchedule, num_draws: int) -> np.ndarray:
    """Edges 0 = e_0 < e_1 < ... < e_K = T - 1 of K = min(num_draws, T - 1) strata (e_k, e_k+1] of {1, ..., T-1}."""
    num_strata = min(num_draws, schedule.num_timesteps - 1)
    descending = samplers.sampling_timesteps(schedule, num_strata + 1, NLL_STRATA_SPACING)
    return descending.numpy()[::-1].astype(np.int64)


def variational_bound(
    predict: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    schedule: NoiseSchedule,
    objective: Objective,
    images: np.ndarray,
    *,
    decoder: Decoder = "discretized",
    num_timestep_draws: int = NLL_TIMESTEP_DRAWS,
    batch_size: int = 64,
    seed: int = 0,
    clip_denoised: bool = True,
    verbose: bool = True,
) -> dict[str, np.ndarray]:
    """Per-image terms of the variational bound on -log p(x_0) (Ho et al. 2020, Eq. 5), in nats per dimension.

    With our timesteps t = 0..T-1 (x_t is the paper's x_{t+1}; x_{-1} = x_0 is the data), the bound is

        L = L_T + sum_{t=1}^{T-1} L_t + L_0,
        L_T = KL(q(x_{T-1} | x_0) || N(0, I))                    prior, exact
        L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))      diffusion, one x_t ~ q(x_t | x_0) each
        L_0 = -log p(x_0 | x_{t=0})                              decoder

    The model's reverse step p(x_{t-1} | x_t) = N(mu(x0_hat, x_t), beta_tilde_t I) uses the posterior mean with
    the network's x0 estimate and the fixed variance beta_tilde_t, the posterior's own (Ho et al. 2020,
    Sec. 3.2; learned variances (Nichol & Dhariwal 2021) are not modelled), so L_t = ||mean difference||^2 /
    (2 beta_tilde_t). The decoder is N(x0_hat, beta_tilde) at t = 0 with beta_tilde of t = 1 (the posterior
    variance at t = 0 is 0; DDPM's `posterior_log_variance_clipped` does the same); `"discretized"` scores the
    8-bit bin of each pixel (`discretized_gaussian_log_likelihood`), `"continuous"` the Gaussian density
    (for continuous data).

    The sum over t is estimated by stratified Monte Carlo: {1, ..., T-1} is cut into K =
    min(num_timestep_draws, T - 1) strata spaced quadratically in t, and every image draws one timestep
    uniformly from each stratum, weighted by the stratum's size. The estimate is unbiased; with
    num_timestep_draws >= T - 1 it is the exact sum. Each image costs K + 1 network evaluations.
    Timesteps and noise depend on `seed` and the image's index only, not on `batch_size`.

    Args:
        predict: `predict(x_t float32 [B, H, W, C], t int32 [B])` -> the network output (`objective`).
        schedule: the model's `NoiseSchedule`.
        objective: `"epsilon"` or `"v"`: what `predict` returns.
        images: float data [N, H, W, C] in [-1, 1] (on the grid 2u/255 - 1 for the discretized decoder).
        decoder: `"discretized"` or `"continuous"`.
        num_timestep_draws: K, timesteps drawn per image for the diffusion terms.
        batch_size: images per network call.
        seed: seeds the timesteps and the noise.
        clip_denoised: clip x0_hat to [-1, 1] before forming the means, as DDPM's and improved DDPM's
            likelihood evaluations do.
        verbose: show a progress bar.

    Returns:
        `{"prior": [N], "diffusion": [N], "decoder": [N], "total": [N]}`, float64 nats per dimension.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty [N, H, W, C] array, got shape {images.shape}.")
    if decoder not in ("discretized", "continuous"):
        raise ValueError(f"Unknown decoder {decoder!r}; choose 'discretized' or 'continuous'.")
    if num_timestep_draws < 1 or batch_size < 1:
        raise ValueError(f"num_timestep_draws and batch_size must be >= 1, got {num_timestep_draws} and {batch_size}.")
    num_images = len(images)
    edges = _timestep_strata(schedule, int(num_timestep_draws))
    stratum_sizes = np.diff(edges)
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, stratum_sizes, size=(num_images, len(stratum_sizes)))
    timesteps = (edges[:-1] + 1 + offsets).astype(np.int32)  # image i, draw k: uniform on (e_k, e_k+1]
    noise_seeds = np.int64(seed) * (1 << 32) + np.arange(num_images, dtype=np.int64)
    image_shape = images.shape[1:]

    def predict_images(x_t, t):
        prediction = tf.cast(predict(x_t, t), tf.float32)
        pred_images, _ = schedule.split_prediction(prediction, x_t, t, objective)
        return tf.clip_by_value(pred_images, -1.0, 1.0) if clip_denoised else pred_images

    @tf.function(reduce_retracing=True)
    def diffusion_term(x0, t, seeds, draw):
        """L_t per image (mean over pixels) for one timestep per image."""
        x_t = schedule.q_sample(x0, t, samplers.per_image_noise(seeds, draw, image_shape))
        posterior_mean, posterior_variance = schedule.posterior_mean_variance(x0, x_t, t)
        model_mean, _ = schedule.posterior_mean_variance(predict_images(x_t, t), x_t, t)
        # Both variances are beta_tilde_t, so the KL is the mean term alone (and no cancellation of 1 - 1).
        kl = tf.square(posterior_mean - model_mean) / (2.0 * posterior_variance)
        return tf.reduce_mean(kl, axis=[1, 2, 3])

    @tf.function(reduce_retracing=True)
    def decoder_mean(x0, seeds, draw):
        """x0_hat from x_0 ~ q(x_0 | data), the mean of the decoder (the posterior mean at t = 0)."""
        t = tf.zeros([tf.shape(x0)[0]], tf.int32)
        return predict_images(schedule.q_sample(x0, t, samplers.per_image_noise(seeds, draw, image_shape)), t)

    decoder_variance = _posterior_variance(schedule, 1)
    alpha_bar_last = schedule.alpha_bars_np[-1]
    progress = keras.utils.Progbar(num_images, verbose=1 if verbose else 0, unit_name="image")
    terms = {name: np.zeros(num_images) for name in ("prior", "diffusion", "decoder")}
    for start in range(0, num_images, batch_size):
        batch = slice(start, start + batch_size)
        x0 = images[batch].astype(np.float64)
        data = tf.constant(images[batch])
        seeds = tf.constant(noise_seeds[batch])
        prior = _normal_kl(np.sqrt(alpha_bar_last) * x0, 1.0 - alpha_bar_last, 0.0, 1.0)
        terms["prior"][batch] = prior.mean(axis=(1, 2, 3))
        for draw, stratum_size in enumerate(stratum_sizes):
            t = tf.constant(timesteps[batch, draw])
            terms["diffusion"][batch] += stratum_size * diffusion_term(data, t, seeds, tf.constant(draw)).numpy()
        means = decoder_mean(data, seeds, tf.constant(len(stratum_sizes))).numpy().astype(np.float64)
        if decoder == "discretized":
            log_likelihood = discretized_gaussian_log_likelihood(x0, means, 0.5 * np.log(decoder_variance))
        else:
            log_likelihood = -0.5 * (np.log(2.0 * np.pi * decoder_variance) + (x0 - means) ** 2 / decoder_variance)
        terms["decoder"][batch] = -log_likelihood.mean(axis=(1, 2, 3))
        progress.add(len(x0))
    terms["total"] = terms["prior"] + terms["diffusion"] + terms["decoder"]
    return terms


def _posterior_variance(schedule: NoiseSchedule, t: int) -> float:
    """beta_tilde_t of q(x_{t-1} | x_t, x_0), as `NoiseSchedule.posterior_mean_variance` computes it."""
    zeros = tf.zeros([1, 1])
    _, variance = schedule.posterior_mean_variance(zeros, zeros, tf.constant([t]))
    return float(tf.reshape(variance, []))


def nll_bits_per_dim(
    predict: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    schedule: NoiseSchedule,
    objective: Objective,
    images_uint8: np.ndarray,
    *,
    num_timestep_draws: int = NLL_TIMESTEP_DRAWS,
    batch_size: int = 64,
    seed: int = 0,
    clip_denoised: bool = True,
    verbose: bool = True,
) -> dict[str, float]:
    """The variational bound on the negative log-likelihood of 8-bit images, in bits per dimension.

    The number DDPM papers report as NLL (Ho et al. 2020, Table 2; Nichol & Dhariwal 2021, Table 2): an
    upper bound on -log2 p(image) / (H W C) for images scaled to x = 2u/255 - 1, with the discretised decoder
    (see `variational_bound` for the terms, the model's variance beta_tilde and the stratified Monte Carlo
    over t). Lower is better; the bound is loose by the terms a fixed variance cannot fit.

    Args:
        predict: `predict(x_t float32 [B, H, W, C], t int32 [B])` -> the network output, e.g.
            `lambda x_t, t: model.ema_network([x_t, t])` or a SavedModel's `denoise` signature's `prediction`.
        schedule, objective: the model's noise schedule and what `predict` returns (`"epsilon"` or `"v"`).
        images_uint8: held-out images, uint8 [N, H, W, C].
        num_timestep_draws: timesteps per image for the diffusion terms (K + 1 network calls per image).
        batch_size: images per network call.
        seed: seeds timesteps and noise.
        clip_denoised: clip x0_hat to [-1, 1], as DDPM's evaluation does.
        verbose: show a progress bar.

    Returns:
        `{"bpd", "prior_bpd", "diffusion_bpd", "decoder_bpd"}`: means over images (bpd = the sum of the three);
        `"stderr"`: the standard error of `bpd` over images, which includes the Monte Carlo noise of the
        draws (each image's estimate is unbiased and images are independent; NaN for one image);
        `"num_images"` and `"num_timestep_draws"` (K as used, at most T - 1).

    Example (with a trained unconditional `model` and uint8 `images`; tests/test_nll.py runs it on a closed form):

        output = lambda x_t, t: model.network_output([x_t, t])
        result = nll_bits_per_dim(output, model.schedule, model.objective, images)
        print(f"{result['bpd']:.3f} +- {result['stderr']:.3f} bits/dim")
    """
    images = check_images(images_uint8, "images_uint8")
    terms = variational_bound(
        predict, schedule, objective, images.astype(np.float32) / 127.5 - 1.0, decoder="discretized",
        num_timestep_draws=num_timestep_draws, batch_size=batch_size, seed=seed, clip_denoised=clip_denoised,
        verbose=verbose,
    )
    bits = {name: values / np.log(2.0) for name, values in terms.items()}
    num_images = len(images)
    stderr = bits["total"].std(ddof=1) / np.sqrt(num_images) if num_images > 1 else float("nan")
    return {
        "bpd": float(bits["total"].mean()),
        "prior_bpd": float(bits["prior"].mean()),
        "diffusion_bpd": float(bits["diffusion"].mean()),
        "decoder_bpd": float(bits["decoder"].mean()),
        "stderr": float(stderr),
        "num_images": num_images,
        "num_timestep_draws": min(int(num_timestep_draws), schedule.num_timesteps - 1),
    }
