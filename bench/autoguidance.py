"""Autoguidance: guide a model with a weaker model of the same task, and see whether fewer faces break.

    python bench/autoguidance.py --model=savedmodel --guide_model=$HOME/runs/celeba32_guide_w16 \
        --guidance 1 2 3 --grid_dir=$HOME/runs/autoguidance [--num_images=512 --data_dir=../shared/data/celeba]
    python bench/autoguidance.py --model=$HOME/runs/celeba64_minsnr --checkpoint_step=6000 \
        --guide_checkpoint_step=2000 --guidance 1 2 3 --grid_dir=$HOME/runs/autoguidance64

Karras et al. (2024, "Guiding a Diffusion Model with a Bad Version of Itself") guide a denoiser D1 with a weaker
one D0 of the same task (a smaller network, trained for less time) instead of with an unconditional model:

    D_w(x; t) = D0(x; t) + w (D1(x; t) - D0(x; t)),

w = 1 being D1 alone (`samplers.guide`, which classifier-free guidance uses too). Both objectives make x0_hat an
affine function of the network output whose x_t term does not depend on the network, so guiding the raw outputs
(epsilon or v) guides the unclipped x0_hat exactly; the denoiser clips after guidance, as for one network. Each
guided step costs two network calls (w = 1 costs one and draws the model's own images).

Each guidance scale draws `--num_images` samples from the seeds 0, 1, ... with the model's sampler, steps and eta
(an export's own, DDIM-50 for a run directory, or --sampler/--steps/--eta), keeps the first 64 as
<grid_dir>/guidance_<w>.png and, from 128 images on, scores them against as many held-out faces. Unconditional
models only. Prints `key value` lines:

    model_step, guide_step, sampler, steps, eta, precision
    floor_swd_mean, floor_face_fd, floor_face_landmark_fd   as many training faces against the held-out ones
    guidance_<w>_swd_mean, _face_rate, _face_fd, _face_landmark_fd, _seconds
"""

import argparse
import pathlib
import time

import numpy as np
import tensorflow as tf

import common

from keras_ddpm import generation, samplers
from keras_ddpm.generation import generate_in_batches
from keras_ddpm.runs import load_generator, sampling_precision


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, required=True, help="the model (D1): export or run directory")
    parser.add_argument("--checkpoint_step", type=int, default=None, help="a run's checkpoint (default: the newest)")
    parser.add_argument("--guide_model", type=pathlib.Path, default=None,
                        help="the guide (D0): export or run directory; default: --model, at --guide_checkpoint_step")
    parser.add_argument("--guide_checkpoint_step", type=int, default=None, help="the guide's checkpoint")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0], help="scales w (1: no guidance)")
    parser.add_argument("--sampler", default=None, choices=samplers.SAMPLERS, help="default: the model's")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's (for its sampler)")
    parser.add_argument("--eta", type=float, default=None, help="default: the model's")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--precision", default="auto", help="dtype policy of both networks (auto: an export's own, "
                        "else bf16 where native)")
    parser.add_argument("--data_dir", default=None, help="CelebA folder (default: CELEBA_DIR)")
    parser.add_argument("--grid_dir", type=pathlib.Path, required=True, help="where the 64-image grids go")
    args = parser.parse_args()
    if args.guide_model is None and args.guide_checkpoint_step is None:
        parser.error("Name the guide: --guide_model, --guide_checkpoint_step or both (the model cannot guide itself).")
    if args.num_images < 1 or args.batch_size < 1:
        parser.error(f"--num_images and --batch_size must be at least 1, got {args.num_images} and {args.batch_size}.")
    return args


def denoising_task(generator) -> tuple:
    """What a guide must share with its model: image shape, noise schedule, what the network predicts and labels."""
    return generator.image_shape, generator.schedule.get_config(), generator.objective, generator.num_classes


def load_pair(args):
    """The model and its guide, under one dtype policy; exits with a message when they cannot be paired."""
    policy, _ = sampling_precision(args.model, args.precision)
    model = load_generator(args.model, args.checkpoint_step, policy)
    guide = load_generator(args.guide_model or args.model, args.guide_checkpoint_step, policy)
    if model.num_classes:
        raise SystemExit(f"{args.model} is a conditional model; this benchmark guides unconditional ones.")
    if denoising_task(guide) != denoising_task(model):
        raise SystemExit(f"The guide must share the model's image shape, noise schedule, objective and labels: the "
                         f"model has {denoising_task(model)}, the guide {denoising_task(guide)}.")
    return model, guide, policy


def compile_autoguided(model, guide, sampler: str, steps: int, eta: float):
    """f(seeds int64 [B], guidance) -> uint8 images, one trace for every batch and scale."""

    def network_output(inputs, guidance):
        strong = model.network_output(inputs)

        def guided():
            return samplers.guide(strong, guide.network_output(inputs), guidance)

        return tf.cond(guidance == 1.0, lambda: strong, guided)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.float32)])
    def sample(seeds, guidance):
        denoise = samplers.make_denoiser(lambda inputs: network_output(inputs, guidance), model.schedule,
                                         model.objective)
        images = samplers.sample(denoise, model.schedule, seeds, model.image_shape, steps, sampler, eta,
                                 churn_sigmas=model.churn_sigmas)
        return samplers.to_uint8(images)

    return sample


class AutoguidedGenerator:
    """What `generate_in_batches` needs of a `Generator`: the model's images, guided by `guide`."""

    def __init__(self, model, guide, sampler: str, steps: int, eta: float):
        self.max_batch_size = min([g.max_batch_size for g in (model, guide) if g.max_batch_size], default=None)
        self._sample = compile_autoguided(model, guide, sampler, steps, eta)

    def generate(self, seeds, labels=None, guidance: float = 1.0) -> np.ndarray:
        return self._sample(tf.constant(seeds, tf.int64), guidance).numpy()


def main():
    args = parse_args()
    model, guide, policy = load_pair(args)
    sampler, steps, eta = generation.sampling_defaults(model, args.sampler, args.steps, args.eta)
    generation.check_request(model, 1, steps=steps, sampler=sampler, eta=eta)  # steps and eta in range
    autoguided = AutoguidedGenerator(model, guide, sampler, steps, eta)
    print(f"model_step {model.metadata.get('training_steps')}\nguide_step {guide.metadata.get('training_steps')}\n"
          f"sampler {sampler}\nsteps {steps}\neta {eta:g}\nprecision {policy}", flush=True)

    report = common.SampleReport(model.image_shape[0], args.num_images, args.grid_dir, args.data_dir)
    for guidance in args.guidance:
        start = time.perf_counter()
        images = generate_in_batches(autoguided, args.num_images, args.batch_size, verbose=False, guidance=guidance)
        report.add(f"guidance_{guidance:g}", images, time.perf_counter() - start)


if __name__ == "__main__":
    main()
