"""Generate images: `python sample.py` draws 64 faces from the shipped `savedmodel/` into samples/grid.png.

`--model` also takes a training run directory. `--process_strip` adds the forward (noising) and reverse
(denoising) process figures.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from keras_ddpm import cli  # noqa: E402
from keras_ddpm.config import SPACINGS  # noqa: E402

FLAGS = flags.FLAGS
cli.define_model_flags(__file__, "sample")  # --model, --checkpoint_step, --precision, --sampler, --steps, --eta, ...
flags.DEFINE_integer("num_images", 64, "How many images.")
flags.DEFINE_enum("spacing", None, list(SPACINGS), "Timestep spacing; default per sampler.")
flags.DEFINE_integer("seed", 0, "Image i uses seed + i.")
flags.DEFINE_integer("label", None, "Class label for conditional models (num_classes = unconditional).")
flags.DEFINE_float("guidance", 1.0, "Classifier-free guidance scale for conditional models.")
flags.DEFINE_integer("batch_size", 64, "Images per sampling batch (bounds memory).")
flags.DEFINE_string("output", "samples/grid.png", "Where to write the image grid.")
flags.DEFINE_string("image_dir", None, "Also write every image as a PNG into this folder.")
flags.DEFINE_string("save_npz", None, "Also save the uint8 images [N, H, W, C] under key 'images' in this .npz.")
flags.DEFINE_boolean("process_strip", False, "Write forward.png and reverse.png process figures next to --output.")
flags.DEFINE_string("data_dir", None,
                    "CelebA folder for the forward-process figure (default: the CELEBA_DIR variable).")
flags.DEFINE_boolean("traceback", False, "Show the full traceback on errors.")


def describe(generator) -> str:
    meta = generator.metadata
    fields = ["dataset", "image_size", "channels", "num_classes", "schedule", "objective", "sampler", "steps", "eta",
              "edm_churn_sigmas", "training_steps", "keras_ddpm_version", "exported_at"]
    return "\n".join(f"  {key}: {meta[key]}" for key in fields if meta.get(key) is not None)


def main(argv):
    with cli.script_main("sample.py", argv, FLAGS.traceback):
        import pathlib

        from keras_ddpm import files, plots
        from keras_ddpm.generation import generate_in_batches, labels_in_turn
        from keras_ddpm.runs import load_generator, sampling_precision

        output = files.check_output_file(FLAGS.output)  # before sampling, which can take minutes
        if FLAGS.save_npz:
            files.check_output_file(FLAGS.save_npz)
        if FLAGS.image_dir and pathlib.Path(FLAGS.image_dir).is_file():
            raise NotADirectoryError(f"--image_dir={FLAGS.image_dir} is a file; give a folder.")
        precision, reason = sampling_precision(FLAGS.model, FLAGS.precision)
        generator = load_generator(FLAGS.model, FLAGS.checkpoint_step, precision)
        print(f"Model {FLAGS.model}:\n{describe(generator)}")
        print(f"  precision: {precision} ({reason})")
        options = dict(sampler=FLAGS.sampler, steps=FLAGS.steps, eta=FLAGS.eta, spacing=FLAGS.spacing,
                       churn_sigmas=FLAGS.edm_churn_sigmas, guidance=FLAGS.guidance, labels=FLAGS.label)
        if FLAGS.label is None:
            options["labels"] = labels_in_turn(FLAGS.num_images, generator.num_classes)
        images = generate_in_batches(generator, FLAGS.num_images, FLAGS.batch_size, FLAGS.seed, **options)
        plots.save_image_grid(output, images)
        print(f"Wrote {output} ({len(images)} images, {images.shape[1]}x{images.shape[2]}).")
        if FLAGS.image_dir:
            for index, image in enumerate(images):
                plots.save_png(pathlib.Path(FLAGS.image_dir) / f"{FLAGS.seed + index:06d}.png", image)
            print(f"Wrote {len(images)} PNGs to {FLAGS.image_dir}.")
        if FLAGS.save_npz:
            files.save_npz(FLAGS.save_npz, images=images)
            print(f"Wrote {FLAGS.save_npz} (images {images.shape} uint8).")
        if FLAGS.process_strip:
            for path in plots.process_figures(generator, output.parent, FLAGS.data_dir, seed=FLAGS.seed, **options):
                print(f"Wrote {path}.")


if __name__ == "__main__":
    sys.exit(app.run(main))
