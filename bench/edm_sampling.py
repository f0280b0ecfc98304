"""EDM's stochastic sampler with its churn's strength and band of noise levels as knobs, and whether fewer faces break.

    python bench/edm_sampling.py --model=savedmodel --configs 100:0 100:40 40:16:0.05:2 --grid_dir=$HOME/runs/edm \
        [--seed=64 --num_images=512 --data_dir=../shared/data/celeba]

DDPM with all 1,000 steps breaks about half as many of the shipped model's faces as its ODE sampler does, and
respaced DDPM, SDE-DPM-Solver++ and Restart sampling do not (REPORT.md 6.14 and 6.17). Karras et al. 2022
("Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 2) add noise in a chosen band of
noise levels and take Heun steps between; the library's `samplers.edm_loop` runs it (see its docstring), and
`--sampler=edm` uses it with the band `samplers.EDM_CHURN_SIGMAS` and gamma = eta (sqrt(2) - 1). Here both are
free: a configuration `N:S_churn[:S_tmin:S_tmax]` takes N levels (EDM's rho = 7 spacing, `"karras"`), the churn
gamma = min(S_churn / N, sqrt(2) - 1) for noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar) in
[S_tmin, S_tmax], and 2N - 1 network calls. The band defaults to EDM's ImageNet values, 0.05 to 50
(`samplers.EDM_IMAGENET_CHURN_SIGMAS`, the library's band until REPORT.md 6.23), so that the configurations in
REPORT.md keep their meaning. `N:0` is Heun's ODE sampler (EDM Algorithm 1). A trailing `:noclip` uses the
network's x0 estimate as EDM's denoiser D unclipped, as Karras et al. do; the library clips it to [-1, 1], as
DDPM's sampler does.

Each configuration draws `--num_images` samples from the seeds `--seed`, `--seed` + 1, ..., keeps the first 64 as
<grid_dir>/edm_<N>_<S_churn>_<S_tmin>_<S_tmax>[_noclip]_s<seed>.png and, from 128 images on, scores them against as many
held-out faces. Prints `key value` lines: floor_swd_mean, floor_face_fd, floor_face_landmark_fd (from 128 images),
and per configuration <name>_network_calls, _seconds, _swd_<level> for each pyramid level (_swd_32, _swd_16 at
32x32), _swd_mean, _face_rate, _face_fd, _face_landmark_fd.

On the shipped model, blind raters counted 3.2 broken faces per 64 with 100:40 (197 calls) and 2.2 with 100:100
(gamma capped, 199 calls), against 2.4 for DDPM-1000; weaker, narrower or fewer-level churn broke about as many as
the ODE or more (REPORT.md 6.18). Churn only for sigma in [0.05, 1] (100:100:0.05:1, the library's band since)
kept about as many faces whole and brought SWD from 1.45x the real-vs-real floor to 0.95x (REPORT.md 6.23).
"""

import argparse
import dataclasses

import numpy as np
import tensorflow as tf

import common

from keras_ddpm import samplers


@dataclasses.dataclass(frozen=True)
class Churn:
    """One configuration of EDM's stochastic sampler (Karras et al. 2022, Algorithm 2)."""

    steps: int  # N, the noise levels
    churn: float  # S_churn: gamma = min(S_churn / N, sqrt(2) - 1) inside the band
    sigma_tmin: float = samplers.EDM_IMAGENET_CHURN_SIGMAS[0]  # S_tmin
    sigma_tmax: float = samplers.EDM_IMAGENET_CHURN_SIGMAS[1]  # S_tmax
    clip: bool = True  # clip the denoiser's x0 estimate to [-1, 1], as the library's samplers do

    @classmethod
    def parse(cls, spec: str) -> "Churn":
        """`N:S_churn[:S_tmin:S_tmax][:noclip]`."""
        fields = spec.split(":")
        clip = fields[-1] != "noclip"
        fields = fields if clip else fields[:-1]
        try:
            if len(fields) not in (2, 4):
                raise ValueError
            config = cls(int(fields[0]), *(float(field) for field in fields[1:]), clip=clip)
        except ValueError:
            raise argparse.ArgumentTypeError(f"A configuration is N:S_churn[:S_tmin:S_tmax][:noclip] (e.g. 100:40, "
                                             f"40:16:0.05:2 or 100:40:noclip), got {spec!r}.") from None
        if config.steps < 2 or config.churn < 0 or not 0 <= config.sigma_tmin <= config.sigma_tmax:
            raise argparse.ArgumentTypeError(f"A configuration needs N >= 2, S_churn >= 0 and "
                                             f"0 <= S_tmin <= S_tmax, got {spec!r}.")
        return config

    @property
    def name(self) -> str:
        suffix = "" if self.clip else "_noclip"
        return f"edm_{self.steps}_{self.churn:g}_{self.sigma_tmin:g}_{self.sigma_tmax:g}{suffix}"

    @property
    def gamma(self) -> float:
        return min(self.churn / self.steps, np.sqrt(2.0) - 1.0)

    @property
    def network_calls(self) -> int:
        return 2 * self.steps - 1  # Heun's two calls a level, one for the last (to sigma = 0)


def compile_edm_sampler(generator, config: Churn):
    """f(seeds int64 [B]) -> uint8 images drawn with `config` by `samplers.edm_loop`."""
    schedule = generator.schedule
    levels = samplers.sampling_timesteps(schedule, config.steps, "karras")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def sample(seeds):
        denoise = samplers.make_denoiser(generator.network_output, schedule, generator.objective,
                                         clip_denoised=config.clip)
        images = samplers.edm_loop(denoise, schedule, seeds, generator.image_shape, config.network_calls, levels,
                                   config.gamma, (config.sigma_tmin, config.sigma_tmax))
        return samplers.to_uint8(images)

    return sample


def main():
    parser = common.sampler_bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Churn.parse, nargs="+", required=True,
                        help="configurations N:S_churn[:S_tmin:S_tmax][:noclip]; N:0 is Heun's ODE sampler")
    args = common.parse_sampler_bench_args(parser)
    common.compare_samplers(args, lambda generator: (
        (config.name, config.network_calls, lambda config=config: compile_edm_sampler(generator, config))
        for config in args.configs))


if __name__ == "__main__":
    main()
