"""Train a diffusion model: `python train.py --flagfile=celeba.flags [--output_dir=runs/celeba64]`.

Rerunning the same command resumes from the run directory's last checkpoint.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from keras_ddpm import cli  # noqa: E402

FLAGS = flags.FLAGS
# One flag per field of ModelConfig and TrainConfig, with the field's default and help text (keras_ddpm/config.py).
cli.define_train_flags(FLAGS)


def main(argv):
    with cli.script_main("train.py", argv, FLAGS.traceback):
        from keras_ddpm.training import train

        model_config, train_config = cli.configs_from_flags(FLAGS)
        train(model_config, train_config, FLAGS.output_dir)
        written = "samples/, log.csv, loss.png" + (", savedmodel/1" if train_config.export else "")
        print(f"Finished: {FLAGS.output_dir} ({written}).")


if __name__ == "__main__":
    sys.exit(app.run(main))
