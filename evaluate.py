"""Measure a model: `python evaluate.py --data_dir=../shared/data/celeba` prints SWD and the NLL bound of `savedmodel/`.

`--metrics=swd,kid,fid,nll` adds FID and KID (they need the InceptionV3 ImageNet weights: internet, or
`--inception_weights=path.h5`); `face` asks a pretrained face network (MTCNN, whose weights ship in the
`mtcnn` package, so it works offline) whether the samples hold together as faces (`face_rate`, `face_fd`,
`face_landmark_fd`, each next to the real faces' value); `nn` is the memorisation check (distance of samples
to their nearest training images next to that of held-out faces; `--nn_png` shows them). `--model` also takes
a training run directory; `--samples_npz` scores images written earlier by `sample.py --save_npz` instead of
drawing new ones. The results are printed as a table and written as JSON (`--output_json`, default next to
the model). A metric that cannot run is reported as failed and the others are still computed; the exit
status is then 1, as it is for bad flags or missing data.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from keras_ddpm import cli  # noqa: E402
from keras_ddpm.config import CROPS, DATASETS  # noqa: E402

FLAGS = flags.FLAGS
cli.define_model_flags(__file__, "evaluate")  # --model, --checkpoint_step, --precision, --sampler, --steps, --eta, ...
flags.DEFINE_list("metrics", ["swd", "nll"], "Metrics to compute: swd, fid, kid, face, nll, nn (nearest training "
                  "images; fid and kid need InceptionV3 weights; face uses MTCNN, offline).")
# Real images
flags.DEFINE_enum("dataset", None, DATASETS, "Real images; default: the model's training dataset, else celeba.")
flags.DEFINE_string("data_dir", None,
                    "CelebA image folder (or its parent; default: the run's, else CELEBA_DIR); TFDS data dir.")
flags.DEFINE_enum("split", "validation", ["train", "validation", "test"], "Split the real images come from.")
flags.DEFINE_enum("crop", None, CROPS, "CelebA crop box; default: the run's, else celeba64.")
# Samples
flags.DEFINE_integer("num_images", 2000, "Samples and real images for SWD, FID, KID and face.")
flags.DEFINE_string("samples_npz", None, "Score these images (an .npz from sample.py --save_npz) instead of sampling.")
flags.DEFINE_integer("seed", 0, "Sample i uses seed + i; also seeds SWD and the NLL's draws.")
flags.DEFINE_integer("batch_size", 64, "Images per sampling, Inception and NLL batch.")
# Metrics
flags.DEFINE_string("inception_weights", "imagenet",
                    "InceptionV3 weights for FID/KID: 'imagenet' (download) or a notop .h5 file.")
flags.DEFINE_string("stats_cache", None, "Folder caching the real images' Inception statistics.")
flags.DEFINE_integer("nll_images", 256, "Real images scored by the NLL bound (each costs nll_draws + 1 network calls).")
flags.DEFINE_integer("nll_draws", 50, "Timesteps drawn per image for the NLL bound (stratified over t).")
# Output
flags.DEFINE_string("nn_png", None,
                    "With --metrics=...,nn: write 16 samples beside their nearest training images here.")
flags.DEFINE_integer("nn_train_images", 20000,
                     "Training images the nn metric searches (the first N of the train split).")
flags.DEFINE_string("output_json", None, "Where to write the results; default: <run>/evaluation.json "
                    "(evaluation-ckpt-<step>.json with --checkpoint_step) or next to the SavedModel.")
flags.DEFINE_boolean("traceback", False, "Show the full traceback on errors.")


def main(argv):
    with cli.script_main("evaluate.py", argv, FLAGS.traceback):
        from keras_ddpm import evaluation
        from keras_ddpm.files import check_output_file, write_json

        metrics = evaluation.parse_metrics(FLAGS.metrics)
        model = FLAGS.model or None
        output_json = FLAGS.output_json or evaluation.default_output_path(model, FLAGS.checkpoint_step)
        check_output_file(output_json)
        samples = evaluation.load_samples_npz(FLAGS.samples_npz) if FLAGS.samples_npz else None
        if samples is not None and "nll" not in metrics and not os.path.exists(FLAGS.model):
            model = None  # scoring given samples needs no model
        results = evaluation.evaluate(
            model, checkpoint_step=FLAGS.checkpoint_step, precision=FLAGS.precision,
            samples=samples, dataset=FLAGS.dataset,
            data_dir=FLAGS.data_dir, split=FLAGS.split,
            crop=FLAGS.crop, metrics=metrics, num_images=FLAGS.num_images, sampler=FLAGS.sampler, steps=FLAGS.steps,
            eta=FLAGS.eta, churn_sigmas=FLAGS.edm_churn_sigmas, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
            inception_weights=FLAGS.inception_weights,
            stats_cache=FLAGS.stats_cache, nll_images=FLAGS.nll_images, nll_draws=FLAGS.nll_draws, nn_png=FLAGS.nn_png,
            nn_train_images=FLAGS.nn_train_images,
        )
        if FLAGS.samples_npz:
            results["samples"]["source"] = FLAGS.samples_npz
        print(evaluation.format_table(results))
        write_json(output_json, results)
        print(f"Wrote {output_json}.")
        if results["failed"]:
            raise ValueError(f"could not compute {', '.join(results['failed'])} (see the table); "
                             f"the other results are in {output_json}.")


if __name__ == "__main__":
    sys.exit(app.run(main))
