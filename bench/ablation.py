"""The training ablation: the CPU recipe with one change per arm, the same budget for all, scored by SWD, face and NLL.

    python bench/ablation.py --data_dir=../shared/data/celeba --root=$HOME/runs/ablation --train_steps=3000

Arms (each is `train.py --flagfile=flags/celeba32_cpu.flags` plus the flags shown):

    baseline        the recipe: linear schedule, epsilon-prediction, attention at the bottleneck, no weighting
    no_attention    --bottleneck_attention=false   (the "simple U-Net" of the seed reports)
    cosine          --schedule=cosine
    v               --objective=v
    min_snr         --loss_weighting=min_snr

Every arm trains `--train_steps` steps at the recipe's batch and seed into `<root>/<arm>` (rerunning resumes an
interrupted arm and skips a finished one), then is scored on its final EMA weights: SWD and the face metric
(`keras_ddpm.metrics.face`) of `--num_images` DDIM-50 samples (eta 1) against as many held-out faces, and the
NLL bound on `--nll_images` held-out faces. Prints `key value` lines per arm: `<arm>_swd_mean`,
`<arm>_face_rate`, `<arm>_face_fd`, `<arm>_face_landmark_fd`, `<arm>_nll_bpd`, `<arm>_train_seconds` (and the
real faces' floor once, as `floor_face_fd` and `floor_face_landmark_fd`), and writes `<root>/ablation.json`.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

import common

from keras_ddpm import evaluation

ARMS = {
    "baseline": [],
    "no_attention": ["--bottleneck_attention=false"],
    "cosine": ["--schedule=cosine"],
    "v": ["--objective=v"],
    "min_snr": ["--loss_weighting=min_snr"],
}


def train_arm(arm: str, run_dir: pathlib.Path, args) -> float:
    """Train (or resume, or skip) one arm with train.py; returns the wall time of this call."""
    command = [sys.executable, str(common.REPO / "train.py"), f"--flagfile={common.RECIPES['cpu']}",
               f"--data_dir={args.data_dir}", f"--output_dir={run_dir}", f"--train_steps={args.train_steps}",
               "--export=false", "--swd_every_epochs=0", *ARMS[arm]]
    print(f"# {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="CelebA folder")
    parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path.home() / "runs" / "ablation")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--train_steps", type=int, default=3000)
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--nll_images", type=int, default=256)
    args = parser.parse_args()

    summary = {}
    for arm in args.arms:
        run_dir = args.root.expanduser() / arm
        seconds = train_arm(arm, run_dir, args)
        results = evaluation.evaluate(str(run_dir), data_dir=args.data_dir, metrics="swd,face,nll", sampler="ddim",
                                      steps=50, eta=1.0, num_images=args.num_images, nll_images=args.nll_images,
                                      batch_size=250, verbose=False)
        summary[arm] = {"flags": ARMS[arm], "train_seconds": seconds, **results["metrics"]}
        face = results["metrics"]["face"]
        if arm == args.arms[0]:  # the same held-out and training faces for every arm
            print(f"floor_face_fd {face['face_fd_real']:.3f}\n"
                  f"floor_face_landmark_fd {face['face_landmark_fd_real']:.4f}", flush=True)
        print(f"{arm}_swd_mean {results['metrics']['swd']['swd_mean']:.2f}\n"
              f"{arm}_face_rate {face['face_rate']:.3f}\n{arm}_face_fd {face['face_fd']:.3f}\n"
              f"{arm}_face_landmark_fd {face['face_landmark_fd']:.4f}\n"
              f"{arm}_nll_bpd {results['metrics']['nll']['bpd']:.3f}\n{arm}_train_seconds {seconds:.0f}", flush=True)
        (args.root.expanduser() / "ablation.json").write_text(json.dumps(
            {"train_steps": args.train_steps, "num_images": args.num_images, "arms": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
