"""Where a training step of the CPU recipe spends its time: TensorFlow op time grouped by op type.

    python bench/train_profile.py [--steps 5] [--xla] [--precision auto]

Traces `--steps` steady-state optimizer steps of `flags/celeba32_cpu.flags`'s model with the TensorFlow
profiler, reads the host trace (the XPlane protobuf that TensorBoard's profile plugin reads too) and sums the
duration of every executed op by its type. Prints `op_<type>_pct <share of summed op time>` for the largest types
(summed over both cores' threads), then `op_conv_pct`, the share of convolutions (forward and both backward
kernels): the part of a step that runs near the matmul peak. What is not convolution (GroupNorm, swish, additions,
the optimizer) is memory-bound work that bounds the achieved fraction of peak FLOP/s.
"""

import argparse
import collections
import os
import pathlib
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

from keras_ddpm.precision import resolve_precision  # noqa: E402
from keras_ddpm.training import make_optimizer  # noqa: E402

# Trace events that wrap other events (a whole function or executor run), not ops of their own.
WRAPPER_TYPES = {"Process"}


def op_seconds_by_type(trace_dir: pathlib.Path) -> collections.Counter:
    """Summed duration per TensorFlow op type over the host plane of the trace in `trace_dir`."""
    totals = collections.Counter()
    for path in trace_dir.rglob("*.xplane.pb"):
        space = xplane_pb2.XSpace.FromString(path.read_bytes())
        for plane in space.planes:
            if not plane.name.startswith("/host:CPU"):
                continue
            for line in plane.lines:
                if line.name != "tf_Compute" and not line.name.startswith("tf_"):  # TF's op-execution threads
                    continue
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name  # "scope/op_name:OpType"
                    op_type = name.rsplit(":", 1)[1] if ":" in name else None
                    if op_type and op_type not in WRAPPER_TYPES:
                        totals[op_type] += event.duration_ps * 1e-12
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--xla", action="store_true", help="compile the step (its ops then show as XLA clusters)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--precision", default=None, help="dtype policy or auto (default: the recipe's, as train.py)")
    args = parser.parse_args()

    model_config, train_config = common.recipe_configs("cpu")
    precision, reason = resolve_precision(args.precision or train_config.precision)
    keras.mixed_precision.set_dtype_policy(precision)
    print(f"precision {precision}  # {reason}")
    keras.utils.set_random_seed(0)
    model = model_config.build()
    model.compile(optimizer=make_optimizer(train_config), jit_compile=args.xla)
    images = tf.random.uniform([train_config.batch_size, *model.image_shape], -1.0, 1.0, seed=0)
    batches = tf.data.Dataset.from_tensors(images).repeat()
    model.fit(batches, epochs=1, steps_per_epoch=2, verbose=0)  # trace and warm up outside the profile

    with tempfile.TemporaryDirectory() as folder:
        tf.profiler.experimental.start(folder)
        model.fit(batches, epochs=1, steps_per_epoch=args.steps, verbose=0)
        tf.profiler.experimental.stop()
        totals = op_seconds_by_type(pathlib.Path(folder))
    if not totals:
        raise SystemExit("The trace holds no TensorFlow op events (with --xla the step runs as one cluster).")
    total = sum(totals.values())
    print(f"profiled_steps {args.steps}")
    print(f"op_seconds_per_step {total / args.steps:.3f}")
    for op_type, seconds in totals.most_common(args.top):
        print(f"op_{op_type}_pct {100 * seconds / total:.1f}")
    convolution = sum(seconds for op_type, seconds in totals.items() if "Conv2D" in op_type)  # oneDNN's too
    print(f"op_conv_pct {100 * convolution / total:.1f}")


if __name__ == "__main__":
    main()
