"""Reverse-process samplers that run as one compiled TensorFlow loop.

Every sampler walks a decreasing sequence of integer timesteps t_0 > t_1 > ... > t_{S-1} and, at each step,
asks a `denoise(x_t, t) -> (pred_images, pred_noises)` function for its estimates of x_0 and of the noise.
The update from t to the next timestep is one of:

- `"ddpm"`: ancestral sampling from the posterior q(x_prev | x_t, x0_hat) (Ho et al. 2020, Algorithm 2),
  with respaced betas when steps are skipped (Nichol & Dhariwal 2021);
- `"ddim"`: the generalised update of Song et al. 2021 (Eq. 12); `eta = 0` is deterministic, `eta = 1` matches
  DDPM's posterior variance;
- `"dpm++"`: DPM-Solver++(2M), the second-order multistep solver of the diffusion ODE in data-prediction form
  (Lu et al. 2022, Algorithm 2), for 10-25 steps; with `eta = 1` its SDE form, SDE-DPM-Solver++(2M) (same paper,
  Section 5), whose fresh noise at every step can wash out errors of earlier steps that an ODE carries along.

- `"edm"`: the stochastic sampler of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based
  Generative Models", Algorithm 2): Heun's second-order steps of the ODE in sigma (two network calls a step), each
  after a "churn" that adds noise to raise the noise level by a factor 1 + gamma, with gamma = eta (sqrt(2) - 1)
  for noise levels in `EDM_CHURN_SIGMAS`; `eta = 0` is Heun's ODE sampler (their Algorithm 1).

The last step of all four is the same: from t_{S-1} the sample is the denoiser's x0 estimate. So S steps cost
S network calls (EDM too: see `edm_levels`). The loop is a `tf.while_loop`; randomness is stateless and per image
(image b uses the seed `seeds[b]`), so an image depends only on its own seed, never on the batch it was drawn in.

Notation. The three papers name the same quantities differently (DDIM's alpha_t is DDPM's alpha-bar_t, and
"sigma_t" is a step's noise in DDPM and DDIM but the marginal noise level in DPM-Solver), so the code uses one
name per quantity:

    code name           quantity                                DDPM (Ho 2020)      DDIM (Song 2021)  DPM-Solver++
    alpha_bar           cumulative signal variance              alpha-bar_t         alpha_t           alpha_t^2
    signal_rate         sqrt(alpha_bar): scales x_0 in x_t      sqrt(alpha-bar_t)   sqrt(alpha_t)     alpha_t
    noise_rate          sqrt(1 - alpha_bar): scales the noise   sqrt(1-alpha-bar_t) sqrt(1-alpha_t)   sigma_t
    half_log_snr        log(signal_rate / noise_rate)           -                   -                 lambda_t
    h                   half_log_snr(t_prev) - half_log_snr(t)  -                   -                 h_i
    pred_images         the denoiser's estimate of x_0          x_0 (from eps)      f_theta(x_t)      x_theta(x_t,t)
    pred_noises         the denoiser's estimate of the noise    eps_theta           eps_theta         eps_theta
    step_noise_std      std of the noise one step adds          sigma_t             sigma_t(eta)      (0 for the ODE)
    posterior_variance  step_noise_std^2 of the DDPM step       sigma_t^2           -                 -
    noise               a step's standard normal draw           z                   epsilon_t         -
    t, t_prev           this timestep and the next, smaller     t, t-1              tau_i, tau_i-1    t_i-1, t_i

In the code "sigma" alone is never used: it is `noise_rate` (DPM-Solver's sigma_t) or `step_noise_std`
(DDPM's and DDIM's sigma_t), except in EDM's sampler, whose `edm_sigma` = noise_rate / signal_rate is EDM's sigma:
x_t / signal_rate = x_0 + edm_sigma * noise.
"""

from typing import Callable, Literal, get_args

import tensorflow as tf

from keras_ddpm.schedule import NoiseSchedule, PosteriorVariance

SamplerName = Literal["ddpm", "ddim", "dpm++", "edm"]
Spacing = Literal["uniform", "quadratic", "logsnr", "karras"]
SAMPLERS = get_args(SamplerName)
SPACINGS = get_args(Spacing)
# DPM-Solver++ takes its largest steps in log-SNR, so it is spaced there (Lu et al. 2022); on Gaussian data
# (tests/test_samplers.py) uniform-in-t spacing leaves it 39% off the true std at 10 steps, log-SNR 3%. EDM's
# sampler takes its levels evenly spaced in sigma^(1/7) (Karras et al. 2022, Eq. 5).
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpm++": "logsnr", "edm": "karras"}
KARRAS_RHO = 7.0
# EDM's churn acts only on noise levels in [S_tmin, S_tmax] (edm_sigma), a band Karras et al. 2022 tune per dataset
# (Table 5; [0.05, 50] on ImageNet-64). On the shipped CelebA model the ImageNet band halved the broken faces but
# churn above sigma = 1 cost the coarse statistics (SWD's 16 px level); churn below it alone keeps the faces as whole
# and the distribution as close as the ODE's (REPORT.md 6.18 and 6.23).
EDM_IMAGENET_CHURN_SIGMAS = (0.05, 50.0)
EDM_CHURN_SIGMAS = (0.05, 1.0)

Denoiser = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def check_sampler(sampler) -> SamplerName:
    """`sampler` if it names one of `SAMPLERS`, else a ValueError that lists them."""
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
    return sampler


def check_steps_and_eta(steps: int, eta: float, num_timesteps: int, names=("steps", "eta")) -> None:
    """A ValueError unless 1 <= steps <= T (a sampler's network calls) and eta lies in [0, 1].

    `names` are what the message calls the two, e.g. the flags they came from.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"{names[0]} must be in [1, {num_timesteps}] (the schedule's T), got {steps}.")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"{names[1]} must be in [0, 1], got {eta}.")


def check_churn_sigmas(churn_sigmas) -> tuple[float, float]:
    """EDM's churn band (S_tmin, S_tmax) as two floats with 0 <= S_tmin < S_tmax, or a ValueError that says so."""
    try:
        low, high = (float(sigma) for sigma in churn_sigmas)
    except (TypeError, ValueError):
        raise ValueError(
            f"The churn band is two noise levels S_tmin,S_tmax such as 0.05,50; got {churn_sigmas!r}."
        ) from None
    if not 0.0 <= low < high:
        raise ValueError(f"The churn band needs 0 <= S_tmin < S_tmax, got S_tmin {low:g} and S_tmax {high:g}.")
    return low, high


def default_steps(sampler: SamplerName, num_timesteps: int) -> int:
    """Network evaluations when none are asked for: all T for DDPM, 50 for DDIM, 20 for DPM-Solver++, 199 for EDM
    (100 noise levels, the fewest measured to draw as many whole faces as DDPM-1000, REPORT.md 6.18; at most T)."""
    return {"ddpm": num_timesteps, "ddim": 50, "dpm++": 20, "edm": min(199, num_timesteps)}[check_sampler(sampler)]


def guide(strong, weak, guidance):
    """`weak + guidance * (strong - weak)`: classifier-free guidance (Ho & Salimans 2022, Eq. 6 with w = 1 + their
    w) when `weak` is the unconditional prediction, autoguidance (Karras et al. 2024) when it is a weaker model's.
    Guidance 1 is `strong` alone."""
    return weak + guidance * (strong - weak)


def make_denoiser(network_output, schedule, objective, labels=None, null_label=None, guidance=1.0,
                  clip_denoised=True):
    """Wrap a network into the `denoise(x_t, t) -> (pred_images, pred_noises)` that the samplers call.

    Args:
        network_output: `network_output([x_t, t])` or `network_output([x_t, t, labels])` -> the network's raw
            prediction (epsilon or v); see `keras_ddpm.generation.Generator`.
        schedule, objective: how to read that output (`NoiseSchedule.split_prediction`).
        labels: int32 [B] for a conditional network, else None.
        null_label: the network's null label id (its `num_classes`), used by guidance.
        guidance: classifier-free guidance scale w: the prediction is uncond + w * (cond - uncond)
            (Ho & Salimans 2022, Eq. 6 with w = 1 + their w). w = 1 is plain conditional sampling and costs
            one network call; otherwise both predictions come from one call on a doubled batch.
        clip_denoised: clip x0_hat to [-1, 1] and re-derive the noise from it, as DDPM's sampler does for images.
    """
    guidance = tf.cast(guidance, tf.float32)

    def guided_output(x_t, t):
        if labels is None:
            return network_output([x_t, t])

        def guided():
            null_labels = tf.fill(tf.shape(labels), null_label)
            both = network_output([tf.concat([x_t, x_t], 0), tf.concat([t, t], 0), tf.concat([labels, null_labels], 0)])
            conditional, unconditional = tf.split(both, 2)
            return guide(conditional, unconditional, guidance)

        return tf.cond(guidance == 1.0, lambda: network_output([x_t, t, labels]), guided)

    def denoise(x_t, t):
        pred_images, pred_noises = schedule.split_prediction(guided_output(x_t, t), x_t, t, objective)
        if clip_denoised:
            pred_images = tf.clip_by_value(pred_images, -1.0, 1.0)
            pred_noises = schedule.noise_from_x0(x_t, t, pred_images)
        return pred_images, pred_noises

    return denoise


def sampling_timesteps(schedule: NoiseSchedule, num_steps, spacing: Spacing = "uniform") -> tf.Tensor:
    """A strictly decreasing int32 sequence of `num_steps` timesteps from T - 1 down to 0.

    Spacings (all start at T - 1 and, from two steps on, end at 0; one step is [T - 1]):
    - `"uniform"`: evenly spaced in t from T - 1 to 0 (Lin et al. 2024 show that starting at T - 1 matters);
    - `"quadratic"`: t grows with the square of the step index, denser near the data (Song et al. 2021, App. D.2);
    - `"logsnr"`: evenly spaced in log-SNR lambda_t (Lu et al. 2022 recommend it for DPM-Solver);
    - `"karras"`: evenly spaced in edm_sigma^(1/7), denser near the data (Karras et al. 2022, Eq. 5, for EDM).
    `num_steps` may be a tensor (the SavedModel passes one) and must be in [1, T].
    """
    T = schedule.num_timesteps
    num_steps = tf.cast(num_steps, tf.int32)
    fractions = tf.linspace(0.0, 1.0, tf.maximum(num_steps, 2))[: num_steps]  # 0 .. 1, ascending
    if spacing == "uniform":
        ascending = fractions * (T - 1)
    elif spacing == "quadratic":
        ascending = tf.square(fractions) * (T - 1)
    elif spacing == "logsnr":
        half_log_snr = 0.5 * tf.math.log(schedule.snr(tf.range(T)))  # decreasing in t
        targets = half_log_snr[0] + fractions * (half_log_snr[-1] - half_log_snr[0])
        ascending = tf.cast(tf.searchsorted(-half_log_snr, -targets), tf.float32)
    elif spacing == "karras":
        root_sigma = tf.pow(edm_sigma(schedule, tf.constant([0, T - 1])), 1.0 / KARRAS_RHO)
        targets = tf.pow(root_sigma[0] + fractions * (root_sigma[1] - root_sigma[0]), KARRAS_RHO)
        ascending = tf.cast(schedule.nearest_timesteps(tf.math.log(targets)), tf.float32)
    else:
        raise ValueError(f"Unknown timestep spacing {spacing!r}; choose one of {SPACINGS}.")
    ascending = tf.cast(tf.round(ascending), tf.int32)
    # Rounding can repeat a timestep where the grid is dense; keep t_j - j non-decreasing so the
    # sequence is strictly increasing, and cap it so it ends at T - 1.
    offsets = tf.scan(tf.maximum, ascending - tf.range(num_steps))
    offsets = tf.minimum(offsets, T - num_steps)
    ascending = offsets + tf.range(num_steps)
    ascending = tf.tensor_scatter_nd_update(ascending, [[num_steps - 1]], [T - 1])
    return tf.reverse(ascending, [0])


def per_image_noise(seeds: tf.Tensor, counter, image_shape) -> tf.Tensor:
    """Standard normal noise [B, *image_shape]; image b is drawn from the stateless seed (seeds[b], counter).

    Drawing per image (rather than one draw for the batch) makes an image a function of its own seed only,
    so a TF Serving client asking for seed 7 gets the same face whatever else is in the request.
    """
    counter = tf.cast(counter, tf.int64)

    def draw(seed):
        return tf.random.stateless_normal(image_shape, seed=tf.stack([seed, counter]))

    return tf.map_fn(draw, tf.cast(seeds, tf.int64), fn_output_signature=tf.float32, parallel_iterations=16)


def ddpm_step(schedule, x_t, pred_images, t, t_prev, noise, variance: PosteriorVariance = "beta_tilde"):
    """x_prev ~ q(x_prev | x_t, x0_hat) (Ho et al. 2020, Algorithm 2 line 4, with x0 parameterisation).

    x_prev = posterior mean + step_noise_std * noise, with step_noise_std^2 = `posterior_variance` (DDPM's sigma_t^2).
    """
    mean, posterior_variance = schedule.posterior_mean_variance(pred_images, x_t, t, t_prev, variance)
    return mean + tf.sqrt(posterior_variance) * noise


def ddim_step(schedule, pred_images, pred_noises, t, t_prev, noise, eta):
    """x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - s^2) eps_hat + s z (Song et al. 2021, Eq. 12),

    with s = `step_noise_std` = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev) (Eq. 16, DDIM's
    sigma_t(eta)) and ab = alpha_bar (DDIM's alpha_t).
    """
    alpha_bar = schedule.alpha_bar_at(t)
    alpha_bar_prev = schedule.alpha_bar_at(t_prev)
    step_noise_std = eta * tf.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev))
    direction_rate = tf.sqrt(tf.maximum(1.0 - alpha_bar_prev - tf.square(step_noise_std), 0.0))
    return tf.sqrt(alpha_bar_prev) * pred_images + direction_rate * pred_noises + step_noise_std * noise


def dpmpp_2m_step(schedule, x_t, pred_images, previous_pred_images, t, t_prev, t_before, is_first_step, noise, eta):
    """One step of DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++"): the ODE solver (Algorithm 2) at eta = 0,
    SDE-DPM-Solver++(2M) (Section 5, the "midpoint" form of diffusers' `sde-dpmsolver++`) at eta = 1.

    With half_log_snr = log(signal_rate / noise_rate) (the paper's lambda = log(alpha / sigma)) and
    h = half_log_snr(t_prev) - half_log_snr(t):
        x_prev = (noise_rate_prev / noise_rate) exp(-eta h) x_t + signal_rate_prev (1 - exp(-(1 + eta) h)) D
                 + noise_rate_prev sqrt(1 - exp(-2 eta h)) noise,
        D = x0_hat + (x0_hat - x0_hat_before) / (2 r),  r = h_before / h,
    where `t_before` is the timestep visited before t. The first step uses D = x0_hat (first order), which is DDIM's
    update with the same eta at eta = 0 and at eta = 1 (DDPM's posterior). Between 0 and 1, eta scales h in the noise
    terms as k-diffusion's `sample_dpmpp_2m_sde` does.
    """
    half_log_snr = lambda step: 0.5 * tf.math.log(schedule.snr(step))  # noqa: E731
    h = half_log_snr(t_prev) - half_log_snr(t)
    h_before = half_log_snr(t) - half_log_snr(t_before)
    correction_weight = tf.where(is_first_step, 0.0, h / (2.0 * tf.where(is_first_step, 1.0, h_before)))
    data_estimate = pred_images + correction_weight * (pred_images - previous_pred_images)
    signal_rate, noise_rate = schedule.rates(t, ndim=0)
    signal_rate_prev, noise_rate_prev = schedule.rates(t_prev, ndim=0)
    x_t_rate = noise_rate_prev / noise_rate * tf.exp(-eta * h)
    data_rate = -signal_rate_prev * tf.math.expm1(-(1.0 + eta) * h)
    step_noise_std = noise_rate_prev * tf.sqrt(-tf.math.expm1(-2.0 * eta * h))
    return x_t_rate * x_t + data_rate * data_estimate + step_noise_std * noise


def edm_sigma(schedule: NoiseSchedule, t) -> tf.Tensor:
    """EDM's noise level sqrt((1 - alpha_bar_t) / alpha_bar_t) of timestep t (0 at t = -1, the data): x_t divided
    by its signal rate is x_0 + edm_sigma * noise (Karras et al. 2022, Eq. 1 with s(t) = sqrt(alpha_bar_t))."""
    alpha_bar = schedule.alpha_bar_at(t)
    return tf.sqrt((1.0 - alpha_bar) / alpha_bar)


def edm_churned_timestep(schedule: NoiseSchedule, t, gamma, churn_sigmas) -> tf.Tensor:
    """The timestep of the raised noise level edm_sigma_t (1 + gamma) (Karras et al. 2022, Algorithm 2, lines 4-5),
    snapped to the nearest timestep at or above t; t itself outside `churn_sigmas`."""
    sigma = edm_sigma(schedule, t)
    in_band = (churn_sigmas[0] <= sigma) & (sigma <= churn_sigmas[1])
    raised = schedule.nearest_timesteps(tf.reshape(tf.math.log(sigma * (1.0 + gamma)), [1]))[0]
    return tf.where(in_band, tf.maximum(t, raised), t)


def edm_levels(schedule: NoiseSchedule, num_calls, spacing: Spacing = "karras") -> tf.Tensor:
    """The noise levels (timesteps) EDM's sampler visits in `num_calls` network calls: num_calls // 2 + 1 of them,
    Heun-corrected (2 calls) but the last and, for an even budget, the first."""
    return sampling_timesteps(schedule, tf.cast(num_calls, tf.int32) // 2 + 1, spacing)


def edm_loop(denoise: Denoiser, schedule: NoiseSchedule, seeds, image_shape, num_calls, levels, gamma,
             churn_sigmas, return_trajectory=False, on_step=None):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) over the decreasing timesteps `levels`, in
    `num_calls` network calls (2 per level but the last, 1 for the first too when `num_calls` is even).

    At level t_i (edm_sigma sigma_i; x is in the sigma space x_t / signal_rate):
        churn:     sigma_hat = edm_sigma(t_hat), t_hat = `edm_churned_timestep(t_i, gamma)`,
                   x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) noise;
        Euler:     d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat,  x' = x_hat + (sigma_{i+1} - sigma_hat) d;
        Heun:      x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2,  d' = (x' - D(x'; sigma_{i+1})) / sigma_{i+1};
    and the last level returns D(x_hat; sigma_hat). D is `denoise`'s x0 estimate; the noise of level i is drawn with
    counter i + 1. Each loop iteration is one network call, so the network appears once in the graph.
    """
    num_calls = tf.cast(num_calls, tf.int32)
    num_levels = tf.shape(levels)[0]
    levels = tf.concat([levels, [-1]], 0)  # t = -1 after the last level: edm_sigma 0
    euler_only_first = num_calls % 2 == 0  # an even budget skips the first level's correction
    batch_size = tf.shape(seeds)[0]

    def call_network(x, t):
        signal_rate, _ = schedule.rates(t, ndim=0)
        pred_images, _ = denoise(x * signal_rate, tf.fill([batch_size], t))
        return pred_images, x * signal_rate

    def body(i, level, correcting, x, x_hat, t_hat, d, trajectory):
        t, t_next = levels[level], levels[level + 1]

        def churn():
            raised = edm_churned_timestep(schedule, t, gamma, churn_sigmas)
            added_std = tf.sqrt(tf.square(edm_sigma(schedule, raised)) - tf.square(edm_sigma(schedule, t)))
            # no churn (the ODE, or a level outside the band) draws no noise, as the other samplers' ODEs do not
            churned = tf.cond(raised > t, lambda: x + added_std * per_image_noise(seeds, level + 1, image_shape),
                              lambda: x)
            return churned, raised, churned, raised

        # a correction evaluates the Euler point x at t_next; a new level churns and evaluates x_hat at t_hat
        x_hat, t_hat, x_in, t_in = tf.cond(correcting, lambda: (x_hat, t_hat, x, t_next), churn)
        pred_images, network_input = call_network(x_in, t_in)
        trajectory = trajectory.write(i, network_input) if return_trajectory else trajectory
        slope = (x_in - pred_images) / edm_sigma(schedule, t_in)
        step = edm_sigma(schedule, t_next) - edm_sigma(schedule, t_hat)
        corrects = (t_next >= 0) & ~(euler_only_first & (level == 0))

        def heun():
            return x_hat + step * 0.5 * (d + slope), level + 1, tf.constant(False), d

        def euler():
            x_euler = tf.where(t_next >= 0, x_hat + step * slope, pred_images)
            return x_euler, tf.where(corrects, level, level + 1), corrects, slope

        x, level, correcting, d = tf.cond(correcting, heun, euler)
        if on_step is not None:
            with tf.control_dependencies([x]):
                on_step(i + 1)
        return i + 1, level, correcting, x, x_hat, t_hat, d, trajectory

    x_T = per_image_noise(seeds, 0, image_shape)
    x_start = x_T / schedule.rates(levels[0], ndim=0)[0]
    trajectory = tf.TensorArray(tf.float32, size=num_calls if return_trajectory else 0)
    zero = tf.constant(0)
    _, _, _, images, _, _, _, trajectory = tf.while_loop(
        lambda i, level, *_: level < num_levels,
        body,
        (zero, zero, tf.constant(False), x_start, x_start, levels[0], tf.zeros_like(x_start), trajectory),
    )
    if return_trajectory:
        return images, trajectory.stack()
    return images


def sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    seeds: tf.Tensor,
    image_shape,
    num_steps,
    sampler: SamplerName = "ddim",
    eta=0.0,
    spacing: Spacing | None = None,
    ddpm_variance: PosteriorVariance = "beta_tilde",
    churn_sigmas: tuple[float, float] = EDM_CHURN_SIGMAS,
    return_trajectory: bool = False,
    on_step: Callable[[tf.Tensor], None] | None = None,
):
    """Run a reverse process from per-image Gaussian noise to images in (about) [-1, 1].

    Meant to be called inside a `tf.function`; the loop over steps is a `tf.while_loop`.

    Args:
        denoise: `denoise(x_t, t) -> (pred_images, pred_noises)`, t an int32 vector [B].
        schedule: the model's `NoiseSchedule`.
        seeds: int64 [B]; image b starts from noise drawn with seed (seeds[b], 0) and uses (seeds[b], i + 1)
            for the noise of step i.
        image_shape: (H, W, C).
        num_steps: number of network evaluations S (a Python int or a scalar tensor), 1 <= S <= T.
        sampler: `"ddpm"`, `"ddim"`, `"dpm++"` or `"edm"`.
        eta: the stochasticity of DDIM, DPM-Solver++ and EDM in [0, 1]: 0 solves the ODE, 1 adds DDPM's noise
            (EDM: its largest churn, gamma = sqrt(2) - 1, for noise levels in `churn_sigmas`; ignored by DDPM).
        spacing: how the S timesteps are spread over [0, T) (see `sampling_timesteps`); default
            `DEFAULT_SPACING[sampler]`.
        ddpm_variance: the DDPM step's `posterior_variance` (DDPM's sigma_t^2), `"beta_tilde"` or `"beta"`.
        churn_sigmas: the band of EDM noise levels [S_tmin, S_tmax] that EDM's sampler churns in.
        return_trajectory: also return x_t before each step, [S, B, H, W, C] (for process figures).
        on_step: called in the loop after each step with the number of steps done (a tensor, 1 to S): a host-side
            progress report (`generation.StepListener`). Exported graphs take none.

    Returns:
        Images float32 [B, H, W, C] (and the trajectory when asked).
    """
    check_sampler(sampler)
    if sampler == "edm":
        levels = edm_levels(schedule, num_steps, spacing or DEFAULT_SPACING[sampler])
        gamma = tf.cast(eta, tf.float32) * (2.0**0.5 - 1.0)  # EDM's largest churn at eta = 1: twice the variance
        return edm_loop(denoise, schedule, seeds, image_shape, num_steps, levels, gamma, churn_sigmas,
                        return_trajectory=return_trajectory, on_step=on_step)
    timesteps = sampling_timesteps(schedule, num_steps, spacing or DEFAULT_SPACING[sampler])
    num_steps = tf.shape(timesteps)[0]
    batch_size = tf.shape(seeds)[0]
    eta = tf.cast(eta, tf.float32)

    def step_noise(i):
        noise = lambda: per_image_noise(seeds, i + 1, image_shape)  # noqa: E731
        if sampler == "ddpm":
            return noise()
        return tf.cond(eta > 0, noise, lambda: tf.zeros([batch_size, *image_shape]))  # the ODE draws nothing

    def body(i, x_t, previous_pred_images, trajectory):
        t = timesteps[i]
        trajectory = trajectory.write(i, x_t) if return_trajectory else trajectory
        pred_images, pred_noises = denoise(x_t, tf.fill([batch_size], t))

        def step():
            t_prev = timesteps[i + 1]
            if sampler == "ddpm":
                return ddpm_step(schedule, x_t, pred_images, t, t_prev, step_noise(i), ddpm_variance)
            if sampler == "ddim":
                return ddim_step(schedule, pred_images, pred_noises, t, t_prev, step_noise(i), eta)
            t_before = timesteps[tf.maximum(i - 1, 0)]
            return dpmpp_2m_step(schedule, x_t, pred_images, previous_pred_images, t, t_prev, t_before, i == 0,
                                 step_noise(i), eta)

        # The last evaluation's prediction is the image. Inside the loop, the network appears once in the graph,
        # which halves the tracing, loading and graph optimisation of samplers and exported SavedModels.
        x_t = tf.cond(i < num_steps - 1, step, lambda: pred_images)
        if on_step is not None:
            with tf.control_dependencies([x_t]):  # after the network call, not merely after the counter
                on_step(i + 1)
        return i + 1, x_t, pred_images, trajectory

    x_T = per_image_noise(seeds, 0, image_shape)
    trajectory = tf.TensorArray(tf.float32, size=num_steps if return_trajectory else 0)
    _, images, _, trajectory = tf.while_loop(
        lambda i, *_: i < num_steps,
        body,
        (tf.constant(0), x_T, tf.zeros_like(x_T), trajectory),
    )
    if return_trajectory:
        return images, trajectory.stack()
    return images


def to_uint8(images: tf.Tensor) -> tf.Tensor:
    """Map float images in [-1, 1] to uint8 [0, 255] (rounding, clipping what lies outside)."""
    return tf.cast(tf.clip_by_value(tf.round((images + 1.0) * 127.5), 0.0, 255.0), tf.uint8)
