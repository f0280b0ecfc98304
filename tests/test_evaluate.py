"""evaluate() and evaluate.py on a tiny model trained a few steps on synthetic shapes; the SWDMonitor callback.

One model is trained once per module, with SWDMonitor and CSVLogger in its `fit()`, then saved both as a run
directory and as a SavedModel. The command-line runs start as subprocesses right after that and run while
the in-process tests do; the tests reading their results come last.
"""

import json
import math
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_ddpm import callbacks, evaluation
from keras_ddpm.config import ModelConfig
from keras_ddpm.data import load_images, make_dataset
from keras_ddpm.export import export_savedmodel
from keras_ddpm.config import TrainConfig
from keras_ddpm.runs import prepare_run_directory, restore_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ModelConfig(image_size=16, channels=3, width=8, channel_multipliers=(1,), num_res_blocks=1,
                   attention_resolutions=(), bottleneck_attention=False, norm_groups=4, num_timesteps=50, dropout=0.0)
FAST = dict(num_images=16, nll_images=4, nll_draws=4, steps=3, batch_size=16, verbose=False)
CLI_FAST = ["--num_images=16", "--nll_images=4", "--nll_draws=4", "--steps=3", "--batch_size=16"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three one-step epochs with SWD measured at epochs 1 and 2 (the first, then every 2nd); the run saved twice."""
    folder = tmp_path_factory.mktemp("evaluate")
    keras.utils.set_random_seed(0)
    model = TINY.build()
    # Eager steps: tracing the train step would cost more than these three steps.
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    monitor = callbacks.SWDMonitor(load_images("synthetic", "validation", 16, 16), every_epochs=2,
                                   best_weights_path=folder / "best_ema.weights.h5", steps=3, batch_size=16)
    csv_logger = keras.callbacks.CSVLogger(str(folder / "log.csv"))
    monitor.weights_by_epoch = []  # (EMA, raw) weights at each epoch's end, for the best-weights check
    snapshot = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: monitor.weights_by_epoch.append(
        (model.ema_network.get_weights(), model.network.get_weights())))
    model.fit(make_dataset("synthetic", "train", 16, 8), epochs=3, steps_per_epoch=1, verbose=0, shuffle=False,
              callbacks=[monitor, csv_logger, snapshot])
    run_dir = folder / "run"
    prepare_run_directory(run_dir, TINY, TrainConfig(dataset="synthetic"))
    manager, _ = restore_checkpoint(run_dir, model)
    manager.save()
    export_savedmodel(model, folder / "savedmodel", steps=3, metadata={"dataset": "synthetic"})
    return model, monitor, folder


@pytest.fixture(scope="module")
def cli_runs(trained):
    """evaluate.py on the SavedModel (default JSON path), and with a bad --metrics; started now, read later."""
    _, _, folder = trained
    commands = {
        "savedmodel": [f"--model={folder / 'savedmodel'}", "--metrics=swd,nll", *CLI_FAST],
        "bad_metric": [f"--model={folder / 'savedmodel'}", "--metrics=swd,bogus"],
    }
    processes = {
        name: subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), *arguments], cwd=folder,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, arguments in commands.items()
    }
    yield processes, folder
    for process in processes.values():  # a failed or deselected reader leaves none running
        process.kill()
        process.communicate()


def finished(process):
    stdout, stderr = process.communicate(timeout=600)  # the cores may be shared
    return process.returncode, stdout, stderr


# -- SWDMonitor ------------------------------------------------------------------------------------------


def test_swd_monitor_logs_to_csv_and_keeps_the_best_ema_weights(trained, cli_runs):  # cli_runs: start them early
    model, monitor, folder = trained
    rows = (folder / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    swd_column = [row.split(",")[header.index("swd")] for row in rows[1:]]
    assert swd_column[2] == "NA"  # epoch 3 is not measured
    measured = [float(value) for value in swd_column[:2]]
    assert all(math.isfinite(value) and value > 0 for value in measured)
    record = json.loads((folder / "best_ema.json").read_text())
    assert record["swd"] == min(measured) == monitor.best
    assert record["epoch"] == 1 + measured.index(min(measured))
    assert record["step"] == record["epoch"]  # one step per epoch
    restored = keras.models.clone_model(model.ema_network)
    restored.load_weights(folder / "best_ema.weights.h5")
    ema_weights, raw_weights = monitor.weights_by_epoch[record["epoch"] - 1]  # the best epoch's, not the last one's
    for saved, ema in zip(restored.get_weights(), ema_weights, strict=True):
        np.testing.assert_array_equal(saved, ema)
    assert any(not np.array_equal(ema, raw) for ema, raw in zip(ema_weights, raw_weights))


def test_swd_monitor_resumes_with_its_best_score(trained):
    _, monitor, folder = trained
    resumed = callbacks.SWDMonitor(monitor.real_images, best_weights_path=folder / "best_ema.weights.h5")
    resumed.on_train_begin()
    assert resumed.best == monitor.best


def test_swd_monitor_rejects_images_too_small_for_swd():
    with pytest.raises(ValueError, match="at least 16x16"):
        callbacks.SWDMonitor(np.zeros((4, 8, 8, 3), np.uint8))


# -- evaluate() -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_results(trained):
    _, _, folder = trained
    return evaluation.evaluate(str(folder / "run"), metrics="swd,nll", **FAST)


def test_evaluate_run_directory(run_results):
    results = run_results
    assert results["dataset"] == "synthetic"  # read from the run's config.json
    assert results["failed"] == {}
    assert list(results["metrics"]) == ["swd", "nll"]
    assert set(results["metrics"]["swd"]) == {"swd_16", "swd_mean"}
    assert results["metrics"]["swd"]["swd_mean"] > 0
    nll = results["metrics"]["nll"]
    assert nll["num_images"] == 4 and nll["num_timestep_draws"] == 4
    assert 0 < nll["bpd"] < 100 and nll["stderr"] > 0
    assert nll["bpd"] == pytest.approx(nll["prior_bpd"] + nll["diffusion_bpd"] + nll["decoder_bpd"])
    assert results["samples"] == {"source": "generated", "num_images": 16, "sampler": "ddim", "steps": 3,
                                  "eta": 0.0, "seeds": [0, 15], "precision": "float32"}
    json.dumps(results)  # what evaluate.py writes
    table = evaluation.format_table(results)
    assert "NLL bound, bits/dim" in table and "SWD x1e3, mean" in table


def test_missing_inception_weights_fail_fid_and_kid_only(trained):
    model, _, folder = trained
    samples = model.generate(16, steps=3)
    results = evaluation.evaluate(
        None, samples=samples, dataset="synthetic", metrics=["kid", "swd", "fid"], num_images=16,
        inception_weights=str(folder / "missing.h5"), verbose=False,
    )
    assert set(results["failed"]) == {"fid", "kid"}
    assert "missing.h5" in results["failed"]["fid"] and "--inception_weights" in results["failed"]["kid"]
    assert list(results["metrics"]) == ["swd"]
    assert results["samples"] == {"source": "given", "num_images": 16, "num_requested": 16}  # + the .npz path
    assert "FAILED" in evaluation.format_table(results)


def test_samples_must_match_the_model(trained, tmp_path):
    model, _, _ = trained
    with pytest.raises(ValueError, match="samples are"):
        evaluation.evaluate(model, samples=np.zeros((4, 32, 32, 3), np.uint8), dataset="synthetic", metrics="swd,nll")
    np.savez(tmp_path / "wrong.npz", pictures=np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'images' array"):
        evaluation.load_samples_npz(tmp_path / "wrong.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="text.npz is not an .npz archive"):
        evaluation.load_samples_npz(tmp_path / "text.npz")


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (2, 16, 16, 1)])
def test_given_samples_are_checked_against_the_model_even_without_nll(trained, shape):
    _, _, folder = trained
    with pytest.raises(ValueError, match="samples are .* pass the model that made them"):
        evaluation.evaluate(str(folder / "savedmodel"), samples=np.zeros(shape, np.uint8), metrics="swd",
                            dataset="synthetic", num_images=2, verbose=False)


def test_fewer_samples_than_asked_for_are_reported(trained):
    model, _, _ = trained
    results = evaluation.evaluate(None, samples=model.generate(5, steps=3), dataset="synthetic", metrics="swd",
                                  num_images=16, verbose=False)
    assert results["samples"] == {"source": "given", "num_images": 5, "num_requested": 16}
    assert "5 samples (from given; fewer than the 16 asked for)" in evaluation.format_table(results)


def test_nearest_neighbours_find_copies_across_chunks():
    references = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    queries = references[[3, 17]].copy()
    queries[1, 0, 0, 0] ^= 16  # one value off by 16
    indices, distances = evaluation.nearest_neighbours(queries, references, chunk_size=7)
    assert list(indices) == [3, 17]
    assert distances == pytest.approx([0.0, 16 / math.sqrt(8 * 8 * 3)])


def test_memorisation_check_on_a_model_and_its_figure(trained, tmp_path):
    model, _, _ = trained
    figure = tmp_path / "nearest.png"
    results = evaluation.evaluate(model, dataset="synthetic", metrics="nn", nn_png=str(figure), nn_train_images=64,
                                  **FAST)
    nn = results["metrics"]["nn"]
    assert (nn["num_samples"], nn["num_held_out"], nn["num_train_images"]) == (16, 16, 64)
    assert 0 < nn["sample_rms_min"] <= nn["sample_rms_median"] and nn["held_out_rms_median"] > 0
    strip = keras.utils.load_img(figure)  # 16 samples: rows of 8 samples, each above its 8 nearest images
    assert strip.size[0] > strip.size[1] > 0
    assert "NN RMS distance to train, samples" in evaluation.format_table(results)


@pytest.mark.parametrize("names", ["swd,psnr", "", ["fid", "inception"]])
def test_unknown_metrics_are_refused(names):
    with pytest.raises(ValueError, match="choose from swd, fid, kid, nll"):
        evaluation.parse_metrics(names)


def test_default_output_path(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert evaluation.default_output_path(tmp_path / "run") == tmp_path / "run" / "evaluation.json"
    assert evaluation.default_output_path(tmp_path / "x" / "savedmodel") == tmp_path / "x" / "evaluation.json"
    assert evaluation.default_output_path(tmp_path / "x" / "savedmodel" / "3") == tmp_path / "x" / "evaluation.json"
    assert evaluation.default_output_path(None) == pathlib.Path("evaluation.json")


# -- evaluate.py ----------------------------------------------------------------------------------------


def test_cli_on_the_savedmodel_matches_the_run_directory(cli_runs, run_results):
    processes, folder = cli_runs
    status, stdout, stderr = finished(processes["savedmodel"])
    assert status == 0, stderr
    assert "NLL bound, bits/dim" in stdout
    written = json.loads((folder / "evaluation.json").read_text())  # next to the SavedModel folder
    assert written["failed"] == {} and written["dataset"] == "synthetic"
    # Same weights, seeds and draws through the SavedModel's signatures: the same numbers.
    for metric in ("swd", "nll"):
        assert written["metrics"][metric] == pytest.approx(run_results["metrics"][metric], rel=1e-4)


def test_cli_bad_metric_exits_with_status_1(cli_runs):
    processes, _ = cli_runs
    status, stdout, stderr = finished(processes["bad_metric"])
    assert status == 1
    assert "evaluate.py: error: Unknown or no metrics ['bogus']; choose from swd, fid, kid, nll" in stderr
    assert "Traceback" not in stderr
