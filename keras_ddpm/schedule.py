"""Noise schedules of the forward diffusion process and the formulas built on them.

The forward process of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", Eq. 4) has the closed form

    q(x_t | x_0) = N(x_t; sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),   alpha_bar_t = prod_{s<=t} (1 - beta_s)

so every quantity here is a function of `alpha_bar`. Following the keras-io DDIM example we call
`sqrt(alpha_bar)` the *signal rate* and `sqrt(1 - alpha_bar)` the *noise rate*. Timesteps are integers in
`[0, T)`; the index `-1` stands for clean data (`alpha_bar = 1`), which is where every sampler's last step lands.
"""

import math
from typing import Literal

import numpy as np
import tensorflow as tf

ScheduleKind = Literal["linear", "cosine"]
Objective = Literal["epsilon", "v"]
PosteriorVariance = Literal["beta_tilde", "beta"]


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Betas evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020, Sec. 4), in float64.

    The endpoints are those of the paper for T = 1000; for other T they are rescaled by 1000 / T so that the
    total amount of noise stays the same (as in improved-DDPM's `get_named_beta_schedule`).
    """
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule of Nichol & Dhariwal 2021 ("Improved DDPM", Eq. 17), in float64.

    alpha_bar(t) = f(t) / f(0) with f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2); betas are clipped at
    `max_beta` to avoid the singularity at t = T.
    """
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    alpha_bars = f / f[0]
    return np.clip(1.0 - alpha_bars[1:] / alpha_bars[:-1], 0.0, max_beta)


class NoiseSchedule:
    """The variance schedule of a discrete-time diffusion process and its closed-form quantities.

    Tables are computed in float64 with numpy and stored as float32 tensors; all methods take integer
    timesteps `t` of shape `[B]` and broadcast the gathered coefficients over images `[B, H, W, C]`.

    Args:
        kind: `"linear"` (Ho et al. 2020) or `"cosine"` (Nichol & Dhariwal 2021).
        num_timesteps: T, the number of diffusion steps.
        beta_start, beta_end: endpoints of the linear schedule (for T = 1000).

    Example:
    >>> schedule = NoiseSchedule("linear", num_timesteps=1000)
    >>> x0 = tf.zeros([2, 8, 8, 3]); noise = tf.random.normal([2, 8, 8, 3])
    >>> x_t = schedule.q_sample(x0, tf.constant([0, 999]), noise)
    """

    def __init__(
        self,
        kind: ScheduleKind = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}.")
        if kind == "linear":
            betas = linear_betas(num_timesteps, beta_start, beta_end)
        elif kind == "cosine":
            betas = cosine_betas(num_timesteps)
        else:
            raise ValueError(f"Unknown noise schedule {kind!r}; choose 'linear' or 'cosine'.")
        self.kind = kind
        self.num_timesteps = num_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.betas_np = betas
        self.alpha_bars_np = np.cumprod(1.0 - betas)
        self.betas = tf.constant(betas, tf.float32)
        self.alpha_bars = tf.constant(self.alpha_bars_np, tf.float32)
        # alpha_bar with a leading 1 for "t = -1" (clean data), so alpha_bar_at(t - 1) needs no special case.
        self._alpha_bars_from_clean = tf.constant(np.concatenate([[1.0], self.alpha_bars_np]), tf.float32)
        # SNR near t = 0 is ~1e4: 1 - alpha_bar must be formed in float64, not from the float32 table.
        self._snrs = tf.constant(self.alpha_bars_np / (1.0 - self.alpha_bars_np), tf.float32)
        # Midpoints between neighbouring steps' ln(sigma_t), sigma_t = SNR_t^(-1/2): the bins of `nearest_timesteps`.
        log_sigmas = -0.5 * np.log(self.alpha_bars_np / (1.0 - self.alpha_bars_np))
        self._log_sigma_bin_edges = tf.constant((log_sigmas[1:] + log_sigmas[:-1]) / 2, tf.float32)

    def get_config(self) -> dict:
        return {
            "kind": self.kind,
            "num_timesteps": self.num_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        return cls(**config)

    # -- gathering coefficients ---------------------------------------------------------------------------

    def alpha_bar_at(self, t) -> tf.Tensor:
        """alpha_bar_t for integer `t` in [-1, T), with alpha_bar_{-1} = 1; shape of `t`."""
        t = tf.convert_to_tensor(t)
        return tf.gather(self._alpha_bars_from_clean, tf.cast(t, tf.int32) + 1)

    def rates(self, t, ndim: int = 4) -> tuple[tf.Tensor, tf.Tensor]:
        """(signal_rate, noise_rate) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) shaped to broadcast over images."""
        alpha_bar = _expand_to(self.alpha_bar_at(t), ndim)
        return tf.sqrt(alpha_bar), tf.sqrt(1.0 - alpha_bar)

    def snr(self, t) -> tf.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021) for t in [0, T), shape of `t`."""
        return tf.gather(self._snrs, tf.cast(t, tf.int32))

    def nearest_timesteps(self, log_sigmas) -> tf.Tensor:
        """The timesteps whose noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) are nearest in log.

        sigma_t is the noise level of Karras et al. 2022 (EDM): x_t / sqrt(alpha_bar_t) = x_0 + sigma_t noise.
        Levels outside the schedule's range map to its first or last step. Returns int32 of the shape of
        `log_sigmas` (a 1-D tensor).
        """
        return tf.searchsorted(self._log_sigma_bin_edges, tf.cast(log_sigmas, tf.float32), out_type=tf.int32)

    # -- the forward process -------------------------------------------------------------------------------

    def q_sample(self, x0, t, noise) -> tf.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (Ho et al. 2020, Eq. 4)."""
        signal_rates, noise_rates = self.rates(t, len(x0.shape))
        return signal_rates * x0 + noise_rates * noise

    def velocity(self, x0, t, noise) -> tf.Tensor:
        """The v-prediction target v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, Sec. 4)."""
        signal_rates, noise_rates = self.rates(t, len(x0.shape))
        return signal_rates * noise - noise_rates * x0

    # -- reading a network's prediction -------------------------------------------------------------------------

    def split_prediction(self, prediction, x_t, t, objective: Objective) -> tuple[tf.Tensor, tf.Tensor]:
        """Turn a network output into the pair (x0_hat, noise_hat) that every sampler uses.

        For epsilon-prediction x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) (Ho et al. 2020, Eq. 15); for
        v-prediction x0 = sqrt(ab) x_t - sqrt(1 - ab) v and eps = sqrt(1 - ab) x_t + sqrt(ab) v
        (Salimans & Ho 2022).
        """
        signal_rates, noise_rates = self.rates(t, len(x_t.shape))
        if objective == "epsilon":
            pred_noises = prediction
            pred_images = (x_t - noise_rates * pred_noises) / signal_rates
        elif objective == "v":
            pred_images = signal_rates * x_t - noise_rates * prediction
            pred_noises = noise_rates * x_t + signal_rates * prediction
        else:
            raise ValueError(f"Unknown objective {objective!r}; choose 'epsilon' or 'v'.")
        return pred_images, pred_noises

    def noise_from_x0(self, x_t, t, pred_images) -> tf.Tensor:
        """The noise consistent with x_t and an x0 estimate: (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""
        signal_rates, noise_rates = self.rates(t, len(x_t.shape))
        return (x_t - signal_rates * pred_images) / noise_rates

    # -- the reverse process ---------------------------------------------------------------------------------

    def posterior_mean_variance(
        self, x0, x_t, t, t_prev=None, variance: PosteriorVariance = "beta_tilde"
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Mean and variance of q(x_{t_prev} | x_t, x_0) (Ho et al. 2020, Eqs. 6-7).

        With `t_prev = t - 1` (the default) this is the DDPM posterior. A larger jump t -> t_prev uses the
        respaced beta' = 1 - alpha_bar_t / alpha_bar_{t_prev} (Nichol & Dhariwal 2021, Sec. 4), which lets
        ancestral sampling skip steps. `variance` picks sigma_t^2 = beta-tilde (the true posterior variance,
        the default) or beta (the upper bound); both are discussed in Ho et al. 2020, Sec. 3.2.
        The variance has shape [B, 1, ..., 1], broadcastable over images.
        """
        if t_prev is None:
            t_prev = t - 1
        ndim = len(x_t.shape)
        alpha_bar = _expand_to(self.alpha_bar_at(t), ndim)
        alpha_bar_prev = _expand_to(self.alpha_bar_at(t_prev), ndim)
        beta = 1.0 - alpha_bar / alpha_bar_prev
        x0_coef = tf.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar)
        x_t_coef = tf.sqrt(1.0 - beta) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        mean = x0_coef * x0 + x_t_coef * x_t
        if variance == "beta_tilde":
            posterior_variance = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        elif variance == "beta":
            posterior_variance = beta
        else:
            raise ValueError(f"Unknown posterior variance {variance!r}; choose 'beta_tilde' or 'beta'.")
        return mean, posterior_variance


def _expand_to(values, ndim: int) -> tf.Tensor:
    """Reshape per-example values [B] to [B, 1, ..., 1] so they broadcast over tensors of rank `ndim`."""
    return tf.reshape(values, [-1] + [1] * (ndim - 1))
