"""The project's exceptions: what the scripts catch and turn into one line, kept free of TensorFlow.

`keras_ddpm.cli` imports this module alone, so a script's error handler needs neither TensorFlow's model code
nor the samplers. Each class subclasses the built-in exception a caller would catch without knowing ours.
"""


class TrainingDiverged(RuntimeError):
    """The loss became NaN, infinite or huge; only checkpoints of weights that trained well are kept."""


class NotOurSavedModelError(ValueError):
    """A folder given to `load_savedmodel` is not a SavedModel written by `export_savedmodel`."""


class DamagedSavedModelError(ValueError):
    """An export of ours whose files TensorFlow cannot load (truncated, overwritten, partly deleted)."""
