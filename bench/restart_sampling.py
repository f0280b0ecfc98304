"""Restart sampling: an ODE sampler that goes back up in noise a few times, and whether fewer faces break.

    python bench/restart_sampling.py --model=savedmodel --restarts 0 1:5:2:10 --grid_dir=$HOME/runs/restart \
        [--num_images=512 --data_dir=../shared/data/celeba]

The shipped model's ODE sampler (DPM-Solver++-20) breaks about one face in ten, DDPM with all 1,000 steps about
one in twenty (REPORT.md 6.14, blind raters): the fresh noise of a stochastic sampler washes out errors that an ODE
carries to the end, but it needs many small steps to do it. Restart sampling (Xu et al. 2023, "Restart Sampling
for Improving Generative Processes", Algorithm 1) keeps the ODE's accuracy and gets the noise's contraction in one
interval [t_min, t_max]: run the ODE down to t_min, then K times jump forward to t_max with the forward process,

    x_{t_max} = sqrt(alpha_bar_max / alpha_bar_min) x_{t_min} + sqrt(1 - alpha_bar_max / alpha_bar_min) z,

and run the ODE from t_max back down to t_min; then finish the ODE to t = 0. Each run of the ODE here is
DPM-Solver++(2M) (`samplers.dpmpp_2m_step`), spaced evenly in log-SNR, restarting first order after a jump.

A restart is given as `sigma_min:sigma_max:K:steps`, the interval in EDM noise levels
sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et al. 2022; snapped to the schedule's timesteps, t_min then to
the main ODE's nearest timestep), K jumps and `steps` network calls for each run down (fewer if rounding to integer
timesteps merges some; `_network_calls` counts them). `0` is the plain ODE, which draws
the same images as `samplers.sample(..., "dpm++", eta=0)`. A run costs `--main_steps + K * steps` network calls.

Each configuration (traced anew, which `_seconds` includes) draws `--num_images` samples from the seeds `--seed`,
`--seed` + 1, ..., keeps the first 64 as <grid_dir>/restart_<spec>_s<seed>.png and, from 128 images on, scores them
against as many held-out faces. Prints `key value` lines: floor_swd_mean, floor_face_fd, floor_face_landmark_fd
(from 128 images), and per configuration <name>_network_calls, _seconds, _swd_mean, _face_rate, _face_fd,
_face_landmark_fd.

On the shipped model, six blind raters found no configuration that breaks fewer faces than the plain ODE, and
restarts from sigma = 2 to 10 break about twice as many (REPORT.md 6.17).
"""

import argparse
import dataclasses

import numpy as np
import tensorflow as tf

import common

from keras_ddpm import samplers


@dataclasses.dataclass(frozen=True)
class Restart:
    """One restart interval: `jumps` times from sigma_min up to sigma_max and back down in `steps` calls."""

    sigma_min: float
    sigma_max: float
    jumps: int
    steps: int

    @classmethod
    def parse(cls, spec: str) -> "Restart | None":
        """`sigma_min:sigma_max:K:steps`, or `0` for none."""
        if spec == "0":
            return None
        try:
            sigma_min, sigma_max, jumps, steps = spec.split(":")
            restart = cls(float(sigma_min), float(sigma_max), int(jumps), int(steps))
        except ValueError:
            raise argparse.ArgumentTypeError(f"A restart is sigma_min:sigma_max:K:steps (e.g. 1:5:2:10) or 0, "
                                             f"got {spec!r}.") from None
        if not 0 < restart.sigma_min < restart.sigma_max or restart.jumps < 1 or restart.steps < 1:
            raise argparse.ArgumentTypeError(f"A restart needs 0 < sigma_min < sigma_max, K >= 1 and steps >= 1, "
                                             f"got {spec!r}.")
        return restart


def logsnr_segment(schedule, t_start: int, t_end: int, num_points: int) -> list[int]:
    """`num_points` timesteps from t_start down to t_end, evenly spaced in log-SNR (rounded, duplicates dropped)."""
    half_log_snr = 0.5 * np.log(schedule.snr(tf.range(schedule.num_timesteps)).numpy())  # decreasing in t
    targets = np.linspace(half_log_snr[t_start], half_log_snr[t_end], num_points)
    points = [int(t) for t in np.searchsorted(-half_log_snr, -targets)]
    points[0], points[-1] = t_start, t_end
    return sorted(set(points), reverse=True)


def restart_path(schedule, main_steps: int, restart: Restart | None) -> list[int]:
    """The timesteps the sampler visits, in order: the main ODE's descent with the restart loops spliced in at
    t_min. A step to a larger timestep is a jump forward in noise (no network call)."""
    main = [int(t) for t in samplers.sampling_timesteps(schedule, main_steps, "logsnr").numpy()]
    if restart is None:
        return main
    t_min, t_max = (int(t) for t in schedule.nearest_timesteps(np.log([restart.sigma_min, restart.sigma_max])))
    at = min(range(1, len(main) - 1), key=lambda j: abs(main[j] - t_min))  # neither the start nor t = 0
    t_min = main[at]
    if t_max <= t_min:
        raise ValueError(f"sigma_max {restart.sigma_max} falls at or below t_min = {t_min} on this schedule.")
    loop = logsnr_segment(schedule, t_max, t_min, restart.steps + 1)
    return main[: at + 1] + loop * restart.jumps + main[at + 1 :]


def forward_jump(schedule, x_t, t, t_next, noise):
    """x_{t_next} ~ q(x_{t_next} | x_t) for t_next > t: the forward process from t on (Ho et al. 2020, Eq. 2)."""
    ratio = schedule.alpha_bar_at(t_next) / schedule.alpha_bar_at(t)
    return tf.sqrt(ratio) * x_t + tf.sqrt(1.0 - ratio) * noise


def compile_restart_sampler(generator, path: list[int]):
    """f(seeds int64 [B]) -> uint8 images, following `path` with DPM-Solver++(2M) down and forward jumps up."""
    schedule = generator.schedule
    padded_path = tf.constant(path + [-1], tf.int32)  # -1 after the last timestep: return x0_hat there
    num_points = len(path)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def sample(seeds):
        denoise = samplers.make_denoiser(generator.network_output, schedule, generator.objective)
        image_shape = generator.image_shape
        batch_size = tf.shape(seeds)[0]

        def body(i, x_t, previous_pred_images, is_fresh):
            t, t_next = padded_path[i], padded_path[i + 1]

            def jump():
                noise = samplers.per_image_noise(seeds, i + 1, image_shape)
                return forward_jump(schedule, x_t, t, t_next, noise), previous_pred_images, tf.constant(True)

            def descend():
                pred_images, _ = denoise(x_t, tf.fill([batch_size], t))

                def ode_step():
                    return samplers.dpmpp_2m_step(schedule, x_t, pred_images, previous_pred_images, t, t_next,
                                                  padded_path[tf.maximum(i - 1, 0)], is_fresh,
                                                  tf.zeros_like(x_t), 0.0)

                return tf.cond(t_next >= 0, ode_step, lambda: pred_images), pred_images, tf.constant(False)

            return (i + 1, *tf.cond(t_next > t, jump, descend))

        x_T = samplers.per_image_noise(seeds, 0, image_shape)
        _, images, _, _ = tf.while_loop(lambda i, *_: i < num_points, body,
                                        (tf.constant(0), x_T, tf.zeros_like(x_T), tf.constant(True)))
        return samplers.to_uint8(images)

    return sample


def name_of(restart: Restart | None) -> str:
    if restart is None:
        return "restart_0"
    return f"restart_{restart.sigma_min:g}_{restart.sigma_max:g}_{restart.jumps}_{restart.steps}"


def main():
    parser = common.sampler_bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=Restart.parse, nargs="+", default=[None],
                        help="configurations: sigma_min:sigma_max:K:steps, or 0 for the plain ODE")
    parser.add_argument("--main_steps", type=int, default=20, help="network calls of the main ODE")
    args = common.parse_sampler_bench_args(parser)
    if args.main_steps < 3:  # a restart needs a main timestep between the first and t = 0
        parser.error(f"--main_steps must be at least 3, got {args.main_steps}.")

    def restart_samplers(generator):
        for restart in args.restarts:
            path = restart_path(generator.schedule, args.main_steps, restart)
            network_calls = sum(1 for t, t_next in zip(path, path[1:] + [-1]) if t_next < t)
            yield name_of(restart), network_calls, lambda path=path: compile_restart_sampler(generator, path)

    common.compare_samplers(args, restart_samplers)


if __name__ == "__main__":
    main()
