"""GroupNorm + swish, forward and backward, with and without XLA: is fusing them worth it on this CPU?

    python bench/norm_swish.py [--precision mixed_bfloat16] [--repeats 30]

`bench/train_profile.py` puts most of a CPU training step's non-convolution time in the element-wise and
reduction ops of GroupNorm and swish. XLA fuses them into a few loops; TensorFlow's graph runs them op by op.
This times `swish(group_normalization(x))` and its gradients as a `ResidualBlock` computes them, for the CPU
recipe's activation shapes (batch 32, 8 groups), once as a plain `tf.function` and once with `jit_compile`.
Prints, per shape `<h>x<w>x<c>`:

    <shape>_first_call_seconds / <shape>_xla_first_call_seconds   tracing (and XLA compiling) included
    <shape>_ms / <shape>_xla_ms                                     median of `--repeats` calls
    <shape>_xla_speedup                                             ms / xla_ms
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402  (puts the repository on sys.path)
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_ddpm.layers import group_normalization  # noqa: E402

SHAPES = [(32, 32, 32), (32, 32, 64), (16, 16, 64), (8, 8, 64)]  # (height, width, channels) in the CPU recipe


def norm_swish_gradients(batch_shape, norm_groups: int, jit_compile: bool):
    """A compiled function: the gradients of sum(swish(GroupNorm(x))) with respect to x, gamma and beta."""
    norm = group_normalization(batch_shape[-1], norm_groups)
    norm.build(batch_shape)

    @tf.function(jit_compile=jit_compile)
    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(keras.ops.silu(norm(x)), tf.float32))
        return tape.gradient(loss, [x, *norm.trainable_variables])

    return gradients


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="mixed_bfloat16")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--norm_groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    keras.mixed_precision.set_dtype_policy(args.precision)
    compute_dtype = keras.mixed_precision.dtype_policy().compute_dtype

    for height, width, channels in SHAPES:
        shape = [args.batch_size, height, width, channels]
        x = tf.cast(tf.random.normal(shape, seed=0), compute_dtype)
        key = f"{height}x{width}x{channels}"
        milliseconds = {}
        for suffix, jit_compile in (("", False), ("_xla", True)):
            gradients = norm_swish_gradients(shape, args.norm_groups, jit_compile)
            start = time.perf_counter()
            [g.numpy() for g in gradients(x)]
            print(f"{key}{suffix}_first_call_seconds {time.perf_counter() - start:.2f}")
            milliseconds[suffix] = 1000 * common.median_seconds(lambda: [g.numpy() for g in gradients(x)], args.repeats)
            print(f"{key}{suffix}_ms {milliseconds[suffix]:.2f}")
        print(f"{key}_xla_speedup {milliseconds[''] / milliseconds['_xla']:.2f}")


if __name__ == "__main__":
    main()
