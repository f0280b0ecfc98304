"""Repeated timings of the CPU recipe's train step in one process, with the cores each repeat used.

    python bench/step_modes.py --precision=float32 --repeats=3

On the 2-core AMD EPYC of December 2026 the same step switched, within one process, between ~0.7 s using 1.8
cores and a fixed ~1.28 s using 1.0 core; this script shows whether a machine does that. Prints per repeat
`repeat<i>_ms_per_step`, `repeat<i>_cores_used` (process CPU time over wall time) and `repeat<i>_steal_cores` (the
cores the hypervisor took from this VM meanwhile, from /proc/stat), after
`two_core_spin_cores_used`: two plain Python busy loops in two processes, as a check that the machine gives us two
cores at all.
"""

import argparse
import multiprocessing
import time

import common  # (also puts the repository on sys.path)
from common import cpu_seconds, steal_seconds


def spin(seconds: float, result) -> None:
    start, cpu_start = time.perf_counter(), cpu_seconds()
    while time.perf_counter() - start < seconds:
        pass
    result.put(cpu_seconds() - cpu_start)


def two_core_spin(seconds: float = 4.0) -> float:
    """Cores two busy processes got together over `seconds` (2.0 when both cores are ours)."""
    result = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=spin, args=(seconds, result)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(result.get() for _ in workers) / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per repeat")
    args = parser.parse_args()
    print(f"two_core_spin_cores_used {two_core_spin():.2f}", flush=True)  # forked before TensorFlow starts threads

    import keras
    import tensorflow as tf

    from keras_ddpm.training import make_optimizer

    model_config, train_config = common.recipe_configs("cpu")
    keras.mixed_precision.set_dtype_policy(args.precision)
    keras.utils.set_random_seed(0)
    model = model_config.build()
    model.compile(optimizer=make_optimizer(train_config), jit_compile=False)
    images = tf.random.uniform([train_config.batch_size, *model.image_shape], -1.0, 1.0, seed=0)
    batches = tf.data.Dataset.from_tensors(images).repeat()
    model.fit(batches, epochs=1, steps_per_epoch=2, verbose=0)  # tracing and warm-up
    for repeat in range(args.repeats):
        start, cpu_start, steal_start = time.perf_counter(), cpu_seconds(), steal_seconds()
        model.fit(batches, epochs=1, steps_per_epoch=args.steps, verbose=0)
        wall = time.perf_counter() - start
        print(f"repeat{repeat}_ms_per_step {1000 * wall / args.steps:.0f}")
        print(f"repeat{repeat}_cores_used {(cpu_seconds() - cpu_start) / wall:.2f}")
        print(f"repeat{repeat}_steal_cores {(steal_seconds() - steal_start) / wall:.2f}", flush=True)


if __name__ == "__main__":
    main()
