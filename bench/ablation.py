"""The training ablation: the CPU recipe with one change per arm, the same budget for all, scored by SWD, face and NLL.

    python bench/ablation.py --data_dir=../shared/data/celeba --root=$HOME/runs/ablation_dec --minutes=30 --pairs \
        --arms baseline deep_channels attention16 min_snr --seeds 0

Arms (each is `train.py --flagfile=flags/celeba32_cpu.flags` plus `--base_flags` plus the flags shown):

    baseline        the recipe: v-prediction with min-SNR-5 weighting, linear schedule, width 32 x (1, 2, 2, 2),
                    attention at the bottleneck, precision auto (mixed_bfloat16 where the CPU has native bf16)
    float32         --precision=float32                              (what auto gives up on a bf16 CPU)
    deep_channels   --channel_multipliers=1,2,4,4                    (capacity at 8x8 and 4x4, where it costs little)
    width48         --width=48
    attention16     --attention_resolutions=16,8                     (global coherence at 16x16 and 8x8)
    min_snr         --loss_weighting=min_snr                         (min-SNR-5 weights with v, Hang et al. 2023; the
                                                                     recipe since it won Section 6.11: = baseline)
    log_normal      --timestep_sampling=log_normal                   (EDM's noise levels, Karras et al. 2022, on top of
                                                                     the recipe's min-SNR-5 weights)
    edm             --timestep_sampling=log_normal --loss_weighting=none   (EDM's training: its noise levels with
                                                                     unweighted v, which is EDM's preconditioned loss)
    lr1e-3          --learning_rate=1e-3
    batch64         --batch_size=64
    ema9995         --ema_decay=0.9995

Budgets. With `--minutes`, every arm gets the same wall-clock: train.py runs with an unbounded step count and is
stopped (SIGKILL; checkpoints are probe-checked, so that is safe) when the budget is spent, start-up and tracing
included; the arm is scored on its newest checkpoint, written at most `--steps_per_epoch` steps before the end.
The clock is the machine's, so run the ablation alone on the machine. An arm interrupted before its budget ends
is restarted from scratch when the ablation is rerun (its lost time cannot be credited fairly); a finished arm
(`<run>/budget.json`) is skipped. With `--train_steps` instead, every arm trains that many steps (resumable).

`--pairs` trains two runs at a time, each pinned to its own core (`taskset`) with one TensorFlow thread: on a
2-core machine that doubles the arms per hour, and every run still gets the same hardware. Runs are paired in
order (arms within a seed), and the second run of a pair takes the other core.

Scoring, on the final EMA weights and with both cores: SWD and the face metric (`keras_ddpm.metrics.face`) of
`--num_images` samples against as many held-out faces, drawn with the export's sampler (DPM-Solver++, 20 steps,
unless `--sampler`/`--steps` say otherwise), and with `--metrics` including nll, the NLL bound on `--nll_images`
held-out faces. Prints `key value` lines per run (`<arm>_s<seed>_swd_mean`, `_face_rate`, `_face_fd`,
`_face_landmark_fd`, `_nll_bpd` when measured, `_train_seconds`, `_steps`), the real faces' floor once
(`floor_face_fd`, `floor_face_landmark_fd`), and writes `<root>/ablation.json` and a bar chart
`<root>/ablation.png`. The summary keeps the runs of earlier calls with the same budget and scoring, so arms and
seeds can be added later.
"""

import argparse
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import common

from keras_ddpm import evaluation

ARMS = {
    "baseline": [],
    "float32": ["--precision=float32"],
    "deep_channels": ["--channel_multipliers=1,2,4,4"],
    "width48": ["--width=48"],
    "attention16": ["--attention_resolutions=16,8"],
    "min_snr": ["--loss_weighting=min_snr"],
    "log_normal": ["--timestep_sampling=log_normal"],
    "edm": ["--timestep_sampling=log_normal", "--loss_weighting=none"],
    "lr1e-3": ["--learning_rate=1e-3"],
    "batch64": ["--batch_size=64"],
    "ema9995": ["--ema_decay=0.9995"],
}
UNBOUNDED_STEPS = 10**8


def train_py_command(flagfile, data_dir, run_dir, seed: int, train_steps: int, steps_per_epoch: int,
                     flags: list[str]) -> list[str]:
    """train.py for one run of a comparison: no export, SWD monitor or sample grids; a checkpoint per epoch.

    The learning rate stays constant after warm-up (no cool-down), as in every arm so far: a run cut by a
    wall-clock budget has no known end to cool down towards.
    """
    return [sys.executable, str(common.REPO / "train.py"), f"--flagfile={flagfile}", f"--data_dir={data_dir}",
            f"--output_dir={run_dir}", f"--train_steps={train_steps}", f"--steps_per_epoch={steps_per_epoch}",
            f"--seed={seed}", "--cooldown_steps=0", "--export=false", "--swd_every_epochs=0",
            "--sample_every_epochs=1000000", *flags]


def train_command(arm: str, seed: int, run_dir: pathlib.Path, args) -> list[str]:
    train_steps = UNBOUNDED_STEPS if args.minutes else args.train_steps
    return train_py_command(common.RECIPES["cpu"], args.data_dir, run_dir, seed, train_steps, args.steps_per_epoch,
                            [*args.base_flags, *ARMS[arm]])


def pinned(command: list[str], core: int) -> list[str]:
    """`command` on one core with one TensorFlow thread (taskset and env exec, so the PID stays the command's)."""
    return ["taskset", "--cpu-list", str(core), "env", "TF_NUM_INTRAOP_THREADS=1", "TF_NUM_INTEROP_THREADS=1",
            *command]


def train_pairs_for_minutes(runs: dict[str, tuple[list[str], pathlib.Path]], minutes: float) -> dict[str, dict]:
    """`train_for_minutes` for {name: (command, run_dir)}, two at a time, each pinned to its own core.

    The runs are paired in order; pair k puts its first run on core k % 2, so arms that train side by side in
    one round swap cores in the next.
    """
    names, spent = list(runs), {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for round_index, first in enumerate(range(0, len(names), 2)):
            futures = {}
            for position, name in enumerate(names[first:first + 2]):
                command, run_dir = runs[name]
                command = pinned(command, (position + round_index) % 2)
                print(f"# {' '.join(command)}", flush=True)
                futures[name] = pool.submit(train_for_minutes, command, run_dir, minutes)
            spent.update({name: future.result() for name, future in futures.items()})
    return spent


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
    results = evaluation.evaluate(str(run_dir), data_dir=args.data_dir, metrics=args.metrics, sampler=args.sampler,
                                  steps=args.steps, eta=args.eta, num_images=args.num_images,
                                  nll_images=args.nll_images, batch_size=250, verbose=False)
    return results["metrics"]


def print_scores(name: str, spent: dict, metrics: dict) -> None:
    face = metrics["face"]
    nll = f"{name}_nll_bpd {metrics['nll']['bpd']:.3f}\n" if "nll" in metrics else ""
    print(f"{name}_swd_mean {metrics['swd']['swd_mean']:.2f}\n{name}_face_rate {face['face_rate']:.3f}\n"
          f"{name}_face_fd {face['face_fd']:.3f}\n{name}_face_landmark_fd {face['face_landmark_fd']:.4f}\n"
          f"{nll}{name}_train_seconds {spent['seconds']:.0f}\n{name}_steps {spent['steps']}", flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="CelebA folder")
    parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path.home() / "runs" / "ablation")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per arm and seed")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock budget per run (run alone on the machine)")
    budget.add_argument("--train_steps", type=int, help="step budget per run")
    parser.add_argument("--pairs", action="store_true",
                        help="with --minutes: two runs at a time, one core and one TensorFlow thread each")
    parser.add_argument("--steps_per_epoch", type=int, default=100, help="checkpoint interval in steps")
    parser.add_argument("--base_flags", nargs="*", default=[], help="train.py flags for every arm")
    parser.add_argument("--metrics", default="swd,face,nll", help="comma-separated; swd and face are required")
    parser.add_argument("--sampler", default="dpm++", help="the export's sampler, so the scores are what users see")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--nll_images", type=int, default=256)
    return parser.parse_args()


def train_all(runs: dict[str, tuple[list[str], pathlib.Path]], args) -> dict[str, dict]:
    """Train every run (or skip it when its budget was spent); returns {name: {seconds, steps}}."""
    if args.pairs:
        return train_pairs_for_minutes(runs, args.minutes)
    spent = {}
    for name, (command, run_dir) in runs.items():
        print(f"# {' '.join(command)}", flush=True)
        spent[name] = train_for_minutes(command, run_dir, args.minutes) if args.minutes else \
            train_for_steps(command, run_dir)
    return spent


def plot_scores(summary: dict, png_path: pathlib.Path) -> None:
    """Bars per run: SWD (lower is better) and face rate (higher is better), with the steps each run reached."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(summary, key=lambda name: summary[name]["swd"]["swd_mean"])
    labels = [f"{name} ({summary[name]['steps']} steps)" for name in names]
    figure, (swd_axis, face_axis) = plt.subplots(1, 2, figsize=(10, 0.45 * len(names) + 1.2), sharey=True)
    swd_axis.barh(labels, [summary[name]["swd"]["swd_mean"] for name in names], color="tab:blue")
    swd_axis.set_xlabel("SWD (lower is better)")
    swd_axis.invert_yaxis()
    face_axis.barh(labels, [summary[name]["face"]["face_rate"] for name in names], color="tab:green")
    face_axis.axvline(summary[names[0]]["face"]["face_rate_real"], color="black", linestyle="--")
    face_axis.set_xlabel("face rate (higher is better; dashed: real faces)")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


def earlier_runs(summary_file: pathlib.Path, settings: dict) -> dict:
    """The runs an earlier call scored under the same budget and scoring, so that arms can be added later."""
    if not summary_file.exists():
        return {}
    earlier = json.loads(summary_file.read_text())
    if any(earlier.get(key) != value for key, value in settings.items()):
        differences = {key: earlier.get(key) for key, value in settings.items() if earlier.get(key) != value}
        sys.exit(f"{summary_file} holds runs of another budget, scoring or recipe (there: {differences}); give a new "
                 "--root.")
    return earlier["runs"]


def main():
    args = parse_args()
    if args.pairs and not args.minutes:
        sys.exit("--pairs compares wall-clock budgets: give --minutes too.")
    root = args.root.expanduser()
    arm_of = {f"{arm}_s{seed}": (arm, seed) for seed in args.seeds for arm in args.arms}
    runs = {name: (train_command(arm, seed, root / name, args), root / name) for name, (arm, seed) in arm_of.items()}
    # The recipe's flags are part of what an arm means: "baseline" changed when the recipe took min-SNR weights.
    recipe_flags = [line for line in pathlib.Path(common.RECIPES["cpu"]).read_text().splitlines()
                    if line.startswith("--")]  # comments may change without changing the recipe
    recipe = hashlib.sha256("\n".join(recipe_flags).encode()).hexdigest()[:12]
    settings = {"minutes": args.minutes, "pairs": args.pairs, "train_steps": args.train_steps,
                "sampler": args.sampler, "steps": args.steps, "eta": args.eta, "num_images": args.num_images,
                "recipe_sha256": recipe, "base_flags": args.base_flags}
    summary = earlier_runs(root / "ablation.json", settings)
    spent_by_run = train_all(runs, args)
    for name, (arm, seed) in arm_of.items():
        metrics = score(root / name, args)
        if "floor_face_fd" not in settings:  # the same held-out and training faces for every run
            settings["floor_face_fd"] = metrics["face"]["face_fd_real"]
            print(f"floor_face_fd {metrics['face']['face_fd_real']:.3f}\n"
                  f"floor_face_landmark_fd {metrics['face']['face_landmark_fd_real']:.4f}", flush=True)
        print_scores(name, spent_by_run[name], metrics)
        summary[name] = {"arm": arm, "seed": seed, "flags": args.base_flags + ARMS[arm], **spent_by_run[name],
                         **metrics}
        (root / "ablation.json").write_text(json.dumps({**settings, "runs": summary}, indent=1) + "\n")
        plot_scores(summary, root / "ablation.png")


if __name__ == "__main__":
    main()
