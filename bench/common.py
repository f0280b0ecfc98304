"""Helpers shared by the benchmark scripts: the recipe models, sample scoring, timing and peak memory.

The recipes' flagfiles are read through train.py's own flag definitions (`keras_ddpm.cli`), so a benchmark
builds exactly the model that `python train.py --flagfile=...` trains.
"""

import argparse
import os
import pathlib
import resource
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not

RECIPES = {
    "cpu": REPO / "flags" / "celeba32_cpu.flags",  # 32x32, 2.2M parameters, precision auto
    "cpu64": REPO / "flags" / "celeba64_cpu.flags",  # 64x64, the CPU recipe with one more level
    "gpu_recipe": REPO / "celeba.flags",  # 64x64, 35.7M parameters (DDPM's CelebA-HQ-like U-Net)
}


def recipe_configs(name: str):
    """(ModelConfig, TrainConfig) of the recipe `name` (a key of RECIPES), parsed as train.py parses it."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    from keras_ddpm.cli import configs_from_flagfile

    return configs_from_flagfile(RECIPES[name])


def median_seconds(function, repeats: int) -> float:
    """Median wall time of `repeats` calls of `function()` (robust to a stray slow call on a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_seconds() -> float:
    """CPU time this process has used so far (user + system, all threads)."""
    times = os.times()
    return times.user + times.system


def steal_seconds() -> float:
    """CPU time the hypervisor has given to others while this VM's CPUs wanted to run, summed over CPUs, since boot.

    The `steal` column of /proc/stat's `cpu` line (in USER_HZ ticks); 0 where the kernel does not report it.
    Steal over wall time is the number of cores the machine lost to its host in that window.
    """
    try:
        fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def held_out_faces(size: int, num_images: int, data_dir=None):
    """`num_images` held-out CelebA faces (the `validation` split) at `size`, and their face embedding."""
    from keras_ddpm.data import load_images
    from keras_ddpm.metrics import face

    held_out = load_images("celeba", "validation", size, num_images, data_dir=data_dir)
    return held_out, face.embed_faces(held_out)


def score_samples(samples, held_out, held_out_embedding) -> dict:
    """SWD (x1e3, each pyramid level's `swd_<height>` and their `swd_mean`) and the face metric (`face_rate`,
    `face_fd`, `face_landmark_fd`) of `samples` against held-out faces; scored on as many training faces, it is the
    real-vs-real floor."""
    from keras_ddpm import metrics
    from keras_ddpm.metrics import face

    return {**metrics.sliced_wasserstein_distance(samples, held_out), **face.score_faces(samples, held_out_embedding)}


def floor_scores(held_out, held_out_embedding, data_dir=None) -> dict:
    """`score_samples` of as many training faces as there are held-out ones: what a perfect model would score."""
    from keras_ddpm.data import load_images

    train = load_images("celeba", "train", held_out.shape[1], len(held_out), data_dir=data_dir)
    return score_samples(train, held_out, held_out_embedding)


class SampleReport:
    """Grids and scores of sample sets, printed as `key value` lines (`bench/autoguidance.py`,
    `bench/restart_sampling.py`).

    From `MIN_SCORED` images on, it prints the real-vs-real floors (`floor_swd_mean`, `floor_face_fd`,
    `floor_face_landmark_fd`) once, then `<name>_<score>` for each sample set; below that, grids only.
    """

    MIN_SCORED = 128  # below this, SWD and the face FD are mostly sampling noise

    def __init__(self, image_size: int, num_images: int, grid_dir: pathlib.Path, data_dir=None):
        self.grid_dir = grid_dir
        self.scored = num_images >= self.MIN_SCORED
        if self.scored:
            self.held_out, self.held_out_embedding = held_out_faces(image_size, num_images, data_dir)
            floor = floor_scores(self.held_out, self.held_out_embedding, data_dir)
            for key in ("swd_mean", "face_fd", "face_landmark_fd"):
                print(f"floor_{key} {floor[key]:.4f}", flush=True)
        else:
            print(f"# not scored: fewer than {self.MIN_SCORED} images (--num_images); grids only", flush=True)
        grid_dir.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, images, seconds: float, grid_name: str | None = None):
        """Print `<name>_seconds`, keep the first 64 images as <grid_dir>/<grid_name or name>.png, and score them."""
        from keras_ddpm import plots

        print(f"{name}_seconds {seconds:.0f}", flush=True)
        plots.save_image_grid(self.grid_dir / f"{grid_name or name}.png", images[:64])
        if self.scored:
            for key, value in score_samples(images, self.held_out, self.held_out_embedding).items():
                print(f"{name}_{key} {value:.4f}", flush=True)


# -- the sampler benchmarks (restart_sampling.py, edm_sampling.py, hybrid_sampling.py) -----------------------------

def sampler_bench_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every sampler benchmark takes: the model, the seeds, the scoring and the grids."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=pathlib.Path, default=pathlib.Path("savedmodel"),
                        help="an export or a run directory (unconditional)")
    parser.add_argument("--checkpoint_step", type=int, default=None, help="a run's checkpoint (default: the newest)")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--precision", default=None, help="a run directory's dtype policy (default float32)")
    parser.add_argument("--data_dir", default=None, help="CelebA folder (default: CELEBA_DIR)")
    parser.add_argument("--grid_dir", type=pathlib.Path, required=True, help="where the 64-image grids go")
    return parser


def parse_sampler_bench_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.num_images < 1 or args.batch_size < 1:
        parser.error(f"--num_images and --batch_size must be at least 1, got {args.num_images} and {args.batch_size}.")
    return args


class CompiledSampler:
    """What `generate_in_batches` needs of a `Generator`: a compiled f(seeds int64 [B]) -> uint8 images."""

    def __init__(self, sample, max_batch_size: int | None):
        self._sample, self.max_batch_size = sample, max_batch_size

    def generate(self, seeds, labels=None):
        import tensorflow as tf

        return self._sample(tf.constant(seeds, tf.int64)).numpy()


def compare_samplers(args: argparse.Namespace, samplers_to_compile):
    """Draw `args.num_images` images with each sampler and report them (`SampleReport`), printing
    `<name>_network_calls` first. `samplers_to_compile(generator)` yields (name, network_calls, compile) for the
    unconditional model `args.model`; `compile()` returns f(seeds) -> uint8 images, traced within `_seconds`."""
    from keras_ddpm.generation import generate_in_batches
    from keras_ddpm.runs import load_generator

    generator = load_generator(args.model, args.checkpoint_step, args.precision)
    if generator.num_classes:
        raise SystemExit(f"{args.model} is a conditional model; this benchmark samples unconditional ones.")
    report = SampleReport(generator.image_shape[0], args.num_images, args.grid_dir, args.data_dir)
    for name, network_calls, compile_sampler in samplers_to_compile(generator):
        print(f"{name}_network_calls {network_calls}", flush=True)
        start = time.perf_counter()
        images = generate_in_batches(CompiledSampler(compile_sampler(), generator.max_batch_size), args.num_images,
                                     args.batch_size, seed=args.seed, verbose=False)
        report.add(name, images, time.perf_counter() - start, grid_name=f"{name}_s{args.seed}")
