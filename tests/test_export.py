"""SavedModel export: signatures seen by TF tools, same images as generate(), request validation, atomicity.

One tiny trained model is exported once per module. The checks that need a fresh process (saved_model_cli,
a Python that never imports keras_ddpm) start as subprocesses right after that export and run while the
in-process tests do; the tests reading their results come last.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ddpm import export, samplers
from keras_ddpm.export import NotOurSavedModelError, export_savedmodel, load_savedmodel
from keras_ddpm.runs import load_generator
from test_model import make_model, toy_images

SEEDS = [3, 7, 11]
EXPORT_STEPS = 4
FRESH_PROCESS_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf

loaded = tf.saved_model.load(sys.argv[1])
served = loaded.signatures["serving_default"](seed=tf.constant([3, 7, 11], tf.int64))["images"]
generated = loaded.signatures["generate"](
    seed=tf.constant([3, 7], tf.int64), steps=tf.constant(3), eta=tf.constant(0.5))["images"]
np.savez(sys.argv[2], served=served.numpy(), generated=generated.numpy())
print(json.dumps({"metadata": json.loads(loaded.metadata().numpy()), "keras_ddpm": "keras_ddpm" in sys.modules}))
"""


@pytest.fixture(scope="module")
def model():
    """A tiny model after one training step (v-prediction, so that its images are not saturated at 0/255)."""
    model = make_model(objective="v")
    # One eager step: tracing the train step would cost ~15 s, and the export only reads the weights.
    model.compile(optimizer=keras.optimizers.Adam(2e-3), run_eagerly=True)
    model.fit(toy_images(16), batch_size=16, epochs=1, verbose=0)
    return model


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("savedmodel")
    export_savedmodel(model, export_dir, version=1, steps=EXPORT_STEPS, metadata={"dataset": "toy"})
    return export_dir


@pytest.fixture(scope="module")
def loaded(export_dir):
    return load_savedmodel(export_dir)


@pytest.fixture(scope="module")
def subprocesses(export_dir, tmp_path_factory):
    """saved_model_cli show/run and a fresh Python loading the export; `result(name)` waits for one's stdout."""
    workdir = tmp_path_factory.mktemp("subprocesses")
    cli = [shutil.which("saved_model_cli")] if shutil.which("saved_model_cli") else [
        sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    version_dir = str(export_dir / "1")
    commands = {
        "show": cli + ["show", "--dir", version_dir, "--all"],
        "run": cli + ["run", "--dir", version_dir, "--tag_set", "serve", "--signature_def", "serving_default",
                      "--input_exprs", "seed=[3,7,11]", "--outdir", str(workdir), "--overwrite"],
        "fresh": [sys.executable, "-c", FRESH_PROCESS_SCRIPT, version_dir, str(workdir / "fresh.npz")],
    }
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    processes = {
        name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir)
        for name, command in commands.items()
    }

    def result(name):
        stdout, stderr = processes[name].communicate(timeout=300)
        assert processes[name].returncode == 0, f"{commands[name]} failed:\n{stderr[-3000:]}"
        return stdout

    result.workdir = workdir
    yield result
    for process in processes.values():
        if process.poll() is None:  # a test failed before reading it
            process.kill()
            process.wait()


def parse_signature_defs(show_output: str) -> dict:
    """{signature: {("inputs" | "outputs", key): (dtype, shape)}} from `saved_model_cli show --all`."""
    signatures = {}
    for block in show_output.split("signature_def['")[1:]:
        name = block.split("'", 1)[0]
        tensors = re.findall(r"(inputs|outputs)\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: ([^\n]+)", block)
        signatures[name] = {(kind, key): (dtype, shape) for kind, key, dtype, shape in tensors}
    return signatures


def test_images_match_generate_and_depend_only_on_their_seed(loaded, model):
    saved_model, _ = loaded
    served = saved_model.signatures["serving_default"](seed=tf.constant(SEEDS, tf.int64))["images"].numpy()
    expected = model.generate(seeds=SEEDS, steps=EXPORT_STEPS)
    np.testing.assert_array_equal(served, expected)
    assert np.mean((served == 0) | (served == 255)) < 0.5, "saturated images would make the comparison weak"
    alone = saved_model.signatures["serving_default"](seed=tf.constant([11], tf.int64))["images"].numpy()
    np.testing.assert_array_equal(alone[0], served[2])
    for sampler_options in [dict(steps=2, eta=0.0), dict(steps=6, eta=1.0)]:
        generated = saved_model.signatures["generate"](
            seed=tf.constant(SEEDS, tf.int64), steps=tf.constant(sampler_options["steps"]),
            eta=tf.constant(sampler_options["eta"]),
        )["images"].numpy()
        np.testing.assert_array_equal(generated, model.generate(seeds=SEEDS, **sampler_options))


def test_exported_eta_is_the_serving_default_and_the_generators(model, tmp_path):
    folder = export_savedmodel(model, tmp_path / "stochastic", steps=3, eta=1.0)
    saved_model, metadata = load_savedmodel(folder)
    assert metadata["eta"] == 1.0
    served = saved_model.signatures["serving_default"](seed=tf.constant(SEEDS, tf.int64))["images"].numpy()
    np.testing.assert_array_equal(served, model.generate(seeds=SEEDS, steps=3, eta=1.0))
    assert not np.array_equal(served, model.generate(seeds=SEEDS, steps=3, eta=0.0))
    np.testing.assert_array_equal(load_generator(folder).generate(seeds=SEEDS, steps=3), served)  # eta from metadata
    # steps from the metadata too (sample.py with no --steps): DDIM's generic default of 50 drew other images.
    np.testing.assert_array_equal(load_generator(folder).generate(seeds=SEEDS), served)


def test_denoise_is_the_ema_network(loaded, model):
    saved_model, _ = loaded
    x_t = tf.random.stateless_normal([2, 16, 16, 3], seed=[1, 2])
    t = tf.constant([5, 90])
    outputs = saved_model.signatures["denoise"](x_t=x_t, t=t)
    ema_prediction = model.ema_network([x_t, t], training=False)
    np.testing.assert_allclose(outputs["prediction"], ema_prediction, atol=1e-5)
    assert not np.allclose(outputs["prediction"], model.network([x_t, t], training=False), atol=1e-5)
    denoised, noise = model.schedule.split_prediction(ema_prediction, x_t, t, "v")
    np.testing.assert_allclose(outputs["denoised"], denoised, atol=1e-5)
    np.testing.assert_allclose(outputs["noise"], noise, atol=1e-5)


def test_metadata_in_the_model_and_in_assets_extra(loaded, export_dir, model):
    saved_model, metadata = loaded
    assert json.loads(saved_model.metadata().numpy()) == metadata
    assert json.loads((export_dir / "1" / "assets.extra" / "keras_ddpm.json").read_text()) == metadata
    assert metadata["image_size"] == [16, 16] and metadata["channels"] == 3 and metadata["num_classes"] == 0
    assert metadata["schedule"] == model.schedule.get_config() and metadata["objective"] == "v"
    assert metadata["sampler"] == "ddim" and metadata["steps"] == EXPORT_STEPS
    assert metadata["training_steps"] == 1 and metadata["dataset"] == "toy"
    assert metadata["max_batch_size"] == export.DEFAULT_MAX_BATCH_SIZE == 64
    assert metadata["edm_churn_sigmas"] == list(samplers.EDM_CHURN_SIGMAS) == [0.05, 1.0]
    assert metadata["keras_ddpm_version"] == "0.1.0" and metadata["tensorflow_version"] == tf.__version__


@pytest.mark.parametrize(
    "signature, inputs, message",
    [
        ("generate", dict(steps=0), "steps must be in \\[1, 100\\]"),
        ("generate", dict(steps=101), "steps must be in \\[1, 100\\]"),
        ("generate", dict(eta=-0.1), "eta must be in \\[0, 1\\]"),
        ("generate", dict(eta=1.5), "eta must be in \\[0, 1\\]"),
        ("generate", dict(eta=float("nan")), "eta must be in \\[0, 1\\]"),
        ("generate", dict(steps=[4]), "Shape of tensor steps \\[1\\] is not compatible"),
        ("serving_default", dict(seed=[[1, 2]]), "Shape of tensor seed \\[1,2\\] is not compatible"),
        ("serving_default", dict(seed=5), "Shape of tensor seed \\[\\] is not compatible"),
        ("serving_default", dict(seed=np.zeros([0], np.int64)), "at least one seed"),
        ("denoise", dict(t=[100]), "t must be in \\[0, 99\\]"),
        ("denoise", dict(t=[-1]), "t must be in \\[0, 99\\]"),
        ("denoise", dict(t=[1, 2]), "one entry per x_t image"),
        ("denoise", dict(x_t=np.zeros([1, 8, 8, 3], np.float32)), "Shape of tensor x_t \\[1,8,8,3\\]"),
        ("serving_default", dict(seed=np.arange(65)), "at most 64 seeds per request"),
        ("generate", dict(seed=np.arange(65)), "at most 64 seeds per request"),
        ("denoise", dict(x_t=np.zeros([65, 16, 16, 3], np.float32), t=np.ones(65)), "at most 64 x_t images"),
    ],
)
def test_bad_requests_fail_with_invalid_argument(loaded, signature, inputs, message):
    defaults = {
        "serving_default": dict(seed=[1]),
        "generate": dict(seed=[1], steps=4, eta=0.0),
        "denoise": dict(x_t=np.zeros([1, 16, 16, 3], np.float32), t=[1]),
    }[signature]
    function = loaded[0].signatures[signature]
    dtypes = {name: spec.dtype for name, spec in function.structured_input_signature[1].items()}
    request = {name: tf.constant(value, dtypes[name]) for name, value in {**defaults, **inputs}.items()}
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        function(**request)


def test_clients_of_the_library_respect_the_batch_cap(export_dir):
    from keras_ddpm.generation import generate_in_batches

    generator = load_generator(export_dir)
    assert generator.max_batch_size == 64
    with pytest.raises(ValueError, match="at most 64 seeds"):
        generator.generate(seeds=np.arange(65), steps=2)
    images = generate_in_batches(generator, 65, batch_size=100, verbose=False, steps=2)  # cut to batches of 64
    assert images.shape == (65, 16, 16, 3)


def test_guided_step_reports_split_the_doubled_batch_at_the_cap(tmp_path):
    """With guidance, each network call holds a batch twice: sampling with step reports (the `denoise` signature)
    sends it in requests the export's cap allows, and draws the images of the export's own `generate` signature."""
    model = make_model(num_classes=3, objective="v")
    rng = np.random.default_rng(0)  # untrained, the zero-initialised layers would cut the label off from the output
    model.ema_network.set_weights([w + 0.05 * rng.standard_normal(w.shape) for w in model.ema_network.get_weights()])
    export_dir = tmp_path / "savedmodel"
    export_savedmodel(model, export_dir, version=1, steps=3, max_batch_size=3)
    generator = load_generator(export_dir)
    options = dict(seeds=[1, 2, 3], labels=[0, 1, 2], guidance=3.0)  # 6 images a call, twice the cap
    calls = []
    reported = generator.generate(**options, on_step=calls.append)
    exported = generator.generate(**options)
    assert calls == [1, 2, 3]
    assert np.abs(reported.astype(int) - exported).max() <= 1


def test_an_export_reports_the_steps_of_every_sampler_its_own_included(export_dir, model):
    """Asked for step reports, the export's own sampler runs here on the `denoise` signature, as other samplers do,
    and draws the images of the export's `generate` signature (to within one grey level: the graphs differ)."""
    generator = load_generator(export_dir)
    own, other = [], []
    reported = generator.generate(seeds=[0, 1], steps=3, on_step=own.append)
    exported = generator.generate(seeds=[0, 1], steps=3)
    assert np.abs(reported.astype(int) - exported).max() <= 1
    images = generator.generate(seeds=[0, 1], steps=3, sampler="ddpm", on_step=other.append)
    assert own == [1, 2, 3] and other == [1, 2, 3]
    np.testing.assert_array_equal(images, model.generate(seeds=[0, 1], steps=3, sampler="ddpm"))


def test_an_export_samples_in_its_own_churn_band_and_an_older_one_in_the_imagenet_band(model, tmp_path):
    """Off its own `generate` graph (here: asked for step reports), an EDM export samples in the band its metadata
    records, so that it draws its graph's images; exports that predate that key churned in EDM's ImageNet band. A
    request may name another band, for an export and for a model in memory alike."""
    from keras_ddpm.generation import SavedModelGenerator, compile_sampler

    loaded, metadata = load_savedmodel(export_savedmodel(model, tmp_path, version=1, steps=9, sampler="edm", eta=1.0))
    older_metadata = {key: value for key, value in metadata.items() if key != "edm_churn_sigmas"}
    options = dict(seeds=[0, 1], on_step=lambda calls: None)
    exported = SavedModelGenerator(loaded, metadata).generate(seeds=[0, 1])
    own_band = SavedModelGenerator(loaded, metadata).generate(**options)
    older = SavedModelGenerator(loaded, older_metadata).generate(**options)
    imagenet_band = compile_sampler(model.network_output, model.schedule, model.objective, model.image_shape, 0,
                                    "edm", churn_sigmas=samplers.EDM_IMAGENET_CHURN_SIGMAS)
    seeds, steps, eta = tf.constant([0, 1], tf.int64), tf.constant(9), tf.constant(1.0)
    expected_older = samplers.to_uint8(imagenet_band(seeds, steps, eta, tf.zeros([2], tf.int32), 1.0)).numpy()
    assert np.abs(own_band.astype(int) - exported).max() <= 1
    assert np.abs(older.astype(int) - expected_older).max() <= 1
    assert np.mean(older != exported) > 0.5  # the band changes most values
    asked = dict(seeds=[0, 1], churn_sigmas=samplers.EDM_IMAGENET_CHURN_SIGMAS)
    assert np.abs(SavedModelGenerator(loaded, metadata).generate(**asked).astype(int) - expected_older).max() <= 1
    np.testing.assert_array_equal(model.generate(**asked, steps=9, sampler="edm", eta=1.0), expected_older)


def test_step_reports_never_reach_an_exported_graph(model, tmp_path):
    """A model that has sampled with step reports exports graphs without a Python call in them (TF Serving has none)."""
    from tensorflow.core.protobuf import saved_model_pb2

    model.generate(seeds=[0], steps=2, sampler=model.metadata["sampler"], on_step=lambda calls: None)
    version_dir = export_savedmodel(model, tmp_path, version=1, steps=2, metadata={"dataset": "toy"})
    saved_model = saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes())
    graph = saved_model.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node}
    ops.update(node.op for function in graph.library.function for node in function.node_def)
    assert "While" in ops or "StatelessWhile" in ops  # the sampling loop is in there
    assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}


# float16 is emulated on CPUs (slow): the GPU recipe's policy runs in the full run, bfloat16 in the default one.
@pytest.fixture(scope="module", params=["mixed_bfloat16", pytest.param("mixed_float16", marks=pytest.mark.slow)])
def conditional_mixed_precision_export(request, tmp_path_factory):
    """A conditional model built under a mixed policy, its EMA weights perturbed so images depend on the label.

    (Untrained, the zero-initialised layers would cut the label off from the output.)
    """
    keras.mixed_precision.set_dtype_policy(request.param)
    try:
        model = make_model(num_classes=3, objective="v")
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    rng = np.random.default_rng(0)
    model.ema_network.set_weights([w + 0.05 * rng.standard_normal(w.shape) for w in model.ema_network.get_weights()])
    path = export_savedmodel(model, tmp_path_factory.mktemp("conditional"), version=2, steps=3)
    return model, tf.saved_model.load(str(path))


def test_conditional_mixed_precision_export(conditional_mixed_precision_export):
    model, saved_model = conditional_mixed_precision_export
    assert model.network.dtype_policy.compute_dtype in ("bfloat16", "float16")
    int64, int32, float32 = tf.int64, tf.int32, tf.float32
    expected_inputs = {
        "serving_default": {"seed": int64, "label": int32},
        "generate": {"seed": int64, "label": int32, "steps": int32, "eta": float32, "guidance": float32},
        "denoise": {"x_t": float32, "t": int32, "label": int32},
    }
    for name, dtypes in expected_inputs.items():
        function = saved_model.signatures[name]
        assert {key: spec.dtype for key, spec in function.structured_input_signature[1].items()} == dtypes
        output_dtypes = {spec.dtype for spec in function.structured_outputs.values()}
        assert output_dtypes == ({tf.float32} if name == "denoise" else {tf.uint8})

    seeds, labels = tf.constant([1, 2], tf.int64), tf.constant([0, 2])
    served = saved_model.signatures["serving_default"](seed=seeds, label=labels)["images"].numpy()
    np.testing.assert_array_equal(served, model.generate(seeds=[1, 2], steps=3, labels=[0, 2]))
    other_labels = saved_model.signatures["serving_default"](seed=seeds, label=tf.constant([1, 1]))["images"]
    assert not np.array_equal(served, other_labels.numpy())
    guided = saved_model.signatures["generate"](
        seed=seeds, label=labels, steps=tf.constant(2), eta=tf.constant(0.0), guidance=tf.constant(3.0)
    )["images"].numpy()
    np.testing.assert_array_equal(guided, model.generate(seeds=[1, 2], steps=2, labels=[0, 2], guidance=3.0))


@pytest.mark.parametrize(
    "signature, inputs, message",
    [
        ("serving_default", dict(label=[0, 4]), "label must be in \\[0, 3\\]"),
        ("serving_default", dict(label=[-1, 0]), "label must be in \\[0, 3\\]"),
        ("serving_default", dict(label=[0]), "one entry per seed"),
        ("generate", dict(guidance=float("inf")), "guidance must be a finite number"),
        ("denoise", dict(label=[5]), "label must be in \\[0, 3\\]"),
    ],
)
def test_bad_labels_fail_with_invalid_argument(conditional_mixed_precision_export, signature, inputs, message):
    defaults = {
        "serving_default": dict(seed=[1, 2], label=[0, 1]),
        "generate": dict(seed=[1, 2], label=[0, 1], steps=2, eta=0.0, guidance=1.0),
        "denoise": dict(x_t=np.zeros([1, 16, 16, 3], np.float32), t=[1], label=[0]),
    }[signature]
    function = conditional_mixed_precision_export[1].signatures[signature]
    dtypes = {name: spec.dtype for name, spec in function.structured_input_signature[1].items()}
    request = {name: tf.constant(value, dtypes[name]) for name, value in {**defaults, **inputs}.items()}
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        function(**request)


def tree_digest(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def test_failed_export_leaves_the_previous_version_intact(model, export_dir, tmp_path, monkeypatch):
    shutil.copytree(export_dir, tmp_path / "savedmodel")
    previous = tree_digest(tmp_path / "savedmodel" / "1")
    real_rename = os.rename

    def crash_while_writing(module, path, signatures):
        (pathlib.Path(path) / "saved_model.pb").write_bytes(b"half a protobuf")
        raise OSError("simulated crash while writing the SavedModel")

    def crash_while_publishing(source, destination):
        if ".partial-" in str(source):
            raise OSError("simulated crash while renaming the new export into place")
        real_rename(source, destination)

    def copy_of_another_export(module, path, signatures):  # a complete SavedModel, faster than saving one
        shutil.copytree(export_dir / "1", path, dirs_exist_ok=True)

    monkeypatch.setattr(tf.saved_model, "save", crash_while_writing)
    with pytest.raises(OSError, match="while writing"):
        export_savedmodel(model, tmp_path / "savedmodel", version=1, steps=2)
    # The second failure comes after a complete SavedModel was written and the old version moved aside.
    monkeypatch.setattr(tf.saved_model, "save", copy_of_another_export)
    monkeypatch.setattr(os, "rename", crash_while_publishing)
    with pytest.raises(OSError, match="while renaming"):
        export_savedmodel(model, tmp_path / "savedmodel", version=1, steps=2)
    monkeypatch.undo()

    leftovers = sorted(os.listdir(tmp_path / "savedmodel"))
    assert leftovers == [export.LOCK_FILE, "1"], "no staging or retired folders left behind"
    assert tree_digest(tmp_path / "savedmodel" / "1") == previous
    saved_model, metadata = load_savedmodel(tmp_path / "savedmodel")
    assert metadata["steps"] == EXPORT_STEPS
    assert saved_model.signatures["serving_default"](seed=tf.constant([1], tf.int64))["images"].shape == (1, 16, 16, 3)

    export_savedmodel(model, tmp_path / "savedmodel", version=1, steps=2)
    assert sorted(os.listdir(tmp_path / "savedmodel")) == [export.LOCK_FILE, "1"]
    assert export.read_metadata(tmp_path / "savedmodel" / "1")["steps"] == 2


def test_clean_up_waits_for_an_export_that_holds_the_folder(tmp_path):
    """Leftovers are removed only under the export lock, so a running export's staging folder is never taken."""
    fcntl = pytest.importorskip("fcntl")
    staging = tmp_path / ".1.partial-1234abcd"
    staging.mkdir()
    with open(tmp_path / export.LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as export_savedmodel holds it while it writes `staging`
        cleaner = threading.Thread(target=export.clean_stale_exports, args=[tmp_path])
        cleaner.start()
        cleaner.join(timeout=1.0)
        assert cleaner.is_alive() and staging.exists()
    cleaner.join(timeout=10.0)  # the lock is released: now the staging folder is a leftover
    assert not cleaner.is_alive() and not staging.exists()


def test_clean_up_needs_no_lock_without_leftovers_and_keeps_them_without_one(tmp_path, monkeypatch):
    export.clean_stale_exports(tmp_path)  # nothing to do: no lock taken, so a read-only folder would do too
    assert not any(tmp_path.iterdir())
    staging = tmp_path / ".1.partial-1234abcd"
    staging.mkdir()
    monkeypatch.setattr(export, "fcntl", None)  # as on Windows: no lock, so it may be a running export's folder
    export.clean_stale_exports(tmp_path)
    assert staging.exists()


def test_load_picks_the_highest_version_and_rejects_other_folders(export_dir, tmp_path):
    for version in ["2", "10"]:
        shutil.copytree(export_dir / "1", tmp_path / "models" / version)
    (tmp_path / "models" / ".11.partial-0000").mkdir()  # an interrupted export is not a version
    assert export.find_version_dir(tmp_path / "models") == tmp_path / "models" / "10"
    assert export.find_version_dir(tmp_path / "models" / "2") == tmp_path / "models" / "2"

    (tmp_path / "empty").mkdir()
    with pytest.raises(NotOurSavedModelError, match="no saved_model.pb and no numeric version folder"):
        load_savedmodel(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_savedmodel(tmp_path / "missing")
    tf.saved_model.save(tf.Module(), str(tmp_path / "foreign" / "1"))
    with pytest.raises(NotOurSavedModelError, match="not one exported by keras_ddpm"):
        load_savedmodel(tmp_path / "foreign")
    (tmp_path / "models" / "10" / "assets.extra" / "keras_ddpm.json").write_text('{"format": "other"}')
    with pytest.raises(NotOurSavedModelError, match="format 'other'"):
        load_savedmodel(tmp_path / "models")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(steps=0), ValueError, "steps must be in \\[1, 100\\]"),
        (dict(steps=101), ValueError, "steps must be in \\[1, 100\\]"),
        (dict(sampler="euler"), ValueError, "Unknown sampler"),
        (dict(version=-1), ValueError, "version must be an integer"),
        (dict(metadata={"objective": "x0"}), ValueError, "set by export_savedmodel"),
        (dict(metadata={"dataset": object()}), ValueError, "JSON-serialisable"),
    ],
)
def test_export_rejects_bad_arguments(model, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        export_savedmodel(model, tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # three processes that load TensorFlow and the export: the full run
def test_saved_model_cli_lists_the_three_signatures(subprocesses):
    signatures = parse_signature_defs(subprocesses("show"))
    images = ("DT_UINT8", "(-1, 16, 16, 3)")
    seed = ("DT_INT64", "(-1)")
    assert set(signatures) - {"__saved_model_init_op"} == {"serving_default", "generate", "denoise"}
    assert signatures["serving_default"] == {("inputs", "seed"): seed, ("outputs", "images"): images}
    assert signatures["generate"] == {
        ("inputs", "seed"): seed,
        ("inputs", "steps"): ("DT_INT32", "()"),
        ("inputs", "eta"): ("DT_FLOAT", "()"),
        ("outputs", "images"): images,
    }
    floats = ("DT_FLOAT", "(-1, 16, 16, 3)")
    assert signatures["denoise"] == {
        ("inputs", "x_t"): floats,
        ("inputs", "t"): ("DT_INT32", "(-1)"),
        ("outputs", "prediction"): floats,
        ("outputs", "denoised"): floats,
        ("outputs", "noise"): floats,
    }


@pytest.mark.slow  # three processes that load TensorFlow and the export: the full run
def test_saved_model_cli_run_serves_the_same_images(subprocesses, model):
    # saved_model_cli run loads the SavedModel the TF1 way (a Session restoring variables), as TF Serving does.
    subprocesses("run")
    images = np.load(subprocesses.workdir / "images.npy")
    np.testing.assert_array_equal(images, model.generate(seeds=SEEDS, steps=EXPORT_STEPS))


@pytest.mark.slow  # three processes that load TensorFlow and the export: the full run
def test_fresh_process_without_keras_ddpm_generates_the_same_images(subprocesses, model):
    report = json.loads(subprocesses("fresh").strip().splitlines()[-1])
    assert report["keras_ddpm"] is False
    assert report["metadata"]["dataset"] == "toy" and report["metadata"]["steps"] == EXPORT_STEPS
    results = np.load(subprocesses.workdir / "fresh.npz")
    # Tolerance 0: on one device the SavedModel runs the very function generate() runs.
    np.testing.assert_array_equal(results["served"], model.generate(seeds=SEEDS, steps=EXPORT_STEPS))
    np.testing.assert_array_equal(results["generated"], model.generate(seeds=[3, 7], steps=3, eta=0.5))
