"""Sample quality against sampling cost: SWD and face metric of one model's samples for several samplers and steps.

    python bench/sampler_sweep.py --model=savedmodel --data_dir=../shared/data/celeba \
        --runs ddim:10 ddim:20 ddim:50 ddim:100 ddim:50:1 dpm++:10 dpm++:20 ddpm:1000 --plot=docs/swd_vs_steps.png

A run is `sampler:steps` or `sampler:steps:eta` (the noise of DDIM and DPM-Solver++; default 0).

Each run draws `--num_images` samples from the seeds 0, 1, ... (the same starting noise for every run) and
compares them with as many held-out real faces (the `validation` split). The floor is the SWD of as many
training faces against the same held-out faces: what a perfect model would score at this image count.
Prints `key value` lines, one run at a time:

    floor_swd_mean                       real training faces vs the held-out faces
    floor_face_fd, floor_face_landmark_fd   the same for the face metric (keras_ddpm.metrics.face)
    held_out_face_rate                   share of held-out faces in which MTCNN finds a face
    <run>_swd_mean                       samples vs the held-out faces (x1e3, lower is better); <run> is
                                         e.g. ddim_50 or ddim_50_eta1
    <run>_vs_floor                       swd_mean / floor_swd_mean
    <run>_face_rate, <run>_face_fd, <run>_face_landmark_fd   the face metric of the samples
    <run>_seconds                        sampling time of the run
    dpm++_20_vs_ddpm_1000                the issue's target: at most 1.10 (when both runs are in the sweep)

`--plot` draws SWD against network evaluations per image, one line per sampler, with the floor. `--grid_dir`
keeps each run's first 64 samples as a grid: the images `python sample.py` draws with the same sampler.
"""

import argparse
import json
import pathlib
import time

import common  # (also puts the repository on sys.path)

from keras_ddpm import plots
from keras_ddpm.generation import generate_in_batches
from keras_ddpm.runs import load_generator


def parse_run(text: str) -> tuple[str, int, float]:
    """"ddim:50" -> ("ddim", 50, 0.0); "ddim:50:1" -> ("ddim", 50, 1.0)."""
    sampler, steps, eta = (text.split(":") + ["0"])[:3]
    try:
        return sampler, int(steps), float(eta)
    except ValueError:
        raise argparse.ArgumentTypeError(f"A run is sampler:steps[:eta] such as ddim:50 or ddim:50:1, got {text!r}.")


def run_name(sampler: str, steps: int, eta: float) -> str:
    return f"{sampler}_{steps}" + (f"_eta{eta:g}" if eta else "")


def line_name(sampler: str, eta: float) -> str:
    return sampler + (f" (eta {eta:g})" if eta else "")


def plot_sweep(results: dict, floor: float, path: pathlib.Path):
    """SWD vs network evaluations per image (log axis), one line per sampler, the real-vs-real floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.8), dpi=120)
    for line in dict.fromkeys((sampler, eta) for sampler, _, eta in results):
        points = sorted((steps, swd) for (sampler, steps, eta), swd in results.items() if (sampler, eta) == line)
        axes.plot(*zip(*points), "o-", label=line_name(*line))
    axes.axhline(floor, color="gray", linestyle="--", label="real vs real (floor)")
    axes.set_xscale("log")
    axes.set_xlabel("network evaluations per image")
    axes.set_ylabel("SWD x1e3 (mean over levels)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(common.REPO / "savedmodel"), help="SavedModel folder or run directory")
    parser.add_argument("--data_dir", default=None, help="CelebA folder (default: CELEBA_DIR)")
    parser.add_argument("--runs", nargs="+", type=parse_run, default=[parse_run("ddim:50"), parse_run("dpm++:20")],
                        help="sampler:steps[:eta] ...")
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--plot", type=pathlib.Path, default=None, help="PNG of SWD vs steps")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write all figures here too")
    parser.add_argument("--grid_dir", type=pathlib.Path, default=None,
                        help="also write each run's first 64 samples as <grid_dir>/<run>.png (as sample.py draws them)")
    args = parser.parse_args()

    generator = load_generator(args.model)
    held_out, held_out_embedding = common.held_out_faces(generator.image_shape[0], args.num_images, args.data_dir)
    floor = common.floor_scores(held_out, held_out_embedding, args.data_dir)
    print(f"num_images {len(held_out)}\nfloor_swd_mean {floor['swd_mean']:.2f}\nfloor_face_fd {floor['face_fd']:.3f}\n"
          f"floor_face_landmark_fd {floor['face_landmark_fd']:.4f}\n"
          f"held_out_face_rate {held_out_embedding.found.mean():.3f}", flush=True)

    results, face_results = {}, {}
    for sampler, steps, eta in args.runs:
        start = time.perf_counter()
        samples = generate_in_batches(generator, len(held_out), args.batch_size, seed=0, verbose=False,
                                      sampler=sampler, steps=steps, eta=eta)
        seconds = time.perf_counter() - start
        scores = common.score_samples(samples, held_out, held_out_embedding)
        swd = results[sampler, steps, eta] = scores["swd_mean"]
        face = {key: value for key, value in scores.items() if key.startswith("face_")}
        face_results[sampler, steps, eta] = face
        name = run_name(sampler, steps, eta)
        print(f"{name}_swd_mean {swd:.2f}\n{name}_vs_floor {swd / floor['swd_mean']:.2f}\n"
              f"{name}_face_rate {face['face_rate']:.3f}\n{name}_face_fd {face['face_fd']:.3f}\n"
              f"{name}_face_landmark_fd {face['face_landmark_fd']:.4f}\n{name}_seconds {seconds:.0f}", flush=True)
        if args.grid_dir:
            plots.save_image_grid(args.grid_dir / f"{name}.png", samples[:64])
        if args.plot:  # redrawn after every run, so a long sweep shows its progress
            plot_sweep(results, floor["swd_mean"], args.plot)
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "num_images": len(held_out), "floor": floor["swd_mean"],
            "face_floor": {key: floor[key] for key in ("face_fd", "face_landmark_fd")},
            "runs": [{"sampler": sampler, "steps": steps, "eta": eta, "swd_mean": swd, **face_results[sampler, steps, eta]}
                     for (sampler, steps, eta), swd in results.items()]}, indent=1) + "\n")
    if ("dpm++", 20, 0.0) in results and ("ddpm", 1000, 0.0) in results:
        print(f"dpm++_20_vs_ddpm_1000 {results['dpm++', 20, 0.0] / results['ddpm', 1000, 0.0]:.3f}")


if __name__ == "__main__":
    main()
