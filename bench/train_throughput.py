"""Training speed of the recipe models on this machine, as a fraction of its own fp32 matmul peak.

    python bench/train_throughput.py [--model both] [--precisions float32,mixed_float16,mixed_bfloat16] [--xla both]
    python bench/train_throughput.py --quick          # a few steps of everything: checks that the script runs

For the CPU recipe (`flags/celeba32_cpu.flags`, 32x32) and the GPU recipe's model (`celeba.flags`, 64x64, at a
small batch), with and without XLA and at each precision, it times `fit()` on a fixed in-memory batch (so the
input pipeline plays no part; see bench/data_throughput.py for that) and prints `key value` lines:

    <model>_forward_flops_per_image         FLOPs of one network forward, counted on the graph by the TF profiler
    <model>_train_flops_per_image           FLOPs of forward + backward (loss and gradients), counted the same way;
                                            the optimizer and EMA updates (~20 FLOPs per parameter per step) are not
    <model>_<precision>_<xla|noxla>_first_step_seconds   the first step: tracing (and XLA compilation)
    <model>_<precision>_<xla|noxla>_ms_per_step          steady-state time of one optimizer step through fit()
    <model>_<precision>_<xla|noxla>_cores_used           process CPU time over wall time in those steps
    <model>_<precision>_<xla|noxla>_steal_cores          cores the hypervisor took from this VM in those steps
    <model>_<precision>_<xla|noxla>_img_per_s
    <model>_<precision>_<xla|noxla>_gflops               train_flops_per_image x img_per_s
    matmul_peak_gflops                      best rate of a warm N x N fp32 `tf.matmul` in this process, timed
                                            before and after the training runs (matmul_gflops_before/_after)
    <model>_<precision>_<xla|noxla>_peak_fraction        gflops over matmul_peak_gflops
    peak_rss_mb
    cpu_auto_precision                      what `--precision=auto` picks on this machine (and why, as a comment)
    cpu_auto_speedup_vs_float32             img/s of the CPU recipe at auto over img/s at float32, same XLA setting
    cpu_auto_first_step_seconds             the CPU recipe's first step at auto
    train_peak_fraction                     the CPU recipe at its own settings -- the headline

A multiply-add counts as 2 FLOPs, in the profiler's counts and in the matmul peak alike. Mixed precision runs
the same model FLOPs; its fraction is still taken of the fp32 peak.
"""

import argparse
import dataclasses
import gc
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402  (puts the repository on sys.path)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.framework import graph_util, ops  # noqa: E402  (the profiler's FLOP registry)
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2  # noqa: E402

from keras_ddpm.precision import resolve_precision  # noqa: E402
from keras_ddpm.training import make_optimizer  # noqa: E402

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
SMALL_CPU_BATCH = 8  # the GPU recipe trains at 128; on a CPU a few images per step are enough to time it


def _einsum_flops(graph, node):
    """FLOPs of a two-operand Einsum (Keras' MultiHeadAttention uses them): 2 x the product of all index sizes.

    The TF profiler has no count for Einsum and would leave attention out.
    """
    equation = node.attr["equation"].s.decode().replace(" ", "")
    input_terms = equation.split("->")[0].split(",")
    index_sizes = {}
    for term, name in zip(input_terms, node.input):
        shape = graph_util.tensor_shape_from_node_def_name(graph, name)
        shape.assert_is_fully_defined()
        dims = shape.as_list()
        if "..." in term:  # name the broadcast dimensions by their distance from the ellipsis' right end
            head, tail = term.split("...")
            broadcast = len(dims) - len(head) - len(tail)
            term = head + "".join(chr(0x100 + broadcast - i) for i in range(broadcast)) + tail
        for index, size in zip(term, dims):
            index_sizes[index] = max(index_sizes.get(index, 1), size)
    return ops.OpStats("flops", 2 * int(np.prod(list(index_sizes.values()))))


try:
    ops.RegisterStatistics("Einsum", "flops")(_einsum_flops)
except KeyError:  # a later TensorFlow counts Einsum itself
    pass


def count_flops(function: tf.types.experimental.ConcreteFunction) -> int:
    """Float operations of one call of `function`, counted by the TF profiler on its frozen graph."""
    frozen = convert_variables_to_constants_v2(function)
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    return tf.compat.v1.profiler.profile(graph=frozen.graph, cmd="op", options=options).total_float_ops


def model_flops_per_image(model, batch_size: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image of `model`'s network, at a fixed batch size.

    The backward graph is the gradient of the training loss with respect to the trainable weights, the
    computation `DiffusionModel.train_step` runs before the optimizer update.
    """
    network = model.network
    image_spec = tf.TensorSpec([batch_size, *model.image_shape], tf.float32)

    @tf.function(input_signature=[image_spec, tf.TensorSpec([batch_size], tf.int32)])
    def forward(noisy_images, timesteps):
        return network([noisy_images, timesteps], training=True)

    @tf.function(input_signature=[image_spec])
    def loss_gradients(images):
        with tf.GradientTape() as tape:
            loss = model.diffusion_loss(network, images, None, training=True)
        return tape.gradient(loss, network.trainable_weights)

    forward_flops = count_flops(forward.get_concrete_function())
    train_flops = count_flops(loss_gradients.get_concrete_function())
    return forward_flops / batch_size, train_flops / batch_size


def matmul_peak_gflops(size: int, repeats: int) -> float:
    """Best GFLOP/s of a warm `size` x `size` fp32 matmul (2 size^3 FLOPs), the machine's practical peak."""
    a = tf.random.uniform([size, size])
    b = tf.random.uniform([size, size])
    tf.matmul(a, b).numpy()  # warm-up: thread pools, oneDNN primitives
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.matmul(a, b).numpy()  # .numpy() waits for the result
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / min(seconds) / 1e9


def time_training(model_config, train_config, batch_size, precision, xla, warmup_steps, steps, steps_per_execution):
    """(first step seconds, steady seconds per step, cores used, cores stolen) of `fit()` for one configuration.

    Cores used (process CPU time over wall time) tells a step slowed by the machine from one that leaves a core idle;
    cores stolen (/proc/stat's steal time over wall time) tells whether the host took them.
    """
    keras.backend.clear_session()
    gc.collect()  # free the previous configuration's model before building the next
    keras.mixed_precision.set_dtype_policy(precision)
    keras.utils.set_random_seed(0)
    try:
        model = model_config.build()
        model.compile(
            optimizer=make_optimizer(train_config), jit_compile=xla, steps_per_execution=steps_per_execution
        )
        images = tf.random.uniform([batch_size, *model.image_shape], -1.0, 1.0, seed=0)
        batches = tf.data.Dataset.from_tensors(images).repeat()

        def run(num_steps):
            start, cpu_start, steal_start = time.perf_counter(), common.cpu_seconds(), common.steal_seconds()
            model.fit(batches, epochs=1, steps_per_epoch=num_steps, shuffle=False, verbose=0)
            wall = time.perf_counter() - start
            return wall, (common.cpu_seconds() - cpu_start) / wall, (common.steal_seconds() - steal_start) / wall

        first_step_seconds, _, _ = run(steps_per_execution)  # traces (and compiles) the train step
        if warmup_steps:
            run(warmup_steps)
        seconds, cores_used, steal_cores = run(steps)
        return first_step_seconds, seconds / steps, cores_used, steal_cores
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*common.RECIPES, "both"], default="both", help="both: cpu and gpu_recipe")
    parser.add_argument("--batch_size", type=int, help=f"default: the CPU recipe's 32; {SMALL_CPU_BATCH} for the GPU recipe")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps after the first one")
    parser.add_argument("--steps_per_execution", type=int, default=1, help="steps per tf.function call in fit()")
    parser.add_argument("--precisions", default="float32,mixed_float16,mixed_bfloat16",
                        help=f"comma-separated, from {PRECISIONS}")
    parser.add_argument("--xla", choices=["both", "on", "off"], default="both")
    parser.add_argument("--matmul_size", type=int, default=4096)
    parser.add_argument("--matmul_repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 timed steps, a 2048 matmul: checks that the script runs")
    args = parser.parse_args()
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    # The auto keys compare what auto picks with float32, so both are always measured.
    auto_precision, _ = resolve_precision("auto")
    args.precisions += [p for p in ("float32", auto_precision) if p not in args.precisions]
    unknown = set(args.precisions) - set(PRECISIONS)
    if unknown or not args.precisions:
        parser.error(f"--precisions takes a comma-separated list from {PRECISIONS}, got {sorted(unknown) or 'none'}.")
    if args.quick:
        args.steps, args.warmup_steps, args.matmul_size, args.matmul_repeats = 2, 0, 2048, 2
    if args.steps % args.steps_per_execution:
        parser.error("--steps must be a multiple of --steps_per_execution.")
    return args


def print_auto_precision(timings, xla_settings):
    """The CPU recipe at `--precision=auto` against float32, at the recipe's XLA setting if it was measured."""
    precision, reason = resolve_precision("auto")
    _, cpu_train_config = common.recipe_configs("cpu")
    xla = cpu_train_config.jit_compile if cpu_train_config.jit_compile in xla_settings else xla_settings[0]
    first_step_seconds, images_per_second = timings["cpu", precision, xla]
    _, float32_images_per_second = timings["cpu", "float32", xla]
    print(f"# {reason}")
    print(f"cpu_auto_precision {precision}")
    print(f"cpu_auto_xla {'on' if xla else 'off'}")
    print(f"cpu_auto_speedup_vs_float32 {images_per_second / float32_images_per_second:.2f}")
    print(f"cpu_auto_first_step_seconds {first_step_seconds:.1f}")


def main():
    args = parse_args()
    models = ["cpu", "gpu_recipe"] if args.model == "both" else [args.model]
    xla_settings = {"both": [True, False], "on": [True], "off": [False]}[args.xla]

    # The peak is measured before and after the training runs and the better kept: a shared or throttling
    # machine shows up as a gap between the two.
    gflops_before = matmul_peak_gflops(args.matmul_size, args.matmul_repeats)
    print(f"matmul_size {args.matmul_size}")
    print(f"matmul_gflops_before {gflops_before:.1f}", flush=True)

    achieved = {}  # (model, precision, xla) -> achieved GFLOP/s
    timings = {}  # (model, precision, xla) -> (first step seconds, images per second)
    for name in models:
        model_config, train_config = common.recipe_configs(name)
        batch_size = args.batch_size or (SMALL_CPU_BATCH if name == "gpu_recipe" else train_config.batch_size)
        print(f"{name}_image_size {model_config.image_size}")
        print(f"{name}_batch_size {batch_size}", flush=True)
        for precision in args.precisions:
            for xla in xla_settings:
                key = f"{name}_{precision}_{'xla' if xla else 'noxla'}"
                first_step_seconds, seconds_per_step, cores_used, steal_cores = time_training(
                    model_config, train_config, batch_size, precision, xla,
                    args.warmup_steps, args.steps, args.steps_per_execution,
                )
                timings[name, precision, xla] = first_step_seconds, batch_size / seconds_per_step
                print(f"{key}_first_step_seconds {first_step_seconds:.1f}")
                print(f"{key}_ms_per_step {1000 * seconds_per_step:.1f}")
                print(f"{key}_cores_used {cores_used:.2f}")
                print(f"{key}_steal_cores {steal_cores:.2f}")
                print(f"{key}_img_per_s {batch_size / seconds_per_step:.2f}", flush=True)
        # FLOPs are counted after the timings, so that nothing the TF profiler leaves in the process can touch them.
        keras.backend.clear_session()
        # Counted without dropout: its random-seed variable cannot be frozen into constants, and its FLOPs
        # (one multiply per activation) are negligible next to the convolutions.
        counted_model = dataclasses.replace(model_config, dropout=0.0).build()
        forward_flops, train_flops = model_flops_per_image(counted_model, batch_size)
        print(f"{name}_forward_flops_per_image {forward_flops:.4g}")
        print(f"{name}_train_flops_per_image {train_flops:.4g}")
        for (model_name, precision, xla), (_, images_per_second) in timings.items():
            if model_name == name:
                achieved[name, precision, xla] = train_flops * images_per_second / 1e9
                print(f"{name}_{precision}_{'xla' if xla else 'noxla'}_gflops {achieved[name, precision, xla]:.1f}")

    gflops_after = matmul_peak_gflops(args.matmul_size, args.matmul_repeats)
    peak_gflops = max(gflops_before, gflops_after)
    print(f"matmul_gflops_after {gflops_after:.1f}")
    print(f"matmul_peak_gflops {peak_gflops:.1f}")
    fractions = {config: gflops / peak_gflops for config, gflops in achieved.items()}
    for (name, precision, xla), fraction in fractions.items():
        print(f"{name}_{precision}_{'xla' if xla else 'noxla'}_peak_fraction {fraction:.3f}")
    print(f"peak_rss_mb {common.peak_rss_mb():.0f}")
    if "cpu" in models:
        print_auto_precision(timings, xla_settings)
    # The headline is the CPU recipe as train.py runs it; failing that, the best configuration measured.
    _, cpu_train_config = common.recipe_configs("cpu")
    headline = ("cpu", cpu_train_config.precision, cpu_train_config.jit_compile)
    if headline not in fractions:
        headline = max(fractions, key=fractions.get)
    name, precision, xla = headline
    print(f"train_peak_fraction_of {name}_{precision}_{'xla' if xla else 'noxla'}")
    print(f"train_peak_fraction {fractions[headline]:.3f}")


if __name__ == "__main__":
    main()
