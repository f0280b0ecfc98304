"""Simple U-Net against attention U-Net on Fashion-MNIST, at equal wall-clock, scored by class accuracy and SWD.

    python bench/fashion_unets.py --data_dir=../shared/data/fashion_mnist --root=$HOME/runs/fashion_unets \
        --minutes=15 --seeds 0 1 [--classifier=$HOME/runs/fashion/classifier.keras]

Arms (each is `train.py --flagfile=flags/fashion_mnist.flags` plus the flags shown):

    simple      --bottleneck_attention=false     no attention anywhere: residual blocks only
    attention   (the recipe)                     self-attention at the 7x7 bottleneck
    attention14 --attention_resolutions=14       also after the 14x14 blocks, on the way down and up

Fair clocks on two cores: `bench/ablation.py`'s `train_pairs_for_minutes`. Two runs train at once, each pinned to
its own core with one TensorFlow thread, for `--minutes` of wall-clock from process start (tracing included), and
are then stopped. Runs are paired in order (seed by seed, arms in the order given), so with the default two arms
both arms of a seed train side by side, and they swap cores from one seed to the next. Run it alone on the
machine. A finished run (`<run>/budget.json`) is kept, an interrupted one starts again.

Scoring: `bench/fashion_guidance.py` on each run's newest checkpoint at guidance `--guidance` (the shipped model's
w = 3), with the same judging CNN for every run (`--classifier`, trained on the first call if the file is absent).
Prints `key value` lines `<arm>_s<seed>_<key>` for `class_accuracy`, `class_swd`, `pairwise_distance`, `steps` and
`train_seconds`, then `<arm>_mean_<key>` over seeds, and writes `<root>/fashion_unets.json`.
"""

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np

import common
from ablation import UNBOUNDED_STEPS, train_pairs_for_minutes, train_py_command

ARMS = {
    "simple": ["--bottleneck_attention=false"],
    "attention": [],
    "attention14": ["--attention_resolutions=14"],
}
RECIPE = common.REPO / "flags" / "fashion_mnist.flags"
SCORES = ("class_accuracy", "class_swd", "pairwise_distance")


def train_command(arm: str, seed: int, run_dir: pathlib.Path, args) -> list[str]:
    return train_py_command(RECIPE, args.data_dir, run_dir, seed, UNBOUNDED_STEPS, args.steps_per_epoch, ARMS[arm])


def score(run_dir: pathlib.Path, args) -> dict:
    """class_accuracy, class_swd and pairwise_distance at guidance `args.guidance`, read from fashion_guidance.py."""
    command = [sys.executable, str(common.REPO / "bench" / "fashion_guidance.py"), f"--model={run_dir}",
               f"--data_dir={args.data_dir}", "--guidance", str(args.guidance),
               f"--samples_per_class={args.samples_per_class}", f"--classifier={args.classifier}"]
    printed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    values = dict(line.split(" ", 1) for line in printed.splitlines() if " " in line)
    prefix = f"w{args.guidance:g}_"
    return {"classifier_held_out_accuracy": float(values["classifier_held_out_accuracy"]),
            "real_class_swd": float(values["real_class_swd"]),
            **{key: float(values[prefix + key]) for key in SCORES}}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=pathlib.Path, required=True, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path.home() / "runs" / "fashion_unets")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["simple", "attention"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget per run, on one core")
    parser.add_argument("--steps_per_epoch", type=int, default=50, help="checkpoint interval in steps")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--samples_per_class", type=int, default=50)
    parser.add_argument("--classifier", type=pathlib.Path, default=None,
                        help="the judging CNN's .keras file (default <root>/classifier.keras; trained if absent)")
    return parser.parse_args()


def main():
    args = parse_args()
    root = args.root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    args.classifier = args.classifier or root / "classifier.keras"
    arm_of = {f"{arm}_s{seed}": (arm, seed) for seed in args.seeds for arm in args.arms}
    spent = train_pairs_for_minutes(
        {name: (train_command(arm, seed, root / name, args), root / name) for name, (arm, seed) in arm_of.items()},
        args.minutes)
    summary = {}
    for name, (arm, seed) in arm_of.items():
        summary[name] = {"arm": arm, "seed": seed, "flags": ARMS[arm], **spent[name], **score(root / name, args)}
        scores = "\n".join(f"{name}_{key} {summary[name][key]:.4f}" for key in SCORES)
        print(f"{scores}\n{name}_steps {summary[name]['steps']}\n{name}_train_seconds {summary[name]['seconds']:.0f}",
              flush=True)
    for arm in args.arms:
        for key in SCORES:
            print(f"{arm}_mean_{key} {np.mean([run[key] for run in summary.values() if run['arm'] == arm]):.4f}")
    first = next(iter(summary.values()))
    print(f"classifier_held_out_accuracy {first['classifier_held_out_accuracy']:.4f}\n"
          f"real_class_swd {first['real_class_swd']:.2f}")
    (root / "fashion_unets.json").write_text(json.dumps(
        {"minutes": args.minutes, "guidance": args.guidance, "samples_per_class": args.samples_per_class,
         "runs": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
