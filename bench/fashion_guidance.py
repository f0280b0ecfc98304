"""Class accuracy and diversity of a conditional Fashion-MNIST model across classifier-free guidance scales.

    python bench/fashion_guidance.py --model=savedmodel/fashion_mnist --data_dir=../shared/data/fashion_mnist \
        [--guidance 1 2 3 5] [--samples_per_class 50] [--plot docs/fashion_guidance.png] [--grid_dir docs]

1. Trains a small CNN (`keras_ddpm/metrics/classifier.py`) on the real training split of the IDX files (never the
   held-out split; `keras_ddpm.data.fashion_mnist.split_examples` decides both) and measures it on the held-out split.
2. For each guidance scale w, draws `samples_per_class` images of every class from the same seeds and reports
   the fraction the CNN puts in the requested class, the SWD of each class's samples against the held-out real
   images of that class (mean over classes), and the mean pairwise distance within a class (diversity).
3. Real-image references: the same SWD and pairwise distance for real training images against held-out ones.

Prints `key value` lines:

    classifier_train_images / classifier_held_out_images / classifier_held_out_accuracy
    classifier_seconds          training (or, with an existing --classifier file, loading) and scoring the CNN
    real_class_swd              SWD x1e3 of `samples_per_class` real training images of a class vs the held-out
                                images of that class, mean over classes: the floor a perfect model would reach
    real_pairwise_distance      mean RMS pixel distance (0-1 scale) between held-out images of one class
    w<w>_class_accuracy         fraction of samples the CNN puts in the class asked for
    w<w>_class_accuracy_<k>     the same for class k
    w<w>_class_swd / w<w>_pairwise_distance / w<w>_seconds (sampling time)

`--grid_dir` writes `fashion_w<w>.png` (a row per class, the first 10 samples of each) and `fashion_real.png`
(held-out real images, a row per class); `--plot` draws accuracy against diversity and SWD against w.
"""

import argparse
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402  (puts the repository on sys.path)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_ddpm.metrics import classifier as judge  # noqa: E402
from keras_ddpm import files, metrics, plots  # noqa: E402
from keras_ddpm.data import fashion_mnist  # noqa: E402
from keras_ddpm.generation import generate_in_batches  # noqa: E402
from keras_ddpm.runs import load_generator  # noqa: E402

DEFAULT_DATA_DIR = common.REPO.parent / "shared" / "data" / "fashion_mnist"
GRID_COLUMNS = 10
SWD_OPTIONS = dict(min_resolution=14)  # 28x28 images: two pyramid levels, 28 and 14


def trained_classifier(train_images, train_labels, path: pathlib.Path | None, epochs: int) -> keras.Model:
    """The judging CNN: loaded from `path` when it exists, else trained (and saved there when given)."""
    if path and path.exists():
        return keras.models.load_model(path)
    classifier = judge.train_classifier(train_images, train_labels, len(fashion_mnist.CLASS_NAMES), epochs=epochs)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        classifier.save(path)
    return classifier


def per_class_swd(images, labels, reference_images, reference_labels) -> float:
    """SWD of each class's images against the reference images of the same class, averaged over classes."""
    distances = [
        metrics.sliced_wasserstein_distance(images[labels == k], reference_images[reference_labels == k],
                                            **SWD_OPTIONS)["swd_mean"]
        for k in np.unique(labels)
    ]
    return float(np.mean(distances))


def per_class_pairwise_distance(images, labels) -> float:
    return float(np.mean([judge.mean_pairwise_distance(images[labels == k]) for k in np.unique(labels)]))


def first_of_each_class(images, labels, count: int) -> np.ndarray:
    """`count` images of class 0, then of class 1, ...: a grid with `count` columns has a row per class."""
    return np.concatenate([images[labels == k][:count] for k in np.unique(labels)])


def plot_sweep(results: dict, classifier_accuracy: float, real_distance: float, real_swd: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guidances = sorted(results)
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4), dpi=110)
    distances = [results[w]["pairwise_distance"] for w in guidances]
    accuracies = [results[w]["class_accuracy"] for w in guidances]
    left.plot(distances, accuracies, "o-")
    for w, x, y in zip(guidances, distances, accuracies):
        left.annotate(f"w={w:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    left.axhline(classifier_accuracy, color="gray", linestyle="--", label="classifier on real held-out")
    left.axvline(real_distance, color="gray", linestyle=":", label="real diversity")
    left.set_xlabel("mean pairwise distance within a class")
    left.set_ylabel("class accuracy of samples")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.plot(guidances, [results[w]["class_swd"] for w in guidances], "o-")
    right.axhline(real_swd, color="gray", linestyle="--", label="real vs real (floor)")
    right.set_xlabel("guidance w")
    right.set_ylabel("per-class SWD x1e3")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    figure.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="SavedModel folder or run directory of a conditional model")
    parser.add_argument("--data_dir", type=pathlib.Path, default=DEFAULT_DATA_DIR, help="folder of the IDX files")
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--samples_per_class", type=int, default=50)
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"], default=None, help="default: the model's")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--classifier_epochs", type=int, default=20)
    parser.add_argument("--classifier", type=pathlib.Path, default=None,
                        help="load the judging CNN from this .keras file, or train it and save it there")
    parser.add_argument("--plot", type=pathlib.Path, default=None)
    parser.add_argument("--grid_dir", type=pathlib.Path, default=None)
    parser.add_argument("--samples_npz", type=pathlib.Path, default=None, help="save every sample and label here")
    args = parser.parse_args()

    train_images, train_labels = fashion_mnist.split_examples(args.data_dir, "train")
    held_images, held_labels = fashion_mnist.split_examples(args.data_dir, "validation")
    start = time.perf_counter()
    classifier = trained_classifier(train_images, train_labels, args.classifier, args.classifier_epochs)
    classifier_accuracy = judge.accuracy(classifier, held_images, held_labels)
    print(f"classifier_train_images {len(train_images)}\nclassifier_held_out_images {len(held_images)}\n"
          f"classifier_held_out_accuracy {classifier_accuracy:.4f}\n"
          f"classifier_seconds {time.perf_counter() - start:.0f}", flush=True)
    real_train = first_of_each_class(train_images, train_labels, args.samples_per_class)
    real_train_labels = np.repeat(np.unique(train_labels), args.samples_per_class)
    real_swd = per_class_swd(real_train, real_train_labels, held_images, held_labels)
    real_distance = per_class_pairwise_distance(held_images, held_labels)
    print(f"real_class_swd {real_swd:.2f}\nreal_pairwise_distance {real_distance:.4f}", flush=True)
    if args.grid_dir:
        plots.save_image_grid(args.grid_dir / "fashion_real.png",
                              first_of_each_class(held_images, held_labels, GRID_COLUMNS), columns=GRID_COLUMNS)

    generator = load_generator(args.model)
    labels = np.repeat(np.arange(len(fashion_mnist.CLASS_NAMES)), args.samples_per_class)
    results, saved = {}, {}
    for w in args.guidance:
        start = time.perf_counter()
        samples = generate_in_batches(generator, len(labels), args.batch_size, seed=0, verbose=False, labels=labels,
                                      guidance=w, sampler=args.sampler, steps=args.steps)
        seconds = time.perf_counter() - start
        seen = judge.predict_classes(classifier, samples)
        results[w] = dict(class_accuracy=float(np.mean(seen == labels)),
                          class_swd=per_class_swd(samples, labels, held_images, held_labels),
                          pairwise_distance=per_class_pairwise_distance(samples, labels))
        per_class = "\n".join(f"w{w:g}_class_accuracy_{k} {np.mean(seen[labels == k] == k):.2f}" for k in range(10))
        print(f"w{w:g}_class_accuracy {results[w]['class_accuracy']:.4f}\n{per_class}\n"
              f"w{w:g}_class_swd {results[w]['class_swd']:.2f}\n"
              f"w{w:g}_pairwise_distance {results[w]['pairwise_distance']:.4f}\nw{w:g}_seconds {seconds:.0f}", flush=True)
        saved[f"w{w:g}"] = samples
        if args.grid_dir:
            plots.save_image_grid(args.grid_dir / f"fashion_w{w:g}.png",
                                  first_of_each_class(samples, labels, GRID_COLUMNS), columns=GRID_COLUMNS)
        if args.plot:  # redrawn after every scale, so a long sweep shows its progress
            plot_sweep(results, classifier_accuracy, real_distance, real_swd, args.plot)
    if args.samples_npz:
        files.save_npz(args.samples_npz, labels=labels, **saved)


if __name__ == "__main__":
    main()
