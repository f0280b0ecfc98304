"""Evaluate a trained model: SWD, FID, KID and face metric of its samples against held-out faces, and the NLL bound.

`evaluate()` is what `python evaluate.py` runs:

    results = evaluate("runs/celeba64", metrics=("swd", "nll"), num_images=2000)  # a trained run directory
    print(format_table(results))

The model is a training run directory or a SavedModel folder (`keras_ddpm.runs.load_generator`). The
real images are the first images of the dataset's held-out split, cropped and resized like the training data
(`keras_ddpm.data.load_images`). Samples are drawn from the seeds `seed, seed + 1, ...` (image i is the same
whatever the batch size), or taken from an `.npz` written by `sample.py --save_npz`.

A metric that cannot run, such as FID and KID without the InceptionV3 weights, is reported as failed with the
reason, and the other metrics are still computed; bad arguments and missing data raise before any work starts.
"""

import contextlib
import datetime
import os
import pathlib
import time
import zipfile
from typing import Callable

import numpy as np
import tensorflow as tf

from keras_ddpm import __version__
from keras_ddpm import metrics as metric_functions
from keras_ddpm.metrics import face as face_metric
from keras_ddpm.data import load_images
from keras_ddpm.errors import NotOurSavedModelError
from keras_ddpm.export import find_version_dir, read_metadata
from keras_ddpm.generation import (Generator, generate_in_batches, labels_in_turn, resolve_churn_sigmas,
                                   sampling_defaults)
from keras_ddpm.runs import load_generator, read_run_config, sampling_precision

METRICS = ("swd", "fid", "kid", "nll", "nn", "face")
DEFAULT_METRICS = ("swd", "nll")  # the two that need no pretrained weights at all
SAMPLE_METRICS = ("swd", "fid", "kid", "face", "nn")
# What a metric may fail with and still let the others run: missing weights or files, unusable inputs.
METRIC_FAILURES = (RuntimeError, OSError, ValueError)


def parse_metrics(names) -> tuple[str, ...]:
    """Metric names from a list or a comma-separated string, checked, duplicates dropped, order kept."""
    if isinstance(names, str):
        names = names.split(",")
    names = tuple(dict.fromkeys(name.strip().lower() for name in names if name.strip()))
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"Unknown or no metrics {unknown or list(names)}; choose from {', '.join(METRICS)}.")
    return names


def model_defaults(path) -> dict:
    """`dataset`, `data_dir`, `crop` and `image_shape` of a model, from a run's config.json or a SavedModel's metadata.

    Reads JSON only (no model is loaded); returns what it finds, an empty dict for a folder that is neither. A
    run whose config.json cannot be read raises ValueError (see `runs.read_run_config`).
    """
    path = pathlib.Path(path)
    if (path / "config.json").is_file():
        model_config, train_config = read_run_config(path)
        image_shape = (model_config.image_size, model_config.image_size, model_config.channels)
        return {**{key: getattr(train_config, key) for key in ("dataset", "data_dir", "crop")}, "image_shape": image_shape}
    try:
        metadata = read_metadata(find_version_dir(path))
    except (FileNotFoundError, NotOurSavedModelError):
        return {}
    return {"dataset": metadata.get("dataset"), "image_shape": (*metadata["image_size"], metadata["channels"])}


def default_output_path(model_path=None, checkpoint_step: int | None = None) -> pathlib.Path:
    """Where the JSON goes by default: `<run>/evaluation.json` (`evaluation-ckpt-<step>.json` for one checkpoint),
    next to a SavedModel folder, else `evaluation.json`."""
    if model_path is None:
        return pathlib.Path("evaluation.json")
    path = pathlib.Path(model_path)
    if (path / "config.json").is_file():
        return path / ("evaluation.json" if checkpoint_step is None else f"evaluation-ckpt-{checkpoint_step}.json")
    export_folder = path.parent if path.name.isdigit() else path  # a version folder such as savedmodel/1
    return export_folder.parent / "evaluation.json"


def load_samples_npz(path) -> np.ndarray:
    """The uint8 images [N, H, W, C] stored under the key `images` by `sample.py --save_npz`."""
    try:
        stored = np.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"No samples file {path}; write one with sample.py --save_npz={path}.") from None
    except (ValueError, OSError, zipfile.BadZipFile):  # numpy takes what is not an archive for a pickle
        stored = None
    if not isinstance(stored, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not an .npz archive; write one with sample.py --save_npz={path}.")
    with stored:
        if "images" not in stored:
            raise ValueError(f"{path} has no 'images' array (found {sorted(stored.files)}); write it with "
                             f"sample.py --save_npz.")
        images = stored["images"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: 'images' must be uint8 [N, H, W, C], got {images.dtype} {images.shape}.")
    return images


def unconditional_output(generator: Generator) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """`output(x_t, t)`: the generator's raw network output, for the null label if the model is conditional.

    The NLL of a conditional model is thus that of its unconditional model p(x).
    """
    null_label = generator.num_classes

    def output(x_t, t):
        labels = [tf.fill(tf.shape(t), tf.constant(null_label, tf.int32))] if null_label else []
        return generator.network_output([x_t, t, *labels])

    return output


def nearest_neighbours(queries: np.ndarray, references: np.ndarray, chunk_size: int = 4096
                       ) -> tuple[np.ndarray, np.ndarray]:
    """For each query image, the index of and the RMS pixel distance to its closest reference image.

    The memorisation check: a sample whose nearest training image is (almost) itself is a copy. Distances
    are Euclidean over all pixel values in [0, 255], divided by sqrt(H W C) so they read as an RMS error.

    Args:
        queries, references: uint8 [N, H, W, C] and [M, H, W, C] of the same image shape.
        chunk_size: reference images compared at once.

    Returns:
        `(indices int64 [N], distances float64 [N])`.
    """
    queries, references = np.asarray(queries), np.asarray(references)
    if queries.shape[1:] != references.shape[1:] or queries.ndim != 4:
        raise ValueError(f"queries {queries.shape} and references {references.shape} must be [N, H, W, C] "
                         f"images of one shape.")
    indices = np.zeros(len(queries), np.int64)
    closest = np.full(len(queries), np.inf)
    for start in range(0, len(references), chunk_size):  # bounded memory for large training sets
        distances = metric_functions.rms_distances(queries, references[start : start + chunk_size])
        best = distances.argmin(axis=1)
        best_distances = distances[np.arange(len(queries)), best]
        better = best_distances < closest
        indices[better], closest[better] = start + best[better], best_distances[better]
    return indices, closest


def memorisation_check(samples, train_images, held_out_images, figure_path=None, num_shown: int = 16) -> dict:
    """Distances of samples to their nearest training images, next to those of held-out real images.

    A model that copies its training set puts samples much closer to a training image than unseen real
    faces are; one that generalises puts them about as far. The figure (if asked) shows the first
    `num_shown` samples in rows of 8, each row followed by the nearest training images.

    Returns:
        `{"sample_rms_median", "sample_rms_min", "held_out_rms_median", "held_out_rms_min", "num_samples",
        "num_held_out", "num_train_images"}`: RMS pixel distances on the 0-255 scale.
    """
    indices, sample_distances = nearest_neighbours(samples, train_images)
    _, held_out_distances = nearest_neighbours(held_out_images, train_images)
    if figure_path:
        from keras_ddpm.plots import process_strip, save_png

        shown = min(num_shown, len(samples))
        rows = []
        for start in range(0, shown, 8):
            rows += [samples[start : min(start + 8, shown)], train_images[indices[start : min(start + 8, shown)]]]
        rows = [row for row in rows if len(row) == len(rows[0])]  # the strip needs equal rows
        save_png(figure_path, process_strip(rows))
    return {
        "sample_rms_median": float(np.median(sample_distances)), "sample_rms_min": float(sample_distances.min()),
        "held_out_rms_median": float(np.median(held_out_distances)),
        "held_out_rms_min": float(held_out_distances.min()),
        "num_samples": len(samples), "num_held_out": len(held_out_images), "num_train_images": len(train_images),
    }


def _inception_cache_key(dataset, split, crop, data_dir, real_images, weights) -> str:
    """Everything the real images' Inception features depend on (see `metrics.cached_real_statistics`)."""
    source = data_dir or os.environ.get("CELEBA_DIR") or "default"
    if weights not in (None, "imagenet"):
        weights = f"{pathlib.Path(weights).name}-{os.path.getsize(weights)}"
    height, width, channels = real_images.shape[1:]
    return f"{dataset}_{split}_{crop}_{height}x{width}x{channels}_{len(real_images)}_{source}_{weights}"


def evaluate(
    model=None,
    *,
    checkpoint_step: int | None = None,
    precision: str | None = None,
    samples: np.ndarray | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "validation",
    crop: str | None = None,
    metrics=DEFAULT_METRICS,
    num_images: int = 2000,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    churn_sigmas=None,
    seed: int = 0,
    batch_size: int = 64,
    inception_weights: str | None = "imagenet",
    stats_cache: str | None = None,
    nll_images: int = 256,
    nll_draws: int = metric_functions.NLL_TIMESTEP_DRAWS,
    nn_png: str | None = None,
    nn_train_images: int = 20_000,
    verbose: bool = True,
) -> dict:
    """Compute sample-quality metrics and the NLL bound of a model; returns a JSON-serialisable dict.

    Args:
        model: a run directory or SavedModel folder (path), an object from `load_generator`, a
            `DiffusionModel`, or None when `samples` are given and NLL is not asked for.
        checkpoint_step: for a run directory, use its checkpoint of this step instead of the newest.
        precision: the dtype policy a run directory's network samples and scores in (default float32), or
            "auto"; a SavedModel samples in its own (see `keras_ddpm.runs.sampling_precision`).
        samples: uint8 [N, H, W, C] images made earlier (e.g. `load_samples_npz`); the first `num_images`
            are used. Default: draw `num_images` samples from the model.
        dataset, data_dir, crop: the real images; default: what the model was trained on (run config or
            SavedModel metadata), else CelebA with the `celeba64` crop from `CELEBA_DIR`.
        split: the held-out split the real images come from.
        metrics: names from `METRICS` (a list or "swd,nll"); `face` is `keras_ddpm.metrics.face.face_report`
            (MTCNN, weights from the installed `mtcnn` package).
        num_images: samples and real images for SWD, FID, KID and the face metric.
        sampler, steps, eta: how samples are drawn; default: the SavedModel's own sampler, step count and eta
            (DDIM, 50 steps, eta 0 for a run directory).
        churn_sigmas: EDM's churn band (S_tmin, S_tmax); default: the model's own (see `DiffusionModel.generate`).
        seed: sample i uses seed `seed + i`; also seeds the SWD projections and the NLL's draws.
        batch_size: images per sampling, Inception and NLL batch.
        inception_weights: "imagenet" (downloaded by Keras) or the path of the InceptionV3 notop `.h5`.
        stats_cache: folder caching the real images' Inception features, or None.
        nll_images: real images scored by the NLL bound (it costs `nll_draws + 1` network calls per image).
        nll_draws: timesteps drawn per image (see `keras_ddpm.metrics.variational_bound`).
        nn_png: with the `nn` metric, also write this figure: samples beside their nearest training images.
        nn_train_images: the `nn` metric searches the first this many training images (all of a small set).
        verbose: progress bars.

    Returns:
        `{"model", "dataset", "split", "image_shape", "samples": {how they were made}, "real_images",
        "metrics": {name: {key: value}}, "failed": {name: reason}, "seconds": {step: time}, ...}`.
    """
    names = parse_metrics(metrics)
    for argument, value in {"num_images": num_images, "batch_size": batch_size, "nll_images": nll_images,
                            "nll_draws": nll_draws, "nn_train_images": nn_train_images}.items():
        if value < 1:
            raise ValueError(f"{argument} must be at least 1, got {value}.")
    sample_metrics = [name for name in names if name in SAMPLE_METRICS]
    model_path = model if isinstance(model, (str, os.PathLike)) else None
    needs_model = "nll" in names or (bool(sample_metrics) and samples is None)
    if needs_model and model is None:
        raise ValueError("Pass a model (a run directory or SavedModel folder): NLL and drawing samples need one.")
    if checkpoint_step is not None and model_path is None:
        raise ValueError("checkpoint_step needs the model as a run directory path.")
    if precision is not None and model_path is None:
        raise ValueError(f"precision {precision!r} needs the model as a path.")
    if model_path is not None:  # a path: read its defaults, load it only when it must draw or score
        defaults = model_defaults(model_path)
        precision = sampling_precision(model_path, precision)[0]
        generator = load_generator(model_path, checkpoint_step, precision) if needs_model else None
    else:
        defaults = dict(model.metadata) if model is not None else {}
        generator = model
        precision = None  # whatever the caller built it with
    batch_size = min(batch_size, (generator.max_batch_size if generator is not None else None) or batch_size)  # an export's cap
    dataset = dataset or defaults.get("dataset") or "celeba"
    data_dir = data_dir or defaults.get("data_dir")
    crop = crop or defaults.get("crop") or "celeba64"
    model_shape = generator.image_shape if generator is not None else defaults.get("image_shape")  # None: no model given
    image_shape = tuple(model_shape or samples.shape[1:])
    if samples is not None:
        samples = np.asarray(samples)[:num_images]
        if tuple(samples.shape[1:]) != image_shape:
            raise ValueError(f"The samples are {samples.shape[1:]} images but the model {model_path or ''} makes "
                             f"{image_shape} ones; pass the model that made them (--model).")

    seconds, failed = {}, {}
    results = {
        "model": str(model_path) if model_path is not None else None, "checkpoint_step": checkpoint_step,
        "dataset": dataset, "split": split, "crop": crop, "data_dir": data_dir, "image_shape": list(image_shape),
        "metrics": {}, "failed": failed, "seconds": seconds,
        "keras_ddpm_version": __version__,
        "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with _timed(seconds, "real_images"):
        count = max(num_images if sample_metrics else 0, nll_images if "nll" in names else 0)
        real_images = load_images(dataset, split, image_shape[0], count, data_dir=data_dir, crop=crop,
                                  channels=image_shape[2])
    if tuple(real_images.shape[1:]) != image_shape:
        raise ValueError(f"{dataset} gives {real_images.shape[1:]} images but the model makes {image_shape} ones.")
    results["real_images"] = len(real_images[:num_images]) if sample_metrics else 0

    if sample_metrics:
        if samples is None:
            with _timed(seconds, "sampling"):
                samples, results["samples"] = _draw_samples(generator, num_images, sampler, steps, eta, churn_sigmas,
                                                            seed, batch_size, verbose)
                results["samples"]["precision"] = precision
        else:
            results["samples"] = {"source": "given", "num_images": len(samples), "num_requested": num_images}
            if len(samples) < num_images:
                print(f"Warning: scoring the {len(samples)} given samples, fewer than the {num_images} asked for.",
                      flush=True)
        _sample_metrics(results, sample_metrics, samples, real_images[:num_images], seed, batch_size,
                        inception_weights, stats_cache, (dataset, split, crop, data_dir), verbose)
    if "nn" in names:
        with _timed(seconds, "nn"), _failures_recorded(failed, "nn"):
            train_images = load_images(dataset, "train", image_shape[0], nn_train_images, data_dir=data_dir,
                                       crop=crop, channels=image_shape[2])
            results["metrics"]["nn"] = memorisation_check(samples, train_images, real_images[:num_images], nn_png)
    if "face" in names:
        _say(verbose, f"Face metric (MTCNN) of {len(samples)} samples, {len(real_images[:num_images])} held-out and as "
                      f"many training faces (the floor)")
        with _timed(seconds, "face"), _failures_recorded(failed, "face"):
            # The floor: as many training faces against the same held-out faces, what a perfect model would score.
            train_images = load_images(dataset, "train", image_shape[0], len(real_images[:num_images]),
                                       data_dir=data_dir, crop=crop, channels=image_shape[2])
            results["metrics"]["face"] = face_metric.face_report(samples, real_images[:num_images], train_images)

    if "nll" in names:
        _say(verbose, f"NLL bound on {len(real_images[:nll_images])} real images ({nll_draws + 1} network calls each)")
        with _timed(seconds, "nll"), _failures_recorded(failed, "nll"):
            results["metrics"]["nll"] = metric_functions.nll_bits_per_dim(
                unconditional_output(generator), generator.schedule, generator.objective, real_images[:nll_images],
                num_timestep_draws=nll_draws, batch_size=batch_size, seed=seed, verbose=verbose,
            )
    results["metrics"] = {name: results["metrics"][name] for name in names if name in results["metrics"]}
    return results


def _draw_samples(generator, num_images, sampler, steps, eta, churn_sigmas, seed, batch_size, verbose):
    """`num_images` samples from seeds `seed, seed + 1, ...` (classes in turn for a conditional model), and how."""
    sampler, steps, eta = sampling_defaults(generator, sampler, steps, eta)
    churn_sigmas = resolve_churn_sigmas(generator, churn_sigmas)
    labels = labels_in_turn(num_images, generator.num_classes)
    samples = generate_in_batches(generator, num_images, batch_size, seed, verbose, sampler=sampler, steps=steps,
                                  eta=eta, churn_sigmas=churn_sigmas, labels=labels)  # says how it samples when verbose
    made = {"source": "generated", "num_images": len(samples), "sampler": sampler, "steps": steps, "eta": eta,
            "seeds": [seed, seed + num_images - 1]}
    if sampler == "edm":
        made["edm_churn_sigmas"] = list(churn_sigmas)
    return samples, made


def _sample_metrics(results, names, samples, real_images, seed, batch_size, inception_weights, stats_cache,
                    real_description, verbose):
    """SWD, FID and KID of `samples` against `real_images`, into `results`."""
    seconds, failed = results["seconds"], results["failed"]
    if "swd" in names:
        with _timed(seconds, "swd"), _failures_recorded(failed, "swd"):
            results["metrics"]["swd"] = metric_functions.sliced_wasserstein_distance(samples, real_images, seed=seed)
    inception_metrics = [name for name in names if name in ("fid", "kid")]
    if not inception_metrics:
        return
    with _timed(seconds, "inception"), _failures_recorded(failed, *inception_metrics):
        inception = metric_functions.load_inception(inception_weights)

        _say(verbose, "InceptionV3 features of the real images, then of the samples")

        def real_features():
            return metric_functions.inception_features(real_images, inception, batch_size, verbose)

        if stats_cache:
            key = _inception_cache_key(*real_description, real_images, inception_weights)
            real = metric_functions.cached_real_statistics(stats_cache, key, real_features)
        else:
            features = real_features()
            real = metric_functions.RealStatistics(features, *metric_functions.feature_statistics(features))
        sample_features = metric_functions.inception_features(samples, inception, batch_size, verbose)
        if "fid" in inception_metrics:
            sample_statistics = metric_functions.feature_statistics(sample_features)
            fid = metric_functions.frechet_distance(*sample_statistics, real.mu, real.sigma)
            results["metrics"]["fid"] = {"fid": fid}
        if "kid" in inception_metrics:
            kid, kid_std = metric_functions.kid_from_features(sample_features, real.features, seed=seed)
            results["metrics"]["kid"] = {"kid": kid, "kid_std": kid_std}


def _say(verbose: bool, message: str):
    """A heading for the progress bar that follows."""
    if verbose:
        print(message, flush=True)


@contextlib.contextmanager
def _failures_recorded(failed: dict, *names: str):
    """Turn a METRIC_FAILURES exception into `failed[name] = reason` for each of `names`, and carry on."""
    try:
        yield
    except METRIC_FAILURES as error:
        for name in names:
            failed[name] = str(error).strip()


@contextlib.contextmanager
def _timed(seconds: dict, name: str):
    """Record the wall-clock seconds of the block as `seconds[name]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - start, 2)


def format_table(results: dict) -> str:
    """A plain-text table of `evaluate()`'s results, one metric value per row."""
    height, width, channels = results["image_shape"]
    lines = [f"Model {results['model'] or '(samples only)'} on {results['dataset']} {results['split']} "
             f"({height}x{width}x{channels})"]
    made = results.get("samples")
    if made:
        how = (f"drawn with {made['sampler']}, {made['steps']} steps, eta {made['eta']}, seeds {made['seeds'][0]}.."
               f"{made['seeds'][1]}" if made["source"] == "generated" else f"from {made['source']}")
        if made["num_images"] < made.get("num_requested", 0):
            how += f"; fewer than the {made['num_requested']} asked for"
        lines.append(f"  {made['num_images']} samples ({how}) vs {results['real_images']} real images")
    rows = []
    found = results["metrics"]
    if "swd" in found:
        rows += [(f"SWD x1e3, {key[4:]}px level" if key != "swd_mean" else "SWD x1e3, mean", f"{value:.2f}")
                 for key, value in found["swd"].items()]
    if "fid" in found:
        rows.append(("FID", f"{found['fid']['fid']:.2f}"))
    if "kid" in found:
        rows.append(("KID", f"{found['kid']['kid']:.5f} +- {found['kid']['kid_std']:.5f}"))
    if "face" in found:
        face = found["face"]
        rows.append(("Face rate, samples / held-out faces", f"{face['face_rate']:.3f} / {face['face_rate_real']:.3f}"))
        rows.append(("Face FD (O-Net), samples / real floor", f"{face['face_fd']:.3f} / {face['face_fd_real']:.3f}"))
        rows.append(("Face landmark FD, samples / real floor",
                     f"{face['face_landmark_fd']:.4f} / {face['face_landmark_fd_real']:.4f}"))
    if "nn" in found:
        nn = found["nn"]
        rows.append(("NN RMS distance to train, samples", f"median {nn['sample_rms_median']:.1f}, min "
                                                          f"{nn['sample_rms_min']:.1f} ({nn['num_samples']} samples)"))
        rows.append(("NN RMS distance to train, held-out", f"median {nn['held_out_rms_median']:.1f}, min "
                                                           f"{nn['held_out_rms_min']:.1f} ({nn['num_held_out']} real "
                                                           f"images; {nn['num_train_images']} train images)"))
    if "nll" in found:
        nll = found["nll"]
        rows.append(("NLL bound, bits/dim", f"{nll['bpd']:.3f} +- {nll['stderr']:.3f} ({nll['num_images']} images, "
                                            f"{nll['num_timestep_draws']} timestep draws)"))
        rows += [(f"  {part} term", f"{nll[f'{part}_bpd']:.3f}") for part in ("prior", "diffusion", "decoder")]
    reasons = {}  # FID and KID usually fail for the same reason: say it once
    for name, reason in results["failed"].items():
        reasons.setdefault(reason, []).append(name.upper())
    rows += [(", ".join(names), f"FAILED: {reason}") for reason, names in reasons.items()]
    label_width = max([len(label) for label, _ in rows] + [6])
    lines.append(f"{'metric':<{label_width}}  value")
    for label, value in rows:  # a long failure reason continues on indented lines
        lines.append(f"{label:<{label_width}}  " + value.replace("\n", "\n" + " " * (label_width + 2)))
    return "\n".join(lines)
