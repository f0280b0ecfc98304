"""EDM's stochastic sampler: Heun's method with noise added and removed at each step, and whether fewer faces break.

    python bench/edm_sampling.py --model=savedmodel --configs 20:0 20:8 --grid_dir=$HOME/runs/edm \
        [--seed=64 --num_images=512 --data_dir=../shared/data/celeba]

DDPM with all 1,000 steps breaks about half as many of the shipped model's faces as its ODE sampler does, and
respaced DDPM, SDE-DPM-Solver++ and Restart sampling do not (REPORT.md 6.14 and 6.17). Karras et al. 2022
("Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 2) add the noise in a chosen band of
noise levels only, and take second-order Heun steps between: at level sigma_i,

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax, else 0
    sigma_hat = sigma_i (1 + gamma_i),   x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise z
    d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat,   x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d
    and, unless sigma_{i+1} = 0, the Heun correction with d' = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1}.

Here x = x_t / sqrt(alpha_bar_t) and sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t), so the discrete VP model is
the denoiser D (its clipped x0_hat). The N levels follow EDM's rho = 7 spacing between the schedule's smallest and
largest sigma; they, and each sigma_hat, are snapped to the nearest timestep, so the noise added is what takes
sigma_i exactly to the snapped sigma_hat. A run costs 2N - 1 network calls (fewer where snapping merges levels).

A configuration is `N:S_churn[:S_tmin:S_tmax[:S_noise]]` (default band 0.05 to 50, S_noise 1, EDM's ImageNet
values); `N:0` is Heun's deterministic ODE sampler (EDM Algorithm 1). Each configuration draws `--num_images`
samples from the seeds `--seed`, `--seed` + 1, ..., keeps the first 64 as <grid_dir>/edm_<spec>_s<seed>.png and,
from 128 images on, scores them against as many held-out faces. Prints `key value` lines: floor_swd_mean,
floor_face_fd, floor_face_landmark_fd (from 128 images), and per configuration <name>_network_calls, _seconds,
_swd_mean, _face_rate, _face_fd, _face_landmark_fd.
"""

import argparse
import dataclasses
import pathlib
import time

import numpy as np
import tensorflow as tf

import common

from keras_ddpm import samplers
from keras_ddpm.generation import generate_in_batches
from keras_ddpm.runs import load_generator

RHO = 7.0  # EDM's spacing of noise levels: evenly spaced in sigma^(1 / rho)


@dataclasses.dataclass(frozen=True)
class Churn:
    """One configuration of EDM's stochastic sampler (Karras et al. 2022, Algorithm 2)."""

    steps: int  # N, the noise levels before sigma = 0
    churn: float  # S_churn: gamma_i = min(S_churn / N, sqrt(2) - 1) inside the band
    sigma_tmin: float = 0.05  # S_tmin
    sigma_tmax: float = 50.0  # S_tmax
    s_noise: float = 1.0  # S_noise: the added noise's scale

    @classmethod
    def parse(cls, spec: str) -> "Churn":
        """`N:S_churn[:S_tmin:S_tmax[:S_noise]]`."""
        fields = spec.split(":")
        try:
            if len(fields) not in (2, 4, 5):
                raise ValueError
            config = cls(int(fields[0]), *(float(field) for field in fields[1:]))
        except ValueError:
            raise argparse.ArgumentTypeError(f"A configuration is N:S_churn[:S_tmin:S_tmax[:S_noise]] "
                                             f"(e.g. 20:8 or 20:8:0.05:50), got {spec!r}.") from None
        if config.steps < 2 or config.churn < 0 or not 0 <= config.sigma_tmin <= config.sigma_tmax \
                or config.s_noise <= 0:
            raise argparse.ArgumentTypeError(f"A configuration needs N >= 2, S_churn >= 0, "
                                             f"0 <= S_tmin <= S_tmax and S_noise > 0, got {spec!r}.")
        return config

    @property
    def name(self) -> str:
        return f"edm_{self.steps}_{self.churn:g}_{self.sigma_tmin:g}_{self.sigma_tmax:g}_{self.s_noise:g}"


def sigmas_of(schedule) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0 .. T - 1, increasing."""
    alpha_bar = schedule.alpha_bar_at(tf.range(schedule.num_timesteps)).numpy().astype(np.float64)
    return np.sqrt((1.0 - alpha_bar) / alpha_bar)


def snap(schedule, sigmas) -> list[int]:
    """The timesteps whose sigma is nearest (in log) to each of `sigmas`."""
    return [int(t) for t in schedule.nearest_timesteps(np.log(sigmas)).numpy()]


def edm_path(schedule, config: Churn) -> list[tuple[int, int, int]]:
    """(t_i, t_hat_i, t_{i+1}) for each step: the level, the level after the churn and the next level (-1 is
    sigma = 0). The levels are EDM's rho-spaced sigmas (Karras et al. 2022, Eq. 5), snapped to timesteps."""
    sigma = sigmas_of(schedule)
    ramp = np.linspace(0.0, 1.0, config.steps)
    rho_spaced = (sigma[-1] ** (1 / RHO) + ramp * (sigma[0] ** (1 / RHO) - sigma[-1] ** (1 / RHO))) ** RHO
    levels = sorted(set(snap(schedule, rho_spaced)), reverse=True)
    levels[0] = schedule.num_timesteps - 1  # start from the schedule's own last step, as the library samplers do
    gamma = min(config.churn / config.steps, np.sqrt(2.0) - 1.0)
    path = []
    for t, t_next in zip(levels, levels[1:] + [-1]):
        in_band = config.sigma_tmin <= sigma[t] <= config.sigma_tmax
        t_hat = max(t, snap(schedule, [sigma[t] * (1.0 + gamma)])[0]) if in_band and gamma > 0 else t
        path.append((t, t_hat, t_next))
    return path


def network_calls(path) -> int:
    """One call per step, and one more for Heun's correction wherever the step does not end at sigma = 0."""
    return sum(2 if t_next >= 0 else 1 for _, _, t_next in path)


def compile_edm_sampler(generator, path, s_noise: float = 1.0):
    """f(seeds int64 [B]) -> uint8 images, following `path` (from `edm_path`) with EDM's Algorithm 2."""
    schedule = generator.schedule
    steps = tf.constant(path, tf.int32)  # [N, 3]
    sigmas = tf.constant(np.append(0.0, sigmas_of(schedule)), tf.float32)  # t = -1, the end of the path, is 0

    def level(t):
        return tf.gather(sigmas, t + 1)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def sample(seeds):
        denoise = samplers.make_denoiser(generator.network_output, schedule, generator.objective)
        batch_size = tf.shape(seeds)[0]

        def slope(x, t):
            """d = (x - D(x; sigma_t)) / sigma_t, the ODE's dx/dsigma (EDM Eq. 3 with sigma(t) = t)."""
            pred_images, _ = denoise(x / tf.sqrt(1.0 + tf.square(level(t))), tf.fill([batch_size], t))
            return (x - pred_images) / level(t)

        def body(i, x):
            t, t_hat, t_next = steps[i, 0], steps[i, 1], steps[i, 2]
            sigma, sigma_hat, sigma_next = level(t), level(t_hat), level(t_next)
            added_std = tf.sqrt(tf.square(sigma_hat) - tf.square(sigma))
            x_hat = x + added_std * s_noise * samplers.per_image_noise(seeds, i + 1, generator.image_shape)
            d = slope(x_hat, t_hat)
            x_euler = x_hat + (sigma_next - sigma_hat) * d

            def heun():
                return x_hat + (sigma_next - sigma_hat) * 0.5 * (d + slope(x_euler, t_next))

            return i + 1, tf.cond(t_next >= 0, heun, lambda: x_euler)

        # x_T ~ N(0, I) in the VP space, as the library samplers start, is x_T / sqrt(alpha_bar_T) here.
        start_scale = tf.sqrt(1.0 + tf.square(level(path[0][0])))
        x_start = samplers.per_image_noise(seeds, 0, generator.image_shape) * start_scale
        _, images = tf.while_loop(lambda i, _: i < len(path), body, (tf.constant(0), x_start))
        return samplers.to_uint8(images)

    return sample


class EDMGenerator:
    """What `generate_in_batches` needs of a `Generator`: images drawn with one configuration."""

    def __init__(self, generator, config: Churn):
        self.max_batch_size = generator.max_batch_size
        self._sample = compile_edm_sampler(generator, edm_path(generator.schedule, config), config.s_noise)

    def generate(self, seeds, labels=None) -> np.ndarray:
        return self._sample(tf.constant(seeds, tf.int64)).numpy()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=pathlib.Path("savedmodel"),
                        help="an export or a run directory (unconditional)")
    parser.add_argument("--checkpoint_step", type=int, default=None, help="a run's checkpoint (default: the newest)")
    parser.add_argument("--configs", type=Churn.parse, nargs="+", required=True,
                        help="configurations N:S_churn[:S_tmin:S_tmax[:S_noise]]; N:0 is Heun's ODE sampler")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--precision", default=None, help="a run directory's dtype policy (default float32)")
    parser.add_argument("--data_dir", default=None, help="CelebA folder (default: CELEBA_DIR)")
    parser.add_argument("--grid_dir", type=pathlib.Path, required=True, help="where the 64-image grids go")
    args = parser.parse_args()
    if args.num_images < 1 or args.batch_size < 1:
        parser.error(f"--num_images and --batch_size must be at least 1, got {args.num_images} and {args.batch_size}.")
    return args


def main():
    args = parse_args()
    generator = load_generator(args.model, args.checkpoint_step, args.precision)
    if generator.num_classes:
        raise SystemExit(f"{args.model} is a conditional model; this benchmark samples unconditional ones.")
    report = common.SampleReport(generator.image_shape[0], args.num_images, args.grid_dir, args.data_dir)
    for config in args.configs:
        print(f"{config.name}_network_calls {network_calls(edm_path(generator.schedule, config))}", flush=True)
        start = time.perf_counter()
        images = generate_in_batches(EDMGenerator(generator, config), args.num_images, args.batch_size,
                                     seed=args.seed, verbose=False)
        report.add(config.name, images, time.perf_counter() - start, grid_name=f"{config.name}_s{args.seed}")


if __name__ == "__main__":
    main()
