"""Export a `DiffusionModel` as a SavedModel that TF Serving loads, with the sampler inside.

`export_savedmodel(model, "savedmodel", version=1)` writes `savedmodel/1/` (TF Serving's numeric version
folder) from the EMA network. Its signatures (`label` and `guidance` exist only for conditional models):

- `serving_default`: `seed` int64 [B] (+ `label` int32 [B]) -> `images` uint8 [B, H, W, C], one image per
  seed, drawn with the sampler, step count and eta chosen at export (guidance = 1).
- `generate`: the same plus `steps` int32 [], `eta` float32 [] (+ `guidance` float32 []), so a client trades
  speed for quality. `eta` (0: the ODE, 1: DDPM's noise, or EDM's largest churn) matters for DDIM,
  DPM-Solver++ and EDM.
- `denoise`: `x_t` float32 [B, H, W, C], `t` int32 [B] (+ `label`) -> `prediction` (the network's raw output,
  epsilon or v as the metadata's `objective` says), and the `denoised` (x0) and `noise` estimates derived from
  it, float32 [B, H, W, C], for clients that run their own sampler.

Image b depends only on `seed[b]` (see `keras_ddpm.samplers`), so the SavedModel and `DiffusionModel.generate`
give the same image for the same seed, sampler, steps and eta: both run the one `tf.function`
`DiffusionModel.sample_function`. Tolerance: none. On the same device the images are bit-identical, in the
exporting process and in a fresh one (tests/test_export.py asserts equality); only different hardware (another
CPU, a GPU) rounds floats differently, and then the images agree approximately, not exactly.

Bad requests fail with InvalidArgument before sampling starts: `steps` outside [1, T], `eta` outside
[0, 1], a non-finite `guidance`, a `label` outside [0, num_classes] (`num_classes` is the null label), a
`t` outside [0, T), no seeds, more seeds (or `x_t` images) than `max_batch_size`, inputs of the wrong rank or
size. The batch cap is set at export (default `DEFAULT_MAX_BATCH_SIZE`) and stored in the metadata: the
sampling loop holds the whole batch for `steps` network calls, so one huge request would stall a server and
exhaust its memory; clients split larger jobs into several requests. Ranks need `tf.ensure_shape`: TF Serving
feeds tensors without checking them against the signature, and grappler folds a `tf.rank` check into a
constant taken from the signature, so only EnsureShape still looks at the tensor that arrived.

Metadata (image size, channels, classes, schedule, objective, sampler, EDM's churn band, versions, plus caller
keys such as `dataset` and `training_steps`) is one JSON document, readable with TensorFlow alone in two ways:
`json.loads(tf.saved_model.load(path).metadata().numpy())`, or the file `assets.extra/keras_ddpm.json` in the
version folder (TF Serving's place for extra files; it ignores everything there but warm-up requests).

The export is atomic: it is written to a hidden staging folder next to the version folder (`.1.partial-*`;
TF Serving only looks at all-digit names), then renamed into place. A failed export leaves no version
folder behind, and a re-export of an existing version replaces it only once the new one is complete. An
export killed outright (SIGKILL) leaves its staging folder, which the next export into the folder removes. Exports
into one base folder take turns (`flock` on the file `.export.lock`, where the OS has it: not on Windows), so the
leftovers an export finds are never those of one still running; without the lock, leftovers are left alone.
"""

import contextlib
import datetime
import json
import logging
import numbers
import os
import pathlib
import shutil
import uuid

import keras
import tensorflow as tf

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so exports into one folder must not overlap there
    fcntl = None

from keras_ddpm import __version__
from keras_ddpm import samplers
from keras_ddpm.errors import DamagedSavedModelError, NotOurSavedModelError
from keras_ddpm.model import DiffusionModel

METADATA_FORMAT = "keras_ddpm.savedmodel"
METADATA_FORMAT_VERSION = 1
METADATA_PATH = pathlib.PurePath("assets.extra", "keras_ddpm.json")
LOCK_FILE = ".export.lock"  # in the base folder; TF Serving ignores names that are not all digits

logger = logging.getLogger(__name__)
# Seeds (or x_t images) per request. The sampling loop holds the whole batch for every step, so time and memory
# grow linearly with it: 1,000 seeds of the shipped 32x32 model took 4 minutes and 2.9 GiB on a 2-core CPU, while
# 64 (sample.py's batch) add about 0.1 GiB to the 1 GiB a loaded export holds.
DEFAULT_MAX_BATCH_SIZE = 64


def export_savedmodel(
    model: DiffusionModel,
    export_dir,
    version: int = 1,
    *,
    sampler: samplers.SamplerName = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    metadata: dict | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> pathlib.Path:
    """Write `<export_dir>/<version>/`, a SavedModel of the model's EMA network with its sampler.

    Args:
        model: a `DiffusionModel` (trained under any dtype policy; the signatures are float32/uint8).
        export_dir: the model's base folder, the one TF Serving's `--model_base_path` points at (local path).
        version: the version folder's number, an integer >= 0; an existing version is replaced.
        sampler: `"ddim"`, `"ddpm"`, `"dpm++"` or `"edm"`, used by `serving_default` and `generate`.
        steps: network evaluations per image in `serving_default`, in [1, T].
        eta: DDIM's, DPM-Solver++'s or EDM's noise in [0, 1] for `serving_default` (0: deterministic; 1: as
            much noise as DDPM, or EDM's largest churn).
        metadata: extra JSON-serialisable entries, e.g. `{"dataset": "celeba", "training_steps": 80000}`.
            `dataset` and `training_steps` have defaults (None and the optimizer's step count); the
            entries describing the model itself cannot be overridden.
        max_batch_size: the most seeds (or `x_t` images) one request may hold; more fail with InvalidArgument.

    Returns:
        The version folder.

    Example (with a trained `model`; tests/test_export.py runs the same steps):

        path = export_savedmodel(model, "savedmodel", version=1, metadata={"dataset": "celeba"})
        loaded = tf.saved_model.load(str(path))
        images = loaded.signatures["serving_default"](seed=tf.constant([1, 2], tf.int64))["images"]
    """
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"export_savedmodel needs a DiffusionModel, got {type(model).__name__}.")
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 0:
        raise ValueError(f"version must be an integer >= 0 (TF Serving's version folder name), got {version!r}.")
    samplers.check_sampler(sampler)
    samplers.check_steps_and_eta(steps, eta, model.schedule.num_timesteps)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, numbers.Integral) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}.")
    steps, eta, max_batch_size = int(steps), float(eta), int(max_batch_size)
    metadata_json = json.dumps(build_metadata(model, sampler, steps, metadata, eta, max_batch_size), indent=2,
                               sort_keys=True)
    module = _ServingModule(model, sampler, steps, eta, metadata_json, max_batch_size)

    export_dir = pathlib.Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    with _export_lock(export_dir) as locked:
        if locked:  # else another export may be writing what looks like a leftover
            _remove_leftovers(export_dir)
        staging = export_dir / f".{version}.partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir()  # not tempfile.mkdtemp: its mode 0700 would hide the model from a TF Serving user
        try:
            tf.saved_model.save(module, str(staging), signatures=module.signature_functions())
            (staging / METADATA_PATH).parent.mkdir(exist_ok=True)
            (staging / METADATA_PATH).write_text(metadata_json + "\n")
            return _publish(staging, export_dir / str(int(version)))
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already unless the export failed


# The metadata keys `build_metadata` sets (what the model is and how the export samples); callers add others.
EXPORT_METADATA_KEYS = frozenset({
    "format", "format_version", "image_size", "channels", "num_classes", "schedule", "objective",
    "sampler", "steps", "eta", "guidance", "spacing", "edm_churn_sigmas", "max_batch_size", "dtype_policy", "ema",
    "keras_ddpm_version", "tensorflow_version", "keras_version", "exported_at",
})


def build_metadata(model: DiffusionModel, sampler: str, steps: int, extra: dict | None = None, eta: float = 0.0,
                   max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> dict:
    """The metadata stored with an export: what the model is (as its `metadata` says), how it samples, what made it,
    plus `extra`."""
    description, optimizer = model.metadata, getattr(model, "optimizer", None)
    metadata = {  # defaults that `extra` may override
        "dataset": None,
        "training_steps": int(optimizer.iterations.numpy()) if optimizer is not None else None,
    }
    extra = dict(extra or {})
    overridden = sorted(EXPORT_METADATA_KEYS & set(extra))
    if overridden:
        raise ValueError(
            f"metadata keys {overridden} describe the model and are set by export_savedmodel; "
            f"pass only other keys (such as {sorted(metadata)})."
        )
    metadata.update(extra)
    metadata.update(
        format=METADATA_FORMAT,
        format_version=METADATA_FORMAT_VERSION,
        # num_classes 0: unconditional; else labels 0..num_classes, num_classes being the null label
        **{key: description[key] for key in ("image_size", "channels", "num_classes", "schedule", "objective")},
        sampler=sampler,
        steps=steps,
        eta=eta,
        guidance=1.0,
        spacing=samplers.DEFAULT_SPACING[sampler],
        edm_churn_sigmas=list(model.churn_sigmas),  # the band the graphs' EDM sampler churns in
        max_batch_size=max_batch_size,  # absent from older exports, which have no cap
        dtype_policy=model.network.dtype_policy.name,
        ema=True,
        keras_ddpm_version=__version__,
        tensorflow_version=tf.__version__,
        keras_version=keras.__version__,
        exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    try:
        json.dumps(metadata)
    except TypeError as error:
        raise ValueError(f"metadata must be JSON-serialisable (str, int, float, bool, None, list, dict): {error}")
    return metadata


def clean_stale_exports(export_dir) -> None:
    """Remove the staging folders of exports that were killed, and put back a version killed while replaced.

    Waits for an export into `export_dir` that is running; `export_savedmodel` does the same before it writes.
    Where no lock can be had, nothing is removed.
    """
    export_dir = pathlib.Path(export_dir)
    if not any(_leftovers(export_dir)):  # the common case; needs no lock, nor write access to take one
        return
    with _export_lock(export_dir) as locked:
        if locked:
            _remove_leftovers(export_dir)


@contextlib.contextmanager
def _export_lock(export_dir: pathlib.Path):
    """Hold `<export_dir>/.export.lock` for the block (yields True): one export or clean-up at a time in a folder.

    An advisory `flock`, which the kernel releases when its holder dies, so a killed export never blocks the next.
    Yields False where no lock can be had (Windows; a file system without `flock`): the caller then leaves other
    exports' files alone.
    """
    if fcntl is None:
        yield False
        return
    descriptor = os.open(export_dir / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            logger.info("Waiting for another export into %s to finish.", export_dir)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            locked = True
        except OSError as error:
            logger.warning("Cannot lock %s (%s): exporting without removing leftovers of killed exports.",
                           export_dir / LOCK_FILE, error.strerror)
            locked = False
        yield locked
    finally:
        os.close(descriptor)  # releases the lock


def _leftovers(export_dir: pathlib.Path) -> list[pathlib.Path]:
    """The staging folders of killed exports, and old versions a killed `_publish` left renamed aside."""
    if not export_dir.is_dir():
        return []
    return sorted(export_dir.glob(".*.replaced-*")) + sorted(export_dir.glob(".*.partial-*"))


def _remove_leftovers(export_dir: pathlib.Path) -> None:
    """What killed exports left in `export_dir`; the caller holds the export lock, so none of it is being written."""
    for stale in _leftovers(export_dir):
        version, replaced, _ = stale.name[1:].partition(".replaced-")
        if replaced and not (export_dir / version).exists():  # `_publish` was killed between its two renames
            os.rename(stale, export_dir / version)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _publish(staging: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """Rename the complete export `staging` to `target`; an older `target` is retired only at that point.

    A rename within one folder is atomic, so `target` is always either the old or the new export; when
    replacing, the old one is moved aside first (a directory cannot be renamed onto a non-empty one), which
    leaves `target` absent for the instant between the two renames, and is put back if the second fails.
    """
    if not target.exists():
        os.rename(staging, target)
        return target
    retired = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
    return target


class _ServingModule(tf.Module):
    """What the SavedModel holds: the EMA network's variables, three signatures and `metadata()`.

    A plain `tf.Module` rather than `keras.export.ExportArchive`: ExportArchive serves every endpoint it
    holds as a signature and has no public way to attach anything else, while the metadata belongs in the
    SavedModel but not among TF Serving's signatures. Variables are tracked the way ExportArchive tracks
    them: the `tf.Variable`s the traced functions capture. (Tracking the Keras variables that wrap them
    instead gives a SavedModel that `tf.saved_model.load` reads but TF1-style loaders such as TF Serving and
    `saved_model_cli run` do not: they restore the wrappers' copies while the graph reads the originals.)
    """

    def __init__(self, model: DiffusionModel, sampler: str, steps: int, eta: float, metadata_json: str,
                 max_batch_size: int):
        super().__init__(name="keras_ddpm_serving")
        self.metadata = tf.function(lambda: tf.constant(metadata_json), input_signature=[])
        self.serving_default, self.generate, self.denoise = _serving_functions(model, sampler, steps, eta,
                                                                               max_batch_size)
        captured = {}
        for function in self.signature_functions().values():
            captured.update((id(variable), variable) for variable in function.get_concrete_function().variables)
        self.captured_variables = list(captured.values())

    def signature_functions(self) -> dict:
        return {"serving_default": self.serving_default, "generate": self.generate, "denoise": self.denoise}


def _serving_functions(model: DiffusionModel, sampler: str, default_steps: int, default_eta: float,
                       max_batch_size: int):
    """The three signature functions; conditional models' versions take `label` (and `guidance`)."""
    sample = model.sample_function(sampler)
    checks = _RequestChecks(model, max_batch_size)
    height, width, channels = model.image_shape

    def images(seed, steps, eta, label=None, guidance=1.0):
        seed, label, requirements = checks.seeds_and_labels(seed, label)
        steps, eta, guidance, option_requirements = checks.sampling_options(steps, eta, guidance)
        requirements += option_requirements
        labels = tf.zeros_like(seed, tf.int32) if label is None else label
        seed, steps, eta, labels, guidance = _after(requirements, seed, steps, eta, labels, guidance)
        return {"images": samplers.to_uint8(sample(seed, steps, eta, labels, guidance))}

    def denoise_response(x_t, t, label=None):
        x_t = tf.ensure_shape(x_t, [None, height, width, channels])
        t = tf.ensure_shape(t, [None])
        label, requirements = checks.labels(label, like=t)
        requirements += checks.timesteps(t, x_t) + checks.batch_size(t, "x_t images")
        inputs = _after(requirements, *([x_t, t] if label is None else [x_t, t, label]))
        prediction = model.network_output(inputs)  # the EMA network
        denoised, noise = model.schedule.split_prediction(prediction, inputs[0], inputs[1], model.objective)
        return {"prediction": prediction, "denoised": denoised, "noise": noise}

    seed_spec = tf.TensorSpec([None], tf.int64, name="seed")
    label_spec = tf.TensorSpec([None], tf.int32, name="label")
    steps_spec = tf.TensorSpec([], tf.int32, name="steps")
    eta_spec = tf.TensorSpec([], tf.float32, name="eta")
    guidance_spec = tf.TensorSpec([], tf.float32, name="guidance")
    x_t_spec = tf.TensorSpec([None, height, width, channels], tf.float32, name="x_t")
    t_spec = tf.TensorSpec([None], tf.int32, name="t")

    if model.num_classes:

        @tf.function(input_signature=[seed_spec, label_spec])
        def serving_default(seed, label):
            return images(seed, default_steps, default_eta, label)

        @tf.function(input_signature=[seed_spec, label_spec, steps_spec, eta_spec, guidance_spec])
        def generate(seed, label, steps, eta, guidance):
            return images(seed, steps, eta, label, guidance)

        @tf.function(input_signature=[x_t_spec, t_spec, label_spec])
        def denoise(x_t, t, label):
            return denoise_response(x_t, t, label)

    else:

        @tf.function(input_signature=[seed_spec])
        def serving_default(seed):
            return images(seed, default_steps, default_eta)

        @tf.function(input_signature=[seed_spec, steps_spec, eta_spec])
        def generate(seed, steps, eta):
            return images(seed, steps, eta)

        @tf.function(input_signature=[x_t_spec, t_spec])
        def denoise(x_t, t):
            return denoise_response(x_t, t)

    return serving_default, generate, denoise


def _after(requirements, *tensors) -> list[tf.Tensor]:
    """`tensors`, readable only once every check in `requirements` has passed.

    A control dependency on the call of the sampler is not enough: grappler inlines the call, and its inputs
    would flow into the loop while the checks run, so a bad `steps` could fail inside the loop first.
    """
    with tf.control_dependencies(requirements):
        return [tf.identity(tensor) for tensor in tensors]


class _RequestChecks:
    """Graph-side validation of serving requests; each method returns checked tensors and Assert ops."""

    def __init__(self, model: DiffusionModel, max_batch_size: int):
        self.num_timesteps = model.schedule.num_timesteps
        self.num_classes = model.num_classes
        self.max_batch_size = max_batch_size

    def seeds_and_labels(self, seed, label):
        seed = tf.ensure_shape(seed, [None])
        requirements = [
            tf.debugging.assert_positive(tf.size(seed), message="seed must hold at least one seed (one per image)")
        ] + self.batch_size(seed, "seeds")
        label, label_requirements = self.labels(label, like=seed)
        return seed, label, requirements + label_requirements

    def batch_size(self, per_image, what: str):
        return [tf.debugging.assert_less_equal(
            tf.size(per_image), self.max_batch_size,
            message=f"at most {self.max_batch_size} {what} per request (this export's max_batch_size); "
                    f"split larger batches into several requests",
        )]

    def labels(self, label, like):
        if label is None:
            return None, []
        label = tf.ensure_shape(label, [None])
        null = self.num_classes
        return label, [
            tf.debugging.assert_equal(
                tf.size(label), tf.size(like), message="label must have one entry per seed (or per x_t image)"
            ),
            tf.debugging.assert_greater_equal(label, 0, message=f"label must be in [0, {null}] ({null} = no class)"),
            tf.debugging.assert_less_equal(label, null, message=f"label must be in [0, {null}] ({null} = no class)"),
        ]

    def sampling_options(self, steps, eta, guidance):
        steps, eta, guidance = (tf.ensure_shape(option, []) for option in (steps, eta, guidance))
        steps_message = f"steps must be in [1, {self.num_timesteps}] (the schedule's T)"
        eta_message = "eta must be in [0, 1] (0: deterministic, 1: DDPM's noise level)"
        return steps, eta, guidance, [
            tf.debugging.assert_greater_equal(steps, 1, message=steps_message),
            tf.debugging.assert_less_equal(steps, self.num_timesteps, message=steps_message),
            tf.debugging.assert_greater_equal(eta, 0.0, message=eta_message),  # NaN fails too
            tf.debugging.assert_less_equal(eta, 1.0, message=eta_message),
            tf.debugging.assert_equal(
                tf.math.is_finite(guidance), True, message="guidance must be a finite number"
            ),
        ]

    def timesteps(self, t, x_t):
        t_message = f"t must be in [0, {self.num_timesteps - 1}]"
        return [
            tf.debugging.assert_equal(tf.size(t), tf.shape(x_t)[0], message="t must have one entry per x_t image"),
            tf.debugging.assert_greater_equal(t, 0, message=t_message),
            tf.debugging.assert_less(t, self.num_timesteps, message=t_message),
        ]


def load_savedmodel(path) -> tuple[object, dict]:
    """Load an export of `export_savedmodel`; returns `(loaded, metadata)`.

    Args:
        path: an export folder (its highest numeric version is loaded) or one version folder.

    Raises:
        FileNotFoundError: `path` does not exist.
        NotOurSavedModelError: `path` holds no SavedModel, or one not written by keras_ddpm.
        DamagedSavedModelError: the files are ours but TensorFlow cannot load them.
    """
    version_dir = find_version_dir(path)
    metadata = read_metadata(version_dir)
    try:
        loaded = tf.saved_model.load(str(version_dir))
    except (OSError, tf.errors.OpError) as error:  # an unparsable saved_model.pb, unreadable variables
        reason = (getattr(error, "message", None) or str(error)).strip().splitlines()[0]
        raise DamagedSavedModelError(
            f"{version_dir} is damaged: TensorFlow cannot load it ({reason}). Export it again, or restore the "
            f"files (for the shipped model: git checkout -- savedmodel)."
        ) from None
    return loaded, metadata


def find_version_dir(path) -> pathlib.Path:
    """`path` itself if it is a SavedModel folder, else its highest-numbered version folder holding one."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No SavedModel folder at {path}.")
    if (path / "saved_model.pb").is_file():
        return path
    versions = [child for child in path.iterdir() if child.name.isdigit() and (child / "saved_model.pb").is_file()]
    if not versions:
        found = sorted(child.name for child in path.iterdir())[:10]
        raise NotOurSavedModelError(
            f"{path} is not a SavedModel: it has no saved_model.pb and no numeric version folder holding one "
            f"(found {found or 'nothing'}). Expected the export folder of export_savedmodel (holding 1/, 2/, ...) "
            f"or one of its version folders."
        )
    return max(versions, key=lambda child: int(child.name))


def read_metadata(version_dir) -> dict:
    """The metadata of an export, read from `<version_dir>/assets.extra/keras_ddpm.json`."""
    metadata_file = pathlib.Path(version_dir) / METADATA_PATH
    try:
        metadata = json.loads(metadata_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as error:
        raise NotOurSavedModelError(
            f"{version_dir} is a SavedModel but not one exported by keras_ddpm: {METADATA_PATH} is missing or not "
            f"JSON ({error}). Export models with keras_ddpm.export.export_savedmodel."
        ) from None
    if metadata.get("format") != METADATA_FORMAT:
        raise NotOurSavedModelError(
            f"{metadata_file} has format {metadata.get('format')!r}, expected {METADATA_FORMAT!r}: "
            f"this SavedModel was not exported by keras_ddpm."
        )
    if metadata.get("format_version", 0) > METADATA_FORMAT_VERSION:
        raise NotOurSavedModelError(
            f"{version_dir} was exported by a newer keras_ddpm (metadata format {metadata['format_version']}, this "
            f"version reads up to {METADATA_FORMAT_VERSION}); upgrade keras_ddpm."
        )
    return metadata
