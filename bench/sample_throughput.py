"""Sampling speed of `DiffusionModel.generate()` next to the bare network time it cannot beat.

    python bench/sample_throughput.py [--model cpu] [--batch_size 64] [--steps 50]
    python bench/sample_throughput.py --quick          # a tiny request: checks that the script runs

A DDIM sample of S steps costs S network forwards; everything else (the `tf.while_loop`, the update rule,
per-image noise, the uint8 conversion, the trip through Python) is the sampler's overhead. The model has
random weights: speed does not depend on them. Prints `key value` lines:

    first_call_seconds        the first `generate()`: tracing the sampling function, then sampling
    second_call_seconds       the same request with other seeds (must not trace again: see `retraces`)
    retraces                  traces of the sampling function during the second and timed calls (should be 0)
    small_request_*           first and second call of a 1-image, 2-step request on a fresh model, where
                              tracing dominates: the speed-up a user sees once the function is traced
    sample_seconds            median of the timed calls, each with new seeds
    sample_img_per_s
    forward_ms                one forward of the EMA network on the same batch, called as the sampler calls it
                              (inside a `tf.function`, no XLA)
    forward_xla_ms            the same forward compiled with XLA, for comparison
    bare_network_seconds      steps x forward_ms
    peak_rss_mb
    sample_overhead_pct       100 x (sample_seconds / bare_network_seconds - 1) -- the headline
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402  (puts the repository on sys.path)
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_ddpm import samplers  # noqa: E402


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def forward_seconds(network, batch_size: int, image_shape, jit_compile: bool, repeats: int) -> float:
    """Median time of one `network([x_t, t], training=False)` on a batch, warm, as one `tf.function` call."""

    @tf.function(jit_compile=jit_compile)
    def forward(noisy_images, timesteps):
        return network([noisy_images, timesteps], training=False)

    noisy_images = tf.random.normal([batch_size, *image_shape], seed=0)
    timesteps = tf.fill([batch_size], 500)
    run = lambda: forward(noisy_images, timesteps).numpy()  # noqa: E731  (.numpy() waits for the result)
    run()  # tracing (and compilation)
    return common.median_seconds(run, repeats)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cpu", "gpu_recipe"], default="cpu", help="which recipe's model")
    parser.add_argument("--sampler", choices=samplers.SAMPLERS, default="ddim")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: > 0 draws per-image noise every step")
    parser.add_argument("--repeats", type=int, default=3, help="timed sampling calls after the first two")
    parser.add_argument("--forward_repeats", type=int, default=10, help="timed bare forwards")
    parser.add_argument("--quick", action="store_true", help="batch 8, 5 steps, 1 repeat: checks that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.repeats, args.forward_repeats = 8, 5, 1, 3
    return args


def main():
    args = parse_args()
    model_config, _ = common.recipe_configs(args.model)
    keras.utils.set_random_seed(0)
    model = model_config.build()
    request = dict(steps=args.steps, sampler=args.sampler, eta=args.eta)
    print(f"model {args.model}")
    print(f"image_size {model_config.image_size}")
    print(f"sampler {args.sampler}")
    print(f"eta {args.eta}")
    print(f"sample_batch_size {args.batch_size}")
    print(f"sample_steps {args.steps}", flush=True)

    # New seeds every call: seeds are an input of the compiled function, so none of these calls may trace.
    first_seconds, _ = timed(lambda: model.generate(args.batch_size, seed=0, **request))
    sample_function = model.sample_function(args.sampler)
    traces_after_first = sample_function.experimental_get_tracing_count()
    second_seconds, _ = timed(lambda: model.generate(args.batch_size, seed=args.batch_size, **request))
    print(f"first_call_seconds {first_seconds:.2f}")
    print(f"second_call_seconds {second_seconds:.2f}")
    print(f"first_over_second {first_seconds / second_seconds:.2f}", flush=True)

    next_seed = iter(range(2 * args.batch_size, 10**9, args.batch_size))
    sample_seconds = common.median_seconds(
        lambda: model.generate(args.batch_size, seed=next(next_seed), **request), args.repeats
    )
    print(f"retraces {sample_function.experimental_get_tracing_count() - traces_after_first}")
    print(f"sample_seconds {sample_seconds:.2f}")
    print(f"sample_img_per_s {args.batch_size / sample_seconds:.2f}", flush=True)

    network, image_shape = model.ema_network, model.image_shape
    plain = forward_seconds(network, args.batch_size, image_shape, False, args.forward_repeats)
    compiled = forward_seconds(network, args.batch_size, image_shape, True, args.forward_repeats)
    bare_network_seconds = args.steps * plain
    print(f"forward_ms {1000 * plain:.1f}")
    print(f"forward_xla_ms {1000 * compiled:.1f}")
    print(f"bare_network_seconds {bare_network_seconds:.2f}", flush=True)

    # Tracing cost as a user meets it: a fresh model's first request, then the next one with another seed.
    fresh_model = model_config.build()
    small_first, _ = timed(lambda: fresh_model.generate(1, seed=0, steps=2, sampler=args.sampler))
    small_second, _ = timed(lambda: fresh_model.generate(1, seed=1, steps=2, sampler=args.sampler))
    print(f"small_request_first_call_seconds {small_first:.2f}")
    print(f"small_request_second_call_seconds {small_second:.3f}")
    print(f"small_request_first_over_second {small_first / small_second:.1f}")

    print(f"peak_rss_mb {common.peak_rss_mb():.0f}")
    print(f"sample_overhead_pct {100 * (sample_seconds / bare_network_seconds - 1):.1f}")


if __name__ == "__main__":
    main()
