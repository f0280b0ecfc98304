"""One way to turn seeds into images, for a `DiffusionModel` and for an exported SavedModel alike.

The `Generator` protocol is what sample.py, evaluate.py, the training callbacks and the figures draw from:
`generate(...)` returns uint8 images, and `metadata` says what the model is and how it samples by default.
Two classes implement it, through this module:

- `keras_ddpm.model.DiffusionModel` (a model in memory, or a run directory's: `keras_ddpm.runs.load_generator`);
- `SavedModelGenerator`, a SavedModel written by `keras_ddpm.export`: it calls the SavedModel's own `generate`
  signature for the sampler it was exported with and, for other samplers, a trajectory or step reports, runs
  `keras_ddpm.samplers` on its `denoise` signature.

Both check a request with `check_request` (so they accept and refuse the same requests) and sample with
`compile_sampler`, whose contract is: image i is a function of its seed alone (see `samplers.per_image_noise`),
whatever the batch, the generator or the SavedModel signature it is drawn through.
"""

import dataclasses
from typing import Callable, Protocol

import keras
import numpy as np
import tensorflow as tf

from keras_ddpm import samplers
from keras_ddpm.schedule import NoiseSchedule

# `network_output(inputs) -> tf.Tensor`: the network's raw prediction (epsilon or v, as `objective` says) for
# `inputs = [x_t, t]` or, for a conditional network, `[x_t, t, labels]`.
NetworkOutput = Callable[[list], tf.Tensor]
# `on_step(calls_done)`: how many of a request's network calls are done, for a progress bar.
StepCallback = Callable[[int], None]


class Generator(Protocol):
    """A source of images: a `DiffusionModel` or a `SavedModelGenerator`.

    Attributes:
        image_shape: (H, W, C) of the images.
        num_classes: real classes of a conditional model (label `num_classes` is the null label); 0 if not.
        schedule, objective: the noise schedule and what the network predicts.
        metadata: what the model is and its sampling defaults: at least `sampler`, `eta` and `spacing` (None: per
            sampler; an export's also `steps`), `image_size`, `channels`, `num_classes`, `schedule`, `objective`
            and `dataset` (or None).
        max_batch_size: most seeds one `generate` call takes (an export's cap), or None.
        churn_sigmas: the band of noise levels (S_tmin, S_tmax) EDM's sampler churns in unless a request names one.
    """

    image_shape: tuple[int, int, int]
    num_classes: int
    schedule: NoiseSchedule
    objective: str
    metadata: dict
    max_batch_size: int | None
    churn_sigmas: tuple[float, float]

    def network_output(self, inputs: list) -> tf.Tensor:
        """The (EMA) network's raw prediction for `[x_t, t]` or `[x_t, t, labels]`."""

    def generate(self, num_images: int | None = None, *, seed: int = 0, seeds=None, steps: int | None = None,
                 sampler: samplers.SamplerName | None = None, eta: float | None = None,
                 spacing: samplers.Spacing | None = None, labels=None, guidance: float = 1.0,
                 churn_sigmas=None, return_trajectory: bool = False, on_step: StepCallback | None = None):
        """uint8 images [N, H, W, C] (and the float trajectory [S, N, H, W, C] when asked); see `check_request`.

        `on_step(calls_done)` follows the sampler's network calls where it can (not through an export's own
        `generate` signature, whose graph has no way out to Python).
        """


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked `generate()` request: one seed and one label per image, every option resolved."""

    seeds: np.ndarray  # int64 [N]
    steps: int
    sampler: samplers.SamplerName
    eta: float
    spacing: samplers.Spacing | None
    churn_sigmas: tuple[float, float]  # EDM's band; the compiled function fixes it, so it is not a tensor
    labels: np.ndarray  # int32 [N]; zeros for an unconditional model (the compiled sampler ignores them)
    guidance: float

    def tensors(self) -> tuple[tf.Tensor, ...]:
        """The arguments of a `compile_sampler` function: seeds, steps, eta, labels, guidance."""
        return (tf.constant(self.seeds, tf.int64), tf.constant(self.steps, tf.int32),
                tf.constant(self.eta, tf.float32), tf.constant(self.labels, tf.int32),
                tf.constant(self.guidance, tf.float32))


def sampling_defaults(generator: Generator, sampler=None, steps=None, eta=None) -> tuple[str, int, float]:
    """`sampler`, `steps` and `eta` as asked, else the generator's (its export's; DDIM with eta 0 for a model in
    memory): see `resolve_sampling`."""
    return resolve_sampling(generator.metadata, generator.schedule.num_timesteps, sampler, steps, eta)


def resolve_sampling(defaults: dict, num_timesteps: int, sampler=None, steps=None, eta=None) -> tuple[str, int, float]:
    """`sampler`, `steps` and `eta` as asked, else from `defaults` (`sampler`, `eta` and maybe `steps`).

    The default steps and eta are `defaults["steps"]` and `defaults["eta"]` only for the default sampler (EDM's
    199 steps at eta 1 say nothing about DPM-Solver++); another sampler takes its own steps
    (`samplers.default_steps`) and eta 0, its deterministic form.
    """
    sampler = samplers.check_sampler(sampler or defaults["sampler"])
    own_sampler = sampler == defaults["sampler"]
    if steps is None:
        steps = (defaults.get("steps") if own_sampler else None) or samplers.default_steps(sampler, num_timesteps)
    if eta is None:
        eta = defaults["eta"] if own_sampler else 0.0
    return sampler, int(steps), eta


def resolve_churn_sigmas(generator: Generator, churn_sigmas=None) -> tuple[float, float]:
    """EDM's churn band as asked (checked), else the generator's own."""
    return generator.churn_sigmas if churn_sigmas is None else samplers.check_churn_sigmas(churn_sigmas)


def check_request(generator: Generator, num_images=None, seed=0, seeds=None, steps=None, sampler=None, eta=None,
                  spacing=None, labels=None, guidance=1.0, churn_sigmas=None) -> Request:
    """Validate the arguments of a `generate()` call (see `DiffusionModel.generate` for each) into a `Request`."""
    sampler, steps, eta = sampling_defaults(generator, sampler, steps, eta)
    if seeds is None:
        if num_images is None or num_images < 1:
            raise ValueError("Pass num_images >= 1 or an explicit list of seeds.")
        seeds = seed + np.arange(num_images, dtype=np.int64)
    seeds = np.asarray(seeds, np.int64)
    if seeds.ndim != 1 or len(seeds) == 0:
        raise ValueError(f"seeds must be a non-empty 1-D list of integers, got shape {seeds.shape}.")
    if generator.max_batch_size and len(seeds) > generator.max_batch_size:
        raise ValueError(f"This export takes at most {generator.max_batch_size} seeds per call (its max_batch_size), "
                         f"got {len(seeds)}; use generate_in_batches.")
    samplers.check_steps_and_eta(steps, eta, generator.schedule.num_timesteps)
    labels = check_labels(labels, guidance, generator.num_classes, len(seeds))
    churn_sigmas = resolve_churn_sigmas(generator, churn_sigmas)
    if sampler != "edm":  # the band means nothing to other samplers: keep their compiled functions and export graph
        churn_sigmas = generator.churn_sigmas
    return Request(seeds, steps, sampler, float(eta), spacing, churn_sigmas, labels, float(guidance))


def labels_in_turn(num_images: int, num_classes: int) -> np.ndarray | None:
    """Labels 0, 1, ..., num_classes - 1, 0, 1, ... for `num_images` images; None for an unconditional model."""
    return np.arange(num_images) % num_classes if num_classes else None


def check_labels(labels, guidance, num_classes: int, num_images: int) -> np.ndarray:
    """One int32 label per image for a conditional model (zeros for an unconditional one, which takes none)."""
    if not num_classes:
        if labels is not None:
            raise ValueError("This model is unconditional; do not pass labels.")
        if guidance != 1.0:
            raise ValueError(f"guidance needs a conditional model; this one is unconditional (got {guidance}).")
        return np.zeros([num_images], np.int32)
    if labels is None:
        raise ValueError(
            f"This model is conditional: pass labels in [0, {num_classes - 1}] "
            f"(or {num_classes}, the null label, for unconditional samples)."
        )
    labels = np.broadcast_to(np.asarray(labels, np.int32), [num_images])
    if labels.min() < 0 or labels.max() > num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}] ({num_classes} = null), got {labels}.")
    return labels


SAMPLER_SIGNATURE = [
    tf.TensorSpec([None], tf.int64, name="seeds"),
    tf.TensorSpec([], tf.int32, name="steps"),
    tf.TensorSpec([], tf.float32, name="eta"),
    tf.TensorSpec([None], tf.int32, name="labels"),
    tf.TensorSpec([], tf.float32, name="guidance"),
]


class StepListener:
    """The host side of a compiled sampler's step reports: after each step the loop calls `in_graph(steps_done)`, a
    `tf.py_function` that hands the count to `callback` while one is set (`run_sampler` sets it for one call).

    One listener per compiled function: two threads sampling with step reports through the same function at once
    would hear each other's steps.
    """

    def __init__(self):
        self.callback: StepCallback | None = None

    def in_graph(self, steps_done: tf.Tensor) -> None:
        tf.py_function(self._report, [steps_done], [])

    def _report(self, steps_done) -> None:
        if self.callback is not None:
            self.callback(int(steps_done))


def compile_sampler(network_output: NetworkOutput, schedule: NoiseSchedule, objective: str, image_shape,
                    num_classes: int, sampler: samplers.SamplerName, spacing: samplers.Spacing | None = None,
                    return_trajectory: bool = False, report_steps: bool = False,
                    churn_sigmas: tuple[float, float] = samplers.EDM_CHURN_SIGMAS):
    """The compiled sampler: f(seeds int64 [B], steps, eta, labels int32 [B], guidance) -> float32 images.

    A `tf.function` with a fixed input signature, so new seeds, batch sizes or step counts never retrace;
    the caller keeps one per (sampler, spacing, trajectory, reporting, `churn_sigmas`: the band EDM's sampler
    churns in). Labels are ignored when `num_classes` is 0.
    With `report_steps`, its `step_listener` (a `StepListener`) hears of every network call; that graph calls
    back into Python, so it is never exported.
    """
    step_listener = StepListener() if report_steps else None

    @tf.function(input_signature=SAMPLER_SIGNATURE)
    def sample(seeds, steps, eta, labels, guidance):
        denoise = samplers.make_denoiser(
            network_output, schedule, objective, labels if num_classes else None, num_classes, guidance
        )
        return samplers.sample(
            denoise, schedule, seeds, image_shape, steps, sampler, eta, spacing, churn_sigmas=churn_sigmas,
            return_trajectory=return_trajectory,
            on_step=step_listener.in_graph if step_listener else None,
        )

    sample.step_listener = step_listener
    return sample


def run_sampler(sample, request: Request, return_trajectory: bool = False, on_step: StepCallback | None = None):
    """Call a `compile_sampler` function on a request: uint8 images (and the float trajectory when asked).

    `on_step` hears of each network call if `sample` was compiled with `report_steps`.
    """
    listener = sample.step_listener
    if listener is not None:
        listener.callback = on_step
    try:
        result = sample(*request.tensors())
    finally:
        if listener is not None:
            listener.callback = None
    if return_trajectory:
        images, trajectory = result
        return samplers.to_uint8(images).numpy(), trajectory.numpy()
    return samplers.to_uint8(result).numpy()


class SavedModelGenerator:
    """A `Generator` over a SavedModel written by `export_savedmodel`.

    Args:
        loaded: the object `tf.saved_model.load` returned.
        metadata: the export's metadata (see `keras_ddpm.export`).
    """

    def __init__(self, loaded, metadata: dict):
        self.loaded = loaded
        self.metadata = metadata
        self.image_shape = (*metadata["image_size"], metadata["channels"])
        self.num_classes = metadata["num_classes"]
        self.schedule = NoiseSchedule.from_config(metadata["schedule"])
        self.objective = metadata["objective"]
        self.max_batch_size = metadata.get("max_batch_size")  # None: an older export, without a cap
        # the band the export's own EDM graphs churn in, so that its `denoise` path draws the same images;
        # exports that predate the key were made with EDM's ImageNet band (REPORT.md 6.23)
        self.churn_sigmas = tuple(metadata.get("edm_churn_sigmas", samplers.EDM_IMAGENET_CHURN_SIGMAS))
        self._samplers = {}

    def network_output(self, inputs: list) -> tf.Tensor:
        """The network's raw output through the `denoise` signature, in requests of at most `max_batch_size` images.

        Guidance sends a batch twice in one network call (conditional and unconditional), so a batch of seeds the
        export accepts can still be twice its cap here.
        """
        denoise = self.loaded.signatures["denoise"]
        names = ["x_t", "t", "label"][: len(inputs)]

        def predict(chunk):
            return denoise(**dict(zip(names, chunk)))["prediction"]

        cap = self.max_batch_size
        if cap is None:
            return predict(inputs)
        num_chunks = -(-tf.shape(inputs[0])[0] // cap)
        predictions = tf.TensorArray(tf.float32, size=num_chunks, infer_shape=False,
                                     element_shape=denoise.structured_outputs["prediction"].shape)

        def predict_chunk(index, predictions):
            chunk = [tensor[index * cap : (index + 1) * cap] for tensor in inputs]
            return index + 1, predictions.write(index, predict(chunk))

        _, predictions = tf.while_loop(lambda index, _: index < num_chunks, predict_chunk, [0, predictions])
        return predictions.concat()

    def generate(self, num_images=None, *, seed=0, seeds=None, steps=None, sampler=None, eta=None, spacing=None,
                 labels=None, guidance=1.0, churn_sigmas=None, return_trajectory=False, on_step=None):
        """uint8 images [N, H, W, C] (and the float trajectory [S, N, H, W, C] when asked); see `DiffusionModel.generate`.

        `sampler` and `eta` default to those the model was exported with, and `steps` too for that sampler; those
        requests run the export's own `generate` signature, unless `on_step` asks for step reports or
        `churn_sigmas` for another band, which that graph cannot give: then the same sampler runs on the `denoise`
        signature (the same images, to within one grey level in a few pixels where the two graphs round
        differently; tests/test_export.py).
        """
        request = check_request(self, num_images, seed, seeds, steps, sampler, eta, spacing, labels, guidance,
                                churn_sigmas)
        exported_way = (request.sampler == self.metadata["sampler"] and spacing in (None, self.metadata["spacing"])
                        and request.churn_sigmas == self.churn_sigmas)
        if exported_way and not return_trajectory and on_step is None:
            return self._exported_generate(request)
        key = (request.sampler, spacing, return_trajectory, on_step is not None, request.churn_sigmas)
        if key not in self._samplers:
            self._samplers[key] = compile_sampler(self.network_output, self.schedule, self.objective,
                                                  self.image_shape, self.num_classes, *key)
        return run_sampler(self._samplers[key], request, return_trajectory, on_step)

    def _exported_generate(self, request: Request) -> np.ndarray:
        """The SavedModel's own `generate` signature (the sampler it was exported with)."""
        seeds, steps, eta, labels, guidance = request.tensors()
        inputs = dict(seed=seeds, steps=steps, eta=eta)
        if self.num_classes:
            inputs.update(label=labels, guidance=guidance)
        return self.loaded.signatures["generate"](**inputs)["images"].numpy()


class CallProgress:
    """A progress bar over network calls, moved by a generator's step reports or, where none come, once a batch."""

    def __init__(self, total_calls: int):
        self.bar = keras.utils.Progbar(total_calls, unit_name="step")
        self.calls_done = 0

    def reach(self, calls_done: int) -> None:
        if calls_done > self.calls_done:  # a finished bar would print its last line again
            self.calls_done = calls_done
            self.bar.update(calls_done)


def generate_in_batches(generator: Generator, num_images: int, batch_size: int = 64, seed: int = 0,
                        verbose: bool = True, **options) -> np.ndarray:
    """`generator.generate` over `num_images` seeds `seed, seed + 1, ...` in batches, with a progress bar.

    The bar counts network calls (steps x batches) and moves after each one where the generator reports them
    (DDPM's 1,000 calls take minutes a batch), else after each batch. Batches are cut down to the generator's
    `max_batch_size` (an export's cap on one request), if it has one.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be at least 1, got {num_images} and {batch_size}.")
    batch_size = min(batch_size, generator.max_batch_size or batch_size, num_images)
    progress = None
    if verbose:
        sampler, steps, eta = sampling_defaults(generator, options.get("sampler"), options.get("steps"),
                                                options.get("eta"))
        churn = ""
        if sampler == "edm" and eta > 0:
            low, high = resolve_churn_sigmas(generator, options.get("churn_sigmas"))
            churn = f" (churn for sigma in [{low:g}, {high:g}])"
        print(f"Sampling {num_images} images: {sampler}, {steps} network calls each, eta {eta:g}{churn}, "
              f"in batches of {batch_size}.", flush=True)
        progress = CallProgress(-(-num_images // batch_size) * steps)
    labels = options.pop("labels", None)
    if labels is not None:
        labels = np.broadcast_to(np.asarray(labels), [num_images])
    batches = []
    for batch_index, start in enumerate(range(0, num_images, batch_size)):
        count = min(batch_size, num_images - start)
        batch_labels = None if labels is None else labels[start : start + count]
        seeds = np.arange(seed + start, seed + start + count)
        step_report = {}
        if progress:  # the calls of the batches before, plus this batch's calls so far
            calls_before = batch_index * steps
            step_report["on_step"] = lambda calls, before=calls_before: progress.reach(before + calls)
        batches.append(generator.generate(seeds=seeds, labels=batch_labels, **options, **step_report))
        if progress:
            progress.reach(calls_before + steps)
    return np.concatenate(batches)
