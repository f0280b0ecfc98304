"""Export a training run's checkpoint for TF Serving.

`python export.py --model=runs/celeba32 --export_dir=exports/celeba32`

train.py exports a run's last weights to `<run>/savedmodel/1` when it finishes. This exports any checkpoint of a
run (`--checkpoint_step`, default the newest) into a base folder of your choice, also while the run trains: it
only reads the run. `--model` may also be an export (one whose metadata records its model config): its network is
exported again with other sampling defaults, e.g. `python export.py --model=savedmodel --export_dir=savedmodel
--sampler=edm --eta=1`, which is how the shipped model got EDM's sampler after its run directory was gone.

The export samples with the run's (or the source export's) sampler, steps and eta unless `--sampler`, `--steps` or
`--eta` say otherwise (another sampler takes its own steps and eta 0). Its network computes in float32 unless
`--precision` names another policy (an export's seeds give the images of the policy it was exported in). An
existing version folder is replaced atomically: a failed export leaves it as it was. `--export_dir=savedmodel`
replaces the shipped model.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from keras_ddpm import cli  # noqa: E402
from keras_ddpm.config import AUTO_PRECISION, PRECISIONS, SAMPLERS  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "The training run directory to export from, or an export to export again with "
                    "other sampling defaults.", required=True)
flags.DEFINE_integer("checkpoint_step", None, "Export the run's checkpoint of this step, not the newest.")
flags.DEFINE_string("export_dir", None, "The model's base folder (TF Serving's model_base_path).", required=True)
flags.DEFINE_integer("version", 1, "The version folder written in --export_dir (replaced if it exists).")
flags.DEFINE_enum("precision", "float32", list(PRECISIONS),
                  f"The dtype policy the exported network computes in ({AUTO_PRECISION}). The shipped models are "
                  "float32.")
flags.DEFINE_enum("sampler", None, list(SAMPLERS), "The export's default sampler; default: the run's --export_sampler "
                  "(or the source export's).")
flags.DEFINE_integer("steps", None, "The export's default number of sampling steps; default: the run's "
                     "--export_steps (or the source export's) for its sampler, else the sampler's own (T ddpm, "
                     "50 ddim, 20 dpm++, 199 edm).")
flags.DEFINE_float("eta", None, "The export's default eta in [0, 1]; default: the run's --export_eta (or the source "
                   "export's) for its sampler, else 0.")
flags.DEFINE_integer("max_batch_size", None, "Most seeds one request may hold; default: the run's "
                     "--export_max_batch (or the source export's).")
flags.DEFINE_boolean("traceback", False, "Show the full traceback on errors.")


def main(argv):
    with cli.script_main("export.py", argv, FLAGS.traceback):
        import pathlib

        from keras_ddpm import files
        from keras_ddpm.errors import NotOurSavedModelError
        from keras_ddpm.export import find_version_dir, read_metadata
        from keras_ddpm.precision import resolve_precision
        from keras_ddpm.runs import export_run, load_run, read_run_config, reexport

        run_dir, export_dir = pathlib.Path(FLAGS.model), pathlib.Path(FLAGS.export_dir)
        if (export_dir / "saved_model.pb").exists():
            raise ValueError(f"--export_dir={export_dir} is a version folder; give its parent, the base folder "
                             "that holds the numbered versions (TF Serving's model_base_path).")
        files.check_writable(export_dir, create=False)  # before loading and tracing, which take a while
        policy, _ = resolve_precision(FLAGS.precision)
        sampling = dict(sampler=FLAGS.sampler, steps=FLAGS.steps, eta=FLAGS.eta, max_batch_size=FLAGS.max_batch_size)
        if (run_dir / "config.json").is_file():
            model_config, train_config = read_run_config(run_dir)
            model, _ = load_run(run_dir, FLAGS.checkpoint_step, policy)
            step = model.metadata["training_steps"]
            version_dir = export_run(model, export_dir, model_config, train_config, step, FLAGS.version, **sampling)
            source = f"ckpt-{step} of {run_dir}"
        else:
            try:
                find_version_dir(run_dir)
            except (FileNotFoundError, NotOurSavedModelError):
                raise ValueError(f"--model={run_dir} is neither a training run directory (no config.json) nor an "
                                 "export (no saved_model.pb): pass a run directory, or an export to export it "
                                 "again with other sampling defaults.") from None
            if FLAGS.checkpoint_step is not None:
                raise ValueError(f"--model={run_dir} is no run directory (it has no config.json), so it has no "
                                 "checkpoints: drop --checkpoint_step to export that export again.")
            version_dir = reexport(run_dir, export_dir, FLAGS.version, precision=policy, **sampling)
            source = f"the network of the export {run_dir}"
        metadata = read_metadata(version_dir)
        print(f"Wrote {version_dir}: {source}, {metadata['sampler']} with {metadata['steps']} steps "
              f"(eta {metadata['eta']:g}) by default, network in {metadata['dtype_policy']}.")
        served = find_version_dir(export_dir)
        if served != version_dir:
            print(f"Note: {export_dir} also holds version {served.name}, which TF Serving and sample.py "
                  f"--model={export_dir} use; sample this one with --model={version_dir}.")
        else:
            print(f"Try it: python sample.py --model={export_dir}")


if __name__ == "__main__":
    sys.exit(app.run(main))
