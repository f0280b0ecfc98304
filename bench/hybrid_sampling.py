"""Where DDPM-1000's whole faces come from: DDPM's every-timestep ancestral steps in one band of noise levels only.

    python bench/hybrid_sampling.py --model=savedmodel --bands none 0:1 1:inf --grid_dir=$HOME/runs/hybrid \
        [--seed=64 --num_images=512 --data_dir=../shared/data/celeba]

Ancestral DDPM with all 1,000 steps breaks about half as many of the shipped model's faces as its ODE sampler
(DPM-Solver++-20), and neither DDPM with 250 or 500 steps nor a few large jumps of noise (Restart sampling, EDM's
churn) does (REPORT.md 6.14, 6.17, 6.18). Its many small noisy steps mend something, at 50 times the ODE's cost. This
benchmark asks in which noise levels: a band `sigma_lo:sigma_hi` of EDM noise levels
sigma = sqrt((1 - alpha_bar) / alpha_bar) (`inf` for the top) is sampled with DDPM's step (Ho et al. 2020,
Algorithm 2) at every timestep inside it, and the rest with the ODE (DPM-Solver++(2M) on `--main_steps` log-SNR
spaced timesteps, first order again after a DDPM stretch). `none` is the plain ODE, the library's
`samplers.sample(..., "dpm++")` images; `0:inf` is DDPM-1000, the library's `samplers.sample(..., "ddpm")` images
(both bit for bit, `tests/test_hybrid_sampling.py`). The network calls are the DDPM band's timesteps plus the ODE's.

Each band draws `--num_images` samples from the seeds `--seed`, `--seed` + 1, ..., keeps the first 64 as
<grid_dir>/hybrid_<band>_s<seed>.png and, from 128 images on, scores them against as many held-out faces. Prints
`key value` lines: floor_swd_mean, floor_face_fd, floor_face_landmark_fd (from 128 images), and per band
<name>_network_calls, _seconds, _swd_mean, _face_rate, _face_fd, _face_landmark_fd.
"""

import argparse

import numpy as np
import tensorflow as tf

import common

from keras_ddpm import samplers

Band = tuple[float, float] | None  # (sigma_lo, sigma_hi) sampled by DDPM, or None for the plain ODE


def parse_band(spec: str) -> Band:
    """`sigma_lo:sigma_hi` (sigma_hi may be `inf`), or `none`."""
    if spec == "none":
        return None
    try:
        sigma_lo, sigma_hi = (float(field) for field in spec.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"A band is sigma_lo:sigma_hi (e.g. 0:1 or 1:inf) or none, "
                                         f"got {spec!r}.") from None
    if not 0 <= sigma_lo < sigma_hi:
        raise argparse.ArgumentTypeError(f"A band needs 0 <= sigma_lo < sigma_hi, got {spec!r}.")
    return sigma_lo, sigma_hi


def hybrid_path(schedule, main_steps: int, band: Band) -> tuple[list[int], list[bool]]:
    """The timesteps visited, from T - 1 down to 0 (every timestep whose sigma lies in the band, and the ODE's
    log-SNR spaced timesteps elsewhere), and for each whether its step is DDPM's: a step between two timesteps of
    the band. The steps into and out of the band are the ODE's, since one large DDPM step (with its posterior
    variance, beta tilde) loses variance."""
    ode = [int(t) for t in samplers.sampling_timesteps(schedule, main_steps, "logsnr").numpy()]
    if band is None:
        return ode, [False] * len(ode)
    sigma = samplers.edm_sigma(schedule, tf.range(schedule.num_timesteps)).numpy()
    in_band = (band[0] <= sigma) & (sigma <= band[1])
    path = sorted(set(ode) | set(np.flatnonzero(in_band).tolist()), reverse=True)
    return path, [bool(in_band[t] and t_prev >= 0 and in_band[t_prev]) for t, t_prev in zip(path, path[1:] + [-1])]


def compile_hybrid_sampler(generator, path: list[int], is_ddpm: list[bool]):
    """f(seeds int64 [B]) -> uint8 images, following `path` with DDPM steps where `is_ddpm`, DPM-Solver++ elsewhere."""
    schedule = generator.schedule
    padded_path = tf.constant(path + [-1], tf.int32)  # -1 after the last timestep: return x0_hat there
    step_is_ddpm = tf.constant(is_ddpm)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def sample(seeds):
        denoise = samplers.make_denoiser(generator.network_output, schedule, generator.objective)
        batch_size = tf.shape(seeds)[0]

        def body(i, x_t, previous_pred_images, is_fresh):
            t, t_prev = padded_path[i], padded_path[i + 1]
            pred_images, _ = denoise(x_t, tf.fill([batch_size], t))

            def ddpm():  # the library draws step i's noise with counter i + 1, as here
                noise = samplers.per_image_noise(seeds, i + 1, generator.image_shape)
                return samplers.ddpm_step(schedule, x_t, pred_images, t, t_prev, noise), tf.constant(True)

            def ode():
                x_prev = samplers.dpmpp_2m_step(schedule, x_t, pred_images, previous_pred_images, t, t_prev,
                                                padded_path[tf.maximum(i - 1, 0)], is_fresh, tf.zeros_like(x_t), 0.0)
                return x_prev, tf.constant(False)

            def step():
                return tf.cond(step_is_ddpm[i], ddpm, ode)

            x_prev, is_fresh = tf.cond(t_prev >= 0, step, lambda: (pred_images, tf.constant(False)))
            return i + 1, x_prev, pred_images, is_fresh

        x_T = samplers.per_image_noise(seeds, 0, generator.image_shape)
        _, images, _, _ = tf.while_loop(lambda i, *_: i < len(path), body,
                                        (tf.constant(0), x_T, tf.zeros_like(x_T), tf.constant(True)))
        return samplers.to_uint8(images)

    return sample


def name_of(band: Band) -> str:
    return "hybrid_none" if band is None else f"hybrid_{band[0]:g}_{band[1]:g}"


def main():
    parser = common.sampler_bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--bands", type=parse_band, nargs="+", required=True,
                        help="bands sigma_lo:sigma_hi sampled by DDPM (inf for the top), or none for the plain ODE")
    parser.add_argument("--main_steps", type=int, default=20, help="timesteps of the ODE outside the band")
    args = common.parse_sampler_bench_args(parser)
    if args.main_steps < 2:
        parser.error(f"--main_steps must be at least 2, got {args.main_steps}.")

    def hybrid_samplers(generator):
        for band in args.bands:
            path, is_ddpm = hybrid_path(generator.schedule, args.main_steps, band)
            yield name_of(band), len(path), lambda path=path, is_ddpm=is_ddpm: compile_hybrid_sampler(
                generator, path, is_ddpm)

    common.compare_samplers(args, hybrid_samplers)


if __name__ == "__main__":
    main()
