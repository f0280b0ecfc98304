"""The training ablation: the CPU recipe with one change per arm, the same budget for all, scored by SWD, face and NLL.

    python bench/ablation.py --data_dir=../shared/data/celeba --root=$HOME/runs/ablation_dec --minutes=35 --seeds 0 1

Arms (each is `train.py --flagfile=flags/celeba32_cpu.flags` plus `--base_flags` plus the flags shown):

    baseline        the recipe: v-prediction, linear schedule, width 32 x (1, 2, 2, 2), attention at the bottleneck,
                    precision auto (mixed_bfloat16 where the CPU has native bf16)
    float32         --precision=float32                              (what auto gives up on a bf16 CPU)
    deep_channels   --channel_multipliers=1,2,4,4                    (capacity at 8x8 and 4x4, where it costs little)
    width48         --width=48
    attention16     --attention_resolutions=16,8                     (global coherence at 16x16 and 8x8)
    min_snr         --loss_weighting=min_snr                         (min-SNR-5 weights with v, Hang et al. 2023)
    lr1e-3          --learning_rate=1e-3
    batch64         --batch_size=64
    ema9995         --ema_decay=0.9995

Budgets. With `--minutes`, every arm gets the same wall-clock: train.py runs with an unbounded step count and is
stopped (SIGKILL; checkpoints are probe-checked, so that is safe) when the budget is spent, start-up and tracing
included; the arm is scored on its newest checkpoint, written at most `--steps_per_epoch` steps before the end.
The clock is the machine's, so run the ablation alone on the machine. An arm interrupted before its budget ends
is restarted from scratch when the ablation is rerun (its lost time cannot be credited fairly); a finished arm
(`<run>/budget.json`) is skipped. With `--train_steps` instead, every arm trains that many steps (resumable).

Scoring, on the final EMA weights: SWD and the face metric (`keras_ddpm.metrics.face`) of `--num_images` DDIM-50
samples (eta 1) against as many held-out faces, and the NLL bound on `--nll_images` held-out faces. Prints
`key value` lines per run (`<arm>_s<seed>_swd_mean`, `_face_rate`, `_face_fd`, `_face_landmark_fd`, `_nll_bpd`,
`_train_seconds`, `_steps`), the real faces' floor once (`floor_face_fd`, `floor_face_landmark_fd`), and writes
`<root>/ablation.json`.
"""

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

import common

from keras_ddpm import evaluation

ARMS = {
    "baseline": [],
    "float32": ["--precision=float32"],
    "deep_channels": ["--channel_multipliers=1,2,4,4"],
    "width48": ["--width=48"],
    "attention16": ["--attention_resolutions=16,8"],
    "min_snr": ["--loss_weighting=min_snr"],
    "lr1e-3": ["--learning_rate=1e-3"],
    "batch64": ["--batch_size=64"],
    "ema9995": ["--ema_decay=0.9995"],
}
UNBOUNDED_STEPS = 10**8


def train_py_command(flagfile, data_dir, run_dir, seed: int, train_steps: int, steps_per_epoch: int,
                     flags: list[str]) -> list[str]:
    """train.py for one run of a comparison: no export, SWD monitor or sample grids; a checkpoint per epoch."""
    return [sys.executable, str(common.REPO / "train.py"), f"--flagfile={flagfile}", f"--data_dir={data_dir}",
            f"--output_dir={run_dir}", f"--train_steps={train_steps}", f"--steps_per_epoch={steps_per_epoch}",
            f"--seed={seed}", "--export=false", "--swd_every_epochs=0", "--sample_every_epochs=1000000", *flags]


def train_command(arm: str, seed: int, run_dir: pathlib.Path, args) -> list[str]:
    train_steps = UNBOUNDED_STEPS if args.minutes else args.train_steps
    return train_py_command(common.RECIPES["cpu"], args.data_dir, run_dir, seed, train_steps, args.steps_per_epoch,
                            [*args.base_flags, *ARMS[arm]])


def newest_checkpoint_step(run_dir: pathlib.Path) -> int:
    steps = [int(path.name[len("ckpt-"):-len(".index")]) for path in (run_dir / "checkpoints").glob("ckpt-*.index")]
    if not steps:
        raise RuntimeError(f"{run_dir} has no checkpoint: the budget ended before the first one; raise --minutes "
                           "or lower --steps_per_epoch.")
    return max(steps)


def train_for_minutes(command: list[str], run_dir: pathlib.Path, minutes: float) -> dict:
    """Run `command` for `minutes` of wall-clock, from a fresh run directory; returns {seconds, steps}."""
    budget_file = run_dir / "budget.json"
    if budget_file.exists():
        return json.loads(budget_file.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted arm starts again: its lost minutes can't be credited
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        returncode = process.wait(timeout=60 * minutes)
        raise RuntimeError(f"train.py stopped with exit code {returncode} before its {minutes}-minute budget.")
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    spent = {"seconds": time.perf_counter() - start, "steps": newest_checkpoint_step(run_dir), "minutes": minutes}
    budget_file.write_text(json.dumps(spent) + "\n")
    return spent


def train_for_steps(command: list[str], run_dir: pathlib.Path) -> dict:
    """Train (or resume, or skip) with train.py; returns {seconds of this call, steps}."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return {"seconds": time.perf_counter() - start, "steps": newest_checkpoint_step(run_dir)}


def score(run_dir: pathlib.Path, args) -> dict:
    results = evaluation.evaluate(str(run_dir), data_dir=args.data_dir, metrics="swd,face,nll", sampler="ddim",
                                  steps=50, eta=1.0, num_images=args.num_images, nll_images=args.nll_images,
                                  batch_size=250, verbose=False)
    return results["metrics"]


def print_scores(name: str, spent: dict, metrics: dict) -> None:
    face = metrics["face"]
    print(f"{name}_swd_mean {metrics['swd']['swd_mean']:.2f}\n{name}_face_rate {face['face_rate']:.3f}\n"
          f"{name}_face_fd {face['face_fd']:.3f}\n{name}_face_landmark_fd {face['face_landmark_fd']:.4f}\n"
          f"{name}_nll_bpd {metrics['nll']['bpd']:.3f}\n{name}_train_seconds {spent['seconds']:.0f}\n"
          f"{name}_steps {spent['steps']}", flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="CelebA folder")
    parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path.home() / "runs" / "ablation")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per arm and seed")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock budget per run (run alone on the machine)")
    budget.add_argument("--train_steps", type=int, help="step budget per run")
    parser.add_argument("--steps_per_epoch", type=int, default=100, help="checkpoint interval in steps")
    parser.add_argument("--base_flags", nargs="*", default=[], help="train.py flags for every arm")
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--nll_images", type=int, default=256)
    return parser.parse_args()


def main():
    args = parse_args()
    root = args.root.expanduser()
    summary = {}
    for arm in args.arms:
        for seed in args.seeds:
            name, run_dir = f"{arm}_s{seed}", root / f"{arm}_s{seed}"
            command = train_command(arm, seed, run_dir, args)
            print(f"# {' '.join(command)}", flush=True)
            spent = train_for_minutes(command, run_dir, args.minutes) if args.minutes else train_for_steps(command, run_dir)
            metrics = score(run_dir, args)
            if not summary:  # the same held-out and training faces for every run
                print(f"floor_face_fd {metrics['face']['face_fd_real']:.3f}\n"
                      f"floor_face_landmark_fd {metrics['face']['face_landmark_fd_real']:.4f}", flush=True)
            print_scores(name, spent, metrics)
            summary[name] = {"arm": arm, "seed": seed, "flags": args.base_flags + ARMS[arm], **spent, **metrics}
            (root / "ablation.json").write_text(json.dumps(
                {"minutes": args.minutes, "train_steps": args.train_steps, "num_images": args.num_images,
                 "runs": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
