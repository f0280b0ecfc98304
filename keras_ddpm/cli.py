"""What the command-line scripts share: their flags, derived from the config dataclasses, and turning expected
failures into one clear line and a non-zero exit.

Importing this module loads none of the model, sampling or metric code (nor scipy): a script's flags and error
handler need only the config dataclasses and the exception classes.
"""

import contextlib
import dataclasses
import logging
import os
import sys
import typing

from absl import app, flags
from absl import logging as absl_logging

from keras_ddpm.config import AUTO_PRECISION, PRECISIONS, SAMPLERS, ModelConfig, TrainConfig
from keras_ddpm.errors import TrainingDiverged

# Failures that come from the user's input (flags, files, data), as opposed to bugs. TensorFlow's
# InvalidArgumentError (a bad request to a SavedModel) joins them when TensorFlow is loaded: see `user_errors`.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
               TrainingDiverged)


def user_errors() -> tuple[type[BaseException], ...]:
    """`USER_ERRORS`, plus TensorFlow's InvalidArgumentError once TensorFlow is loaded (only then can it occur)."""
    tensorflow = sys.modules.get("tensorflow")
    return USER_ERRORS + ((tensorflow.errors.InvalidArgumentError,) if tensorflow else ())


@contextlib.contextmanager
def report_errors(program: str, show_traceback: bool = False):
    """Print `program: error: <message>` and exit with status 1 on a user error (unless `show_traceback`)."""
    try:
        yield
    except Exception as error:
        if show_traceback or not isinstance(error, user_errors()):
            raise
        message = getattr(error, "message", None) or str(error)
        print(f"{program}: error: {message.strip()}", file=sys.stderr)
        print(f"{program}: (run with --traceback for details)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\n{program}: interrupted.", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def script_main(program: str, argv: list[str], show_traceback: bool = False):
    """How every script's `main` runs: no stray arguments, TensorFlow's chatter off, user errors as one line."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    quiet_logs()
    with report_errors(program, show_traceback):
        yield


def quiet_logs():
    """Keep TensorFlow's INFO chatter (checkpoint sharding, XLA) out of the scripts' output; ours stays."""
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # the logger tf.get_logger() returns
    # Parts of TensorFlow's saving code log through absl, and restore absl's verbosity (not a logger's level)
    # after silencing it, so set the verbosity. Our logger keeps INFO.
    if not flags.FLAGS["verbosity"].present:  # an explicit --verbosity wins
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("keras_ddpm").setLevel(logging.INFO)


# -- the flags of sample.py and evaluate.py -----------------------------------------------------------------

def define_model_flags(script_file: str, verb: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The flags that choose a model and how it samples, for a script beside the shipped `savedmodel/`.

    Args:
        script_file: the script's `__file__`: the default model is the `savedmodel/` beside it, from any folder.
        verb: what the script does with a checkpoint, for the help text ("sample", "evaluate").
    """
    shipped_model = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(script_file)), "savedmodel"))
    flags.DEFINE_string("model", shipped_model, "A SavedModel folder (highest version is used) or a training run "
                        "directory.", flag_values=flag_values)
    flags.DEFINE_integer("checkpoint_step", None, f"With a run directory: {verb} its checkpoint of this step, not the "
                         "newest.", flag_values=flag_values)
    flags.DEFINE_enum("precision", None, list(PRECISIONS),
                      f"A run directory's dtype policy for sampling (default float32; {AUTO_PRECISION}: faster, "
                      "images a little different). A SavedModel samples in the policy it was exported with.",
                      flag_values=flag_values)
    flags.DEFINE_enum("sampler", None, list(SAMPLERS), "Sampler; default: the one the model was exported with (ddim "
                      "for a run directory).", flag_values=flag_values)
    flags.DEFINE_integer("steps", None, "Network evaluations per image; default: the export's for its own sampler, "
                         "else T (ddpm: every step), 50 (ddim), 20 (dpm++), 199 (edm).", flag_values=flag_values)
    flags.DEFINE_float("eta", None, "Noise of DDIM, DPM-Solver++ and EDM in [0, 1] (0: deterministic); default: the "
                       "export's for its own sampler, else 0.", flag_values=flag_values)
    flags.DEFINE_list("edm_churn_sigmas", None, "EDM's churn band S_tmin,S_tmax in noise level sigma; default: "
                      "the model's own (the shipped model's: 0.05,1). 0.05,50, EDM's ImageNet band, mends more broken "
                      "faces and moves the coarse statistics further from real faces (REPORT.md 6.23).",
                      flag_values=flag_values)


# -- flags from the config dataclasses --------------------------------------------------------------------

def flag_name(field: dataclasses.Field) -> str | None:
    """The flag of a config field: its name, or the `flag` of its metadata ("" = no flag)."""
    name = field.metadata.get("flag")
    return field.name if name is None else (name or None)


def define_flag(field: dataclasses.Field, flag_values: flags.FlagValues, default=dataclasses.MISSING) -> None:
    """Define the absl flag of a config field, of the field's type, with its default and help text."""
    name, help_text, choices = flag_name(field), field.metadata["help"], field.metadata.get("choices")
    default = field.default if default is dataclasses.MISSING else default
    kind = typing.get_args(field.type) or (field.type,)  # `int | None` -> (int, None)
    if choices:
        flags.DEFINE_enum(name, default, list(choices), help_text, flag_values=flag_values)
    elif tuple in kind or field.type == tuple[int, ...]:
        flags.DEFINE_list(name, [str(value) for value in default], help_text, flag_values=flag_values)
    elif bool in kind:
        flags.DEFINE_boolean(name, default, help_text, flag_values=flag_values)
    elif int in kind:
        flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
    elif float in kind:
        flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
    else:
        flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


# Flags whose default is not the dataclass's: it depends on the dataset (None = the dataset's own).
DATASET_DEPENDENT_DEFAULTS = {"image_size": None}


def define_train_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define train.py's flags: one per field of ModelConfig and TrainConfig, plus what is no config field."""
    for config_class in (TrainConfig, ModelConfig):
        for field in dataclasses.fields(config_class):
            if flag_name(field):
                define_flag(field, flag_values, DATASET_DEPENDENT_DEFAULTS.get(field.name, dataclasses.MISSING))
    flags.DEFINE_boolean("conditional", None, "Class-conditional model; default: when the dataset has labels.",
                         flag_values=flag_values)
    flags.DEFINE_string("output_dir", "runs/default", "Run directory (checkpoints, logs, grids, SavedModel).",
                        flag_values=flag_values)
    flags.DEFINE_boolean("traceback", False, "Show the full traceback on errors.", flag_values=flag_values)


def field_value(field: dataclasses.Field, flag_values: flags.FlagValues):
    """A config field's value from its flag, converted to the field's type (lists to tuples, 'none' to None)."""
    value = flag_values[flag_name(field)].value
    if field.type == tuple[int, ...]:
        return tuple(int(item) for item in value)
    if field.name == "cache" and value == "none":
        return None
    return value


def configs_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> tuple[ModelConfig, TrainConfig]:
    """(ModelConfig, TrainConfig) of parsed train.py flags; the dataset sets image channels, classes and size."""
    from keras_ddpm.data import dataset_info

    def values(config_class) -> dict:
        return {field.name: field_value(field, flag_values) for field in dataclasses.fields(config_class)
                if flag_name(field)}

    train_values = values(TrainConfig)
    info = dataset_info(train_values["dataset"])
    conditional = flag_values["conditional"].value
    conditional = info.num_classes > 0 if conditional is None else conditional
    if conditional and not info.num_classes:
        raise ValueError(f"--conditional needs a dataset with labels; {train_values['dataset']} has none.")
    model_values = values(ModelConfig)
    model_values.update(image_size=model_values["image_size"] or info.image_size, channels=info.channels,
                        num_classes=info.num_classes if conditional else 0)
    return ModelConfig(**model_values), TrainConfig(**train_values)


def configs_from_flagfile(path) -> tuple[ModelConfig, TrainConfig]:
    """The configs `python train.py --flagfile=<path>` trains, parsed into flags of their own (not absl's global ones)."""
    flag_values = flags.FlagValues()
    define_train_flags(flag_values)
    flag_values(["train.py", f"--flagfile={path}"])
    return configs_from_flags(flag_values)
