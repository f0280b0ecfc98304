"""What a user waits for: `python sample.py` (64 faces from the shipped model) in a fresh process, start to exit.

    python bench/sample_py_seconds.py [--repeats 3] [--model savedmodel]

Each repeat runs `sample.py --output=<temporary file>` as a new process and measures its wall time and the CPU
cores it kept busy (CPU time over wall time; this machine's step times are bimodal, so the cores show which mode
a figure came from). A last process times the phases in one Python process, so the total can be taken apart.
Run it alone on the machine. Prints `key value` lines:

    cpu_model                      from /proc/cpuinfo
    sample_py_seconds_<i> / sample_py_cores_used_<i>
    phase_import_seconds           importing TensorFlow, Keras and keras_ddpm
    phase_load_seconds             tf.saved_model.load of the model
    phase_first_generate_seconds   the first 64 images: tracing the sampler, then sampling
    phase_second_generate_seconds  the same request again: sampling alone
    sample_py_seconds_median       the headline (the issue's target: under 20 s on 2 cores)
"""

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import common

PHASES = """
import json, sys, time
start = time.perf_counter()
import tensorflow, keras
from keras_ddpm.generation import generate_in_batches
from keras_ddpm.runs import load_generator
imported = time.perf_counter()
generator = load_generator(sys.argv[1])
loaded = time.perf_counter()
generate_in_batches(generator, 64, 64, 0, verbose=False)
first = time.perf_counter()
generate_in_batches(generator, 64, 64, 0, verbose=False)
second = time.perf_counter()
print(json.dumps({"import": imported - start, "load": loaded - imported, "first_generate": first - loaded,
                  "second_generate": second - first}))
"""


def cpu_model() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def timed_process(command: list[str]) -> tuple[float, float]:
    """(wall seconds, cores used) of a child process run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=common.REPO)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu_seconds / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=str(common.REPO / "savedmodel"))
    args = parser.parse_args()
    print(f"cpu_model {cpu_model()}", flush=True)
    wall_times = []
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "sample.py", f"--model={args.model}", f"--output={folder}/samples.png"]
        for repeat in range(args.repeats):
            seconds, cores = timed_process(command)
            wall_times.append(seconds)
            print(f"sample_py_seconds_{repeat} {seconds:.1f}\nsample_py_cores_used_{repeat} {cores:.2f}", flush=True)
    printed = subprocess.run([sys.executable, "-c", PHASES, args.model], check=True, capture_output=True, text=True,
                             cwd=common.REPO).stdout
    for phase, seconds in json.loads(printed.splitlines()[-1]).items():
        print(f"phase_{phase}_seconds {seconds:.1f}")
    print(f"sample_py_seconds_median {statistics.median(wall_times):.1f}")


if __name__ == "__main__":
    main()
