"""train.py and sample.py end to end: smoke run, SIGKILL + resume, MirroredStrategy, sampling, error paths."""

import csv
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def run_script(script, *args, timeout=600):
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=REPO, env=ENV, capture_output=True, text=True,
        timeout=timeout,
    )


def log_rows(run_dir):
    with open(run_dir / "log.csv") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    result = run_script("train.py", "--flagfile=flags/smoke.flags", f"--output_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_smoke_run_writes_everything(smoke_run):
    assert (smoke_run / "config.json").is_file()
    assert tf.train.latest_checkpoint(str(smoke_run / "checkpoints")).endswith("ckpt-40")  # named by step
    rows = log_rows(smoke_run)
    assert [int(row["step"]) for row in rows] == [20, 40]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert {"val_loss", "val_ema_loss", "lr", "images_seen"} <= set(rows[0])
    assert sorted(p.name for p in (smoke_run / "samples").iterdir()) == ["step_0000020.png", "step_0000040.png"]
    assert (smoke_run / "loss.png").stat().st_size > 1000
    assert list((smoke_run / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert list((smoke_run / "tensorboard" / "samples").glob("events.out.tfevents.*"))
    assert (smoke_run / "savedmodel" / "1" / "saved_model.pb").is_file()


@pytest.mark.slow  # a sample.py process on a run directory (tests/test_resume.py covers its checkpoint choice)
def test_sample_py_on_the_smoke_run(smoke_run, tmp_path):
    for model in [smoke_run, smoke_run / "savedmodel"]:
        result = run_script(
            "sample.py", f"--model={model}", "--num_images=6", "--steps=4", "--batch_size=4",
            f"--output={tmp_path / model.name / 'grid.png'}", f"--save_npz={tmp_path / model.name / 'images.npz'}",
            "--process_strip",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        images = np.load(tmp_path / model.name / "images.npz")["images"]
        assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
        for name in ["grid.png", "forward.png", "reverse.png"]:
            assert (tmp_path / model.name / name).stat().st_size > 100
    # The run directory (checkpoint) and its export give the same images for the same seeds.
    from_run = np.load(tmp_path / smoke_run.name / "images.npz")["images"]
    from_export = np.load(tmp_path / "savedmodel" / "images.npz")["images"]
    assert np.abs(from_run.astype(int) - from_export.astype(int)).max() <= 1


@pytest.mark.slow  # an export.py process (tests/test_resume.py covers export_run in-process)
def test_export_py_exports_the_checkpoint_asked_for(smoke_run, tmp_path):
    """`python export.py`: any checkpoint of a run, with the run's export settings unless a flag overrides one."""
    from keras_ddpm.export import read_metadata
    from keras_ddpm.runs import load_generator, load_run

    result = run_script("export.py", f"--model={smoke_run}", "--checkpoint_step=20", f"--export_dir={tmp_path}",
                        "--steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sharding callback" not in result.stderr  # TensorFlow's INFO chatter stays out
    assert sorted(path.name for path in tmp_path.iterdir()) == [".export.lock", "1"]
    metadata = read_metadata(tmp_path / "1")
    assert (metadata["training_steps"], metadata["sampler"], metadata["steps"]) == (20, "ddim", 4)  # the run's ddim
    assert metadata["dtype_policy"] == "float32" and metadata["model_config"]["width"] == 16

    request = dict(seeds=[0, 1, 2], sampler="ddim", steps=4)
    exported = load_generator(tmp_path).generate(seeds=request["seeds"])
    at_step_20, _ = load_run(smoke_run, 20)
    newest, _ = load_run(smoke_run)
    assert np.array_equal(exported, at_step_20.generate(**request))
    assert not np.array_equal(exported, newest.generate(**request))


@pytest.mark.slow  # three export.py processes
def test_export_py_cleans_leftovers_points_at_the_served_version_and_fails_cleanly(smoke_run, tmp_path):
    from keras_ddpm.export import read_metadata

    (tmp_path / ".1.partial-0badc0de" / "variables").mkdir(parents=True)  # what a killed export leaves
    (tmp_path / "5").mkdir()
    (tmp_path / "5" / "saved_model.pb").write_bytes(b"a newer version, which TF Serving serves")
    result = run_script("export.py", f"--model={smoke_run}", f"--export_dir={tmp_path}", "--steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == [".export.lock", "1", "5"]
    assert read_metadata(tmp_path / "1")["training_steps"] == 40
    assert "also holds version 5, which TF Serving" in result.stdout

    for args, message in [([f"--export_dir={tmp_path / '1'}"], "is a version folder"),
                          ([f"--export_dir={tmp_path / 'new'}", "--steps=100000"], "steps must be in [1, 100]")]:
        result = run_script("export.py", f"--model={smoke_run}", *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert message in result.stderr
    assert not list(tmp_path.rglob("*.partial*")) and not (tmp_path / "new").exists()  # nothing half-written


@pytest.mark.slow  # three train.py runs; bench/fault_injection.py does ten kills
def test_sigkill_then_resume_continues_the_same_run(tmp_path):
    args = ["--flagfile=flags/smoke.flags", f"--output_dir={tmp_path}", "--steps_per_epoch=5", "--train_steps=1000",
            "--validation_images=0", "--sample_every_epochs=1000", "--export=false"]
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600  # the cores may be shared
        while not (tmp_path / "checkpoints" / "ckpt-10.index").exists():
            assert process.poll() is None and time.time() < deadline, "training did not reach a second checkpoint"
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()

    saved_path = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    saved_step = int(saved_path.rsplit("-", 1)[1])
    reader = tf.train.load_checkpoint(saved_path)

    # Restoring in a fresh process state gives exactly the saved weights, EMA weights and optimizer state.
    from keras_ddpm.config import ModelConfig, TrainConfig
    from keras_ddpm.files import read_json
    from keras_ddpm.runs import restore_checkpoint
    from keras_ddpm.training import make_optimizer

    model = ModelConfig.from_dict(read_json(tmp_path / "config.json")["model"]).build()
    model.compile(optimizer=make_optimizer(TrainConfig()))
    _, restored_step = restore_checkpoint(tmp_path, model)
    assert restored_step == int(model.optimizer.iterations) == saved_step
    saved = {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(saved_path)}
    # (The checkpoint stores each variable once: the network's under the optimizer that updates it.)
    head = model.network.get_layer("head_conv")
    index = [v.path for v in model.network.trainable_variables].index(head.kernel.path)
    np.testing.assert_array_equal(head.kernel.numpy(), saved[f"optimizer/_trainable_variables/{index}/.ATTRIBUTES/VARIABLE_VALUE"])
    ema_head = model.ema_network.get_layer("head_conv")
    key = f"ema_network/_operations/{model.ema_network.operations.index(ema_head)}/_kernel/.ATTRIBUTES/VARIABLE_VALUE"
    np.testing.assert_array_equal(ema_head.kernel.numpy(), saved[key])
    assert not np.array_equal(model.network.get_layer("head_conv").kernel.numpy(),
                              model.ema_network.get_layer("head_conv").kernel.numpy())
    moments = [v for v in model.optimizer.variables if "head_conv" in v.path and "momentum" in v.path]
    assert moments and np.abs(moments[0].numpy()).sum() > 0

    # The same command (with a reachable end and other steps per epoch) resumes at the saved optimizer step and
    # keeps counting steps exactly; the log holds each step once, whatever the kill tore or logged past the save.
    end_step = saved_step + 4
    result = run_script("train.py", *args[:2], f"--train_steps={end_step}", "--steps_per_epoch=3",
                        "--validation_images=0", "--sample_every_epochs=1000", "--export=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Finished" in result.stdout and "savedmodel" not in result.stdout  # --export=false
    steps = [int(row["step"]) for row in log_rows(tmp_path)]
    assert steps == list(range(5, saved_step + 1, 5)) + [saved_step + 3, end_step]
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith(f"ckpt-{end_step}")
    assert not list((tmp_path / "checkpoints").glob("*_temp"))


MIRRORED_SCRIPT = """
import sys, json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
import keras_ddpm
from keras_ddpm.config import ModelConfig, TrainConfig
from keras_ddpm.training import make_optimizer

def run(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = ModelConfig(image_size=16, width=16, channel_multipliers=(1, 2), num_res_blocks=1,
                            attention_resolutions=(), norm_groups=8, dropout=0.0, num_timesteps=100).build()
        if sys.argv[2] == "sgd":
            optimizer = keras.optimizers.SGD(float(sys.argv[1]))
        else:  # the project's fused Adam, as train() builds it
            optimizer = make_optimizer(TrainConfig(learning_rate=float(sys.argv[1]), warmup_steps=1))
        model.compile(optimizer=optimizer)
    start = [w.copy() for w in model.network.get_weights()]
    images = np.random.default_rng(0).uniform(-1, 1, (256, 16, 16, 3)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(32)
    history = model.fit(dataset, epochs=1, verbose=0)
    change = np.sqrt(sum(((w - s) ** 2).sum() for w, s in zip(model.network.get_weights(), start)))
    return strategy.num_replicas_in_sync, history.history["loss"][-1], float(change)

one = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
two = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print(json.dumps({"one": one, "two": two}))
"""


@pytest.mark.slow  # trains the same model twice
@pytest.mark.parametrize("optimizer, learning_rate", [("sgd", "0.05"), ("adam", "1e-3")])
def test_mirrored_strategy_matches_one_device(optimizer, learning_rate):
    """Two replicas on two logical CPUs: same mean loss and same size of update as one device.

    The loss is random (t and noise), so it matches within a statistical tolerance; a missing 1/replicas
    factor in the gradients would double the SGD update, far outside it. The project's fused Adam once failed
    outright with two local replicas (it read their per-replica learning rate outside a replica context).
    """
    import json

    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, learning_rate, optimizer], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    (replicas_one, loss_one, change_one), (replicas_two, loss_two, change_two) = figures["one"], figures["two"]
    assert (replicas_one, replicas_two) == (1, 2)
    assert loss_two == pytest.approx(loss_one, rel=0.1)
    assert change_two == pytest.approx(change_one, rel=0.25)


INIT_FROM_MIRRORED_SCRIPT = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
from keras_ddpm.config import ModelConfig, TrainConfig
from keras_ddpm.runs import export_run, load_export
from keras_ddpm.training import train

tiny = ModelConfig(image_size=16, width=8, channel_multipliers=(1,), num_res_blocks=1, attention_resolutions=(),
                   bottleneck_attention=False, norm_groups=4, num_timesteps=50, dropout=0.0)
export_run(tiny.build(seed=5), sys.argv[1] + "/source", tiny, TrainConfig(dataset="synthetic"), training_steps=3)
model = train(tiny, TrainConfig(dataset="synthetic", strategy="mirrored", init_from=sys.argv[1] + "/source",
                                learning_rate=0.0, batch_size=8, train_steps=1, steps_per_epoch=1, num_samples=4,
                                sample_steps=2, export=False, verbose=0), sys.argv[1] + "/run")
assert model.distribute_strategy.num_replicas_in_sync == 2
source = load_export(sys.argv[1] + "/source")[0]
for network in (model.network, model.ema_network):
    for expected, actual in zip(source.ema_network.weights, network.weights, strict=True):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), atol=1e-7, err_msg=expected.path)
print("init_from under MirroredStrategy: ok")
"""


def test_init_from_sets_the_weights_of_every_replica(tmp_path):
    """`--init_from` assigns the source's weights outside the strategy scope; each replica must get them."""
    result = subprocess.run([sys.executable, "-c", INIT_FROM_MIRRORED_SCRIPT, str(tmp_path)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "init_from under MirroredStrategy: ok" in result.stdout


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("train.py", ["--flagfile=flags/smoke.flags", "--dataset=celeba", "--data_dir=/nonexistent/celeba",
                      "--output_dir={tmp}/run"], "celeba"),
        ("train.py", ["--flagfile=flags/smoke.flags", "--output_dir=/proc/forbidden"], "Cannot write"),
        ("sample.py", ["--model=/nonexistent/model", "--output={tmp}/new/grid.png"], "No model at"),
        ("sample.py", ["--model=tests", "--output={tmp}/new/grid.png"], "not a SavedModel"),
        ("train.py", ["--flagfile=flags/smoke.flags", "--steps_per_epoch=0", "--output_dir={tmp}/run"],
         "steps_per_epoch must be at least 1"),
        ("sample.py", ["--output={tmp}"], "is a folder"),
        ("export.py", ["--model={tmp}", "--export_dir={tmp}/export"], "neither a training run directory"),
        ("export.py", ["--model=savedmodel", "--checkpoint_step=5", "--export_dir={tmp}/export"], "drop --checkpoint_step"),
    ],
)
def test_errors_are_one_clear_line_and_a_failing_exit_code(script, args, message, tmp_path):
    result = run_script(script, *[arg.format(tmp=tmp_path) for arg in args])
    assert result.returncode == 1
    assert message.lower() in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("config.json")) and not list(tmp_path.rglob("*.partial*"))  # nothing half-written
    assert not list(tmp_path.rglob("saved_model.pb")) and not (tmp_path / "new").exists()


def test_output_checks_create_nothing_for_a_run_that_may_fail(tmp_path):
    from keras_ddpm.files import check_output_file, check_writable

    check_output_file(tmp_path / "new" / "deeper" / "grid.png")
    check_writable(tmp_path / "export", create=False)
    assert not any(tmp_path.iterdir())  # not even the probe
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="Cannot write to"):
        check_output_file(tmp_path / "file" / "grid.png")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_output_file(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # the writer could not create a folder here
    with pytest.raises(PermissionError, match="Cannot write to"):
        check_output_file(tmp_path / "dangling" / "grid.png")


def test_bad_counts_and_options_are_clear_errors():
    """What train.py and sample.py turn into one-line errors (checked in-process: each script start costs seconds)."""
    from keras_ddpm.config import TrainConfig
    from keras_ddpm.generation import generate_in_batches
    from keras_ddpm.runs import load_generator

    for field in ("steps_per_epoch", "train_steps", "batch_size", "keep_checkpoints"):
        with pytest.raises(ValueError, match=f"{field} must be at least 1"):
            TrainConfig(**{field: 0})
    shipped = load_generator(REPO / "savedmodel")
    for counts in (dict(num_images=0), dict(batch_size=0)):
        with pytest.raises(ValueError, match="num_images and batch_size must be at least 1"):
            generate_in_batches(shipped, **{"num_images": 4, "batch_size": 4, **counts})
    with pytest.raises(ValueError, match="guidance needs a conditional model"):
        shipped.generate(2, guidance=3.0)


@pytest.mark.parametrize("settings, message", [
    (dict(export_steps=2000), "--export_steps must be in \\[1, 1000\\]"),
    (dict(sample_steps=1001), "--sample_steps must be in \\[1, 1000\\]"),
    (dict(export_eta=1.5), "--export_eta must be in \\[0, 1\\]"),
])
def test_sampling_settings_out_of_range_fail_before_training(tmp_path, settings, message):
    """Not at the first sample grid, nor at the export after the whole run."""
    from keras_ddpm.config import ModelConfig, TrainConfig
    from keras_ddpm.training import train

    with pytest.raises(ValueError, match=message):
        train(ModelConfig(), TrainConfig(dataset="synthetic", **settings), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_bad_model_config_writes_nothing_that_blocks_the_corrected_rerun(tmp_path):
    result = run_script("train.py", "--flagfile=flags/smoke.flags", f"--output_dir={tmp_path / 'run'}",
                        "--norm_groups=5")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "config.json").exists()


def test_resuming_with_a_different_architecture_is_refused(smoke_run):
    result = run_script("train.py", "--flagfile=flags/smoke.flags", f"--output_dir={smoke_run}", "--width=32")
    assert result.returncode == 1
    assert "different model" in result.stderr and "Traceback" not in result.stderr
