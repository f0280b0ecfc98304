"""Fault injection: SIGKILL a smoke training run at random moments, resume it each time, check every resume.

    python bench/fault_injection.py [--kills 10] [--seed 0] [--steps_per_epoch 5] [--output_dir DIR]

Each round resumes one run directory (under a temp dir unless --output_dir is given) with `train.py
--flagfile=flags/smoke.flags`, waits for its first new checkpoint, then SIGKILLs it after a random delay
(mid step, mid checkpoint save or mid log row). After each kill it checks that:

- restore: the newest checkpoint that loads gives the model exactly its network and EMA weights;
- step: the next process says it resumed at that checkpoint's step N, and its first new checkpoint is at
  N + steps_per_epoch (the optimizer's step count carried on, nothing lost or counted twice);
- EMA: that checkpoint's EMA weights moved from the restored ones by less than 5% of their norm (an EMA
  restarted from the network's initial weights would be far off);
- log: log.csv holds only complete rows with strictly increasing steps.

Prints `key value` lines; the last is `sigkill_resumed <resumed correctly>/<kills>`.
"""

import argparse
import csv
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ITERATIONS = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"


def start_training(run_dir: pathlib.Path, steps_per_epoch: int, log_file) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "train.py"), "--flagfile=flags/smoke.flags", f"--output_dir={run_dir}",
               f"--steps_per_epoch={steps_per_epoch}", "--train_steps=100000", "--validation_images=0",
               "--keep_checkpoints=100000",  # so that the checkpoints a check reads are still there
               "--sample_every_epochs=1000", "--export=false", "--traceback"]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_file,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    state = tf.train.get_checkpoint_state(str(run_dir / "checkpoints"))
    return [int(path.rsplit("-", 1)[1]) for path in state.all_model_checkpoint_paths] if state else []


def ema_tensors(path: str) -> dict:
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if name.startswith("ema_network/")}


def fingerprints(arrays) -> list:
    """Shape and float64 sums of each array, sorted: equal lists mean equal weights, whatever their names."""
    return sorted((tuple(array.shape), float(np.sum(array, dtype=np.float64)),
                   float(np.sum(np.square(array, dtype=np.float64)))) for array in arrays)


def restored_exactly(run_dir: pathlib.Path) -> tuple[int, dict, bool]:
    """(step, EMA tensors, whether load_run restored them bit for bit) of the newest checkpoint that loads."""
    from keras_ddpm.runs import load_run

    model, _ = load_run(run_dir)  # read-only: logs and skips a checkpoint the kill left unreadable
    path = next(path for path in reversed(tf.train.get_checkpoint_state(str(run_dir / "checkpoints"))
                                          .all_model_checkpoint_paths)
                if fingerprints(ema_tensors(path).values()) == fingerprints(model.ema_network.get_weights()))
    reader = tf.train.load_checkpoint(path)
    network = [reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
               if name.startswith("optimizer/_trainable_variables/")]
    exact = fingerprints(network) == fingerprints([weight.numpy() for weight in model.network.trainable_weights])
    return int(reader.get_tensor(ITERATIONS)), ema_tensors(path), exact


def log_is_clean(run_dir: pathlib.Path) -> bool:
    """Every row complete (one torn last line is the latest kill's, dropped at the next resume), steps increasing."""
    lines = (run_dir / "log.csv").read_text().splitlines(keepends=True)
    complete = lines if not lines or lines[-1].endswith("\n") else lines[:-1]
    header, *rows = list(csv.reader(complete))
    steps = [int(row[header.index("step")]) for row in rows]
    return all(len(row) == len(header) for row in rows) and all(b > a for a, b in zip(steps, steps[1:]))


def wait_for_checkpoint_after(run_dir, step, process, timeout=900) -> int:
    deadline = time.time() + timeout
    while True:
        newer = [saved for saved in checkpoint_steps(run_dir) if saved > step]
        if newer:
            return min(newer)
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"training stopped or stalled before a checkpoint after step {step}")
        time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
    parser.add_argument("--steps_per_epoch", type=int, default=5)
    parser.add_argument("--max_delay", type=float, default=8.0, help="longest wait after a checkpoint, seconds")
    parser.add_argument("--output_dir", help="run directory (default: a new temp dir)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    run_dir = pathlib.Path(args.output_dir or tempfile.mkdtemp(prefix="fault_injection_")) / "run"
    log_path = run_dir.parent / "train_stderr.log"
    print(f"run_dir {run_dir}")

    expected = None  # (step, EMA tensors) the next process must resume from
    resumed, fallbacks, cleaned = 0, 0, 0
    for round_index in range(args.kills + 1):  # the last round only checks the last kill's resume
        with open(log_path, "w") as log_file:
            process = start_training(run_dir, args.steps_per_epoch, log_file)
            start_step = expected[0] if expected else 0
            try:
                first_new = wait_for_checkpoint_after(run_dir, start_step, process)
            finally:
                if round_index == args.kills:
                    process.send_signal(signal.SIGKILL)
            if round_index < args.kills:
                delay = rng.uniform(0.0, args.max_delay)
                time.sleep(delay)
                process.send_signal(signal.SIGKILL)
            process.wait()
        stderr = log_path.read_text()
        if expected is not None:
            said = re.search(r"Resumed from \S+ \(step (\d+)\)", stderr)
            reader = tf.train.load_checkpoint(str(run_dir / "checkpoints" / f"ckpt-{first_new}"))
            ema_new = ema_tensors(str(run_dir / "checkpoints" / f"ckpt-{first_new}"))
            change = np.sqrt(sum(np.sum(np.square(ema_new[name] - value)) for name, value in expected[1].items()))
            norm = np.sqrt(sum(np.sum(np.square(value)) for value in expected[1].values()))
            checks = {
                "step": said is not None and int(said.group(1)) == expected[0]
                and int(reader.get_tensor(ITERATIONS)) == expected[0] + args.steps_per_epoch == first_new,
                "ema": change < 0.05 * norm,
                "log": log_is_clean(run_dir),
                "restore": expected[2],
            }
            resumed += all(checks.values())
            fallbacks += "Cannot use checkpoint" in stderr  # the kill left the newest checkpoint unreadable
            cleaned += "Removing" in stderr  # ... or a half-written one
            print(f"kill_{round_index} resumed_at {expected[0]} next_checkpoint {first_new} "
                  f"ema_change {change / norm:.4f} " + " ".join(f"{key}_ok {int(ok)}" for key, ok in checks.items()))
        if round_index < args.kills:
            expected = restored_exactly(run_dir)
            print(f"kill_{round_index + 1} delay_s {delay:.2f} newest_loadable_step {expected[0]}")
    print(f"checkpoint_fallbacks {fallbacks}")
    print(f"resumes_that_cleaned_leftovers {cleaned}")
    print(f"sigkill_resumed {resumed}/{args.kills}")


if __name__ == "__main__":
    main()
