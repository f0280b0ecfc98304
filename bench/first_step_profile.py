"""Where the first training step's time goes: Python tracing (and which part of it) against the first execution.

    python bench/first_step_profile.py [--model cpu] [--precision mixed_bfloat16]

Profiles the first `fit()` step of a recipe's model (random images, no XLA) with cProfile and prints `key value`
lines, read from the profile's cumulative times:

    first_step_seconds          the whole first `fit()` of one step
    tracing_seconds             building the train function's graph in Python (`func_graph_from_py_func`)
    train_step_tracing_seconds  of which `DiffusionModel.train_step`
    optimizer_tracing_seconds   of which the optimizer's update (`BaseOptimizer.apply`)
    first_execution_seconds     running the new graph once: TensorFlow's graph optimisation, oneDNN's kernel set-up,
                                and the step itself
    second_step_seconds         the next one-step `fit()`: the step alone, for comparison
Run it alone on the machine.
"""

import argparse
import cProfile
import os
import pstats
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402  (puts the repository on sys.path)
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_ddpm.training import PRECISIONS, make_optimizer  # noqa: E402

# (key, file suffix, function name) of the profile entries whose cumulative time is printed.
PHASES = (
    ("tracing_seconds", "framework/func_graph.py", "func_graph_from_py_func"),
    ("train_step_tracing_seconds", "keras_ddpm/model.py", "train_step"),
    ("optimizer_tracing_seconds", "optimizers/base_optimizer.py", "apply"),
    ("first_execution_seconds", "eager/execute.py", "quick_execute"),
)


def cumulative_seconds(stats: pstats.Stats, file_suffix: str, function: str) -> float:
    """The largest cumulative time of a profiled function (the outermost call when it recurses)."""
    times = [entry[3] for (path, _, name), entry in stats.stats.items()
             if path.endswith(file_suffix) and name == function]
    return max(times, default=0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(common.RECIPES), default="cpu")
    parser.add_argument("--precision", choices=[p for p in PRECISIONS if p != "auto"], default="mixed_bfloat16")
    args = parser.parse_args()
    keras.mixed_precision.set_dtype_policy(args.precision)
    model_config, train_config = common.recipe_configs(args.model)
    keras.utils.set_random_seed(0)
    model = model_config.build()
    model.compile(optimizer=make_optimizer(train_config), jit_compile=False)
    images = tf.random.uniform([train_config.batch_size, *model.image_shape], -1.0, 1.0, seed=0)
    batches = tf.data.Dataset.from_tensors(images).repeat()

    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.runcall(model.fit, batches, epochs=1, steps_per_epoch=1, verbose=0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=1, verbose=0)
    second = time.perf_counter() - start

    stats = pstats.Stats(profile)
    print(f"model {args.model}\nprecision {args.precision}\nfirst_step_seconds {first:.1f}")
    for key, file_suffix, function in PHASES:
        print(f"{key} {cumulative_seconds(stats, file_suffix, function):.1f}")
    print(f"second_step_seconds {second:.2f}")


if __name__ == "__main__":
    main()
