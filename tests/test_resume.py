"""Runs that cannot get stuck: kept checkpoints train well, damaged ones fall back, resume is step-exact.

The divergence test trains a real (tiny) run in-process and then drives it to diverge; the others build
checkpoints directly, which is much faster than training for them.
"""

import csv
import logging
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf

from keras_ddpm import callbacks
from keras_ddpm.config import ModelConfig
from keras_ddpm.config import TrainConfig
from keras_ddpm.errors import TrainingDiverged
from keras_ddpm.export import read_metadata
from keras_ddpm.files import read_json, write_json
from keras_ddpm.runs import (clean_stale_files, export_run, load_generator, load_run, prepare_run_directory, reexport,
                             read_run_config, restore_checkpoint, trim_log, weights_problem)
from keras_ddpm.training import make_optimizer, train

TINY = ModelConfig(image_size=16, width=8, channel_multipliers=(1,), num_res_blocks=1, attention_resolutions=(),
                   bottleneck_attention=False, norm_groups=4, num_timesteps=50, dropout=0.0, num_classes=0,
                   ema_decay=0.9)
FAST = dict(dataset="synthetic", batch_size=8, warmup_steps=1, learning_rate=1e-3, num_samples=4, sample_steps=2,
            sample_every_epochs=1000, export=False, verbose=0)
PROBE = (tf.random.stateless_uniform([8, 16, 16, 3], [0, 1], -1.0, 1.0), None)


def checkpoint_steps(run_dir) -> list[int]:
    state = tf.train.get_checkpoint_state(str(run_dir / "checkpoints"))
    return [int(pathlib.Path(path).name.removeprefix("ckpt-")) for path in state.all_model_checkpoint_paths]


def run_with_checkpoints(run_dir, wreck_last=False):
    """A run directory with checkpoints at steps 1, 2 and 3 of sane weights (the last one wrecked if asked)."""
    model = TINY.build()
    model.compile(optimizer=make_optimizer(TrainConfig()))
    prepare_run_directory(run_dir, TINY, TrainConfig(dataset="synthetic"))
    manager, _ = restore_checkpoint(run_dir, model)
    model.optimizer.build(model.network.trainable_variables)
    for step in (1, 2, 3):
        model.optimizer.iterations.assign(step)
        if wreck_last and step == 3:  # finite weights that no longer denoise: what one wild update leaves
            head = model.network.get_layer("head_conv")
            head.kernel.assign(head.kernel * 1e6 + 1e3)
        manager.save(checkpoint_number=step)
    return model


def test_a_run_that_diverges_keeps_only_checkpoints_that_train_well(tmp_path):
    """The issue's reproduction: a sane run resumed at learning rate 1e4 without clipping, one step per epoch.

    Before, the weights after the first wild update were checkpointed (their epoch's loss came from the weights
    before it) and every later rerun failed with NaN at once.
    """
    run_with_checkpoints(tmp_path)
    wild = {**FAST, "learning_rate": 1e4, "warmup_steps": 1}
    with pytest.raises(TrainingDiverged, match="--restore_checkpoint=2"):
        train(TINY, TrainConfig(train_steps=30, steps_per_epoch=1, clipnorm=None, **wild), tmp_path)
    assert checkpoint_steps(tmp_path) == [1, 2, 3]
    model, _ = load_run(tmp_path)
    model.compile(optimizer="adam")
    assert weights_problem(model, *PROBE) is None  # so a rerun at a sane learning rate continues


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    run_with_checkpoints(tmp_path)
    data_file = next((tmp_path / "checkpoints").glob("ckpt-3.data-*"))
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])  # as a full disk leaves it

    with caplog.at_level(logging.WARNING):
        load_run(tmp_path)  # what sample.py and evaluate.py use: read-only
    assert "ckpt-3" in caplog.text and checkpoint_steps(tmp_path) == [1, 2, 3]

    model = TINY.build()
    model.compile(optimizer=make_optimizer(TrainConfig()))
    manager, step = restore_checkpoint(tmp_path, model)
    assert step == 2 and manager.latest_checkpoint.endswith("ckpt-2")
    assert checkpoint_steps(tmp_path) == [1, 2] and not list((tmp_path / "checkpoints").glob("ckpt-3.*"))


def test_a_diverged_newest_checkpoint_is_skipped_and_an_older_one_can_be_chosen(tmp_path):
    run_with_checkpoints(tmp_path, wreck_last=True)
    model = TINY.build()
    model.compile(optimizer=make_optimizer(TrainConfig()))
    assert restore_checkpoint(tmp_path, model, probe_batch=PROBE)[1] == 2
    assert checkpoint_steps(tmp_path) == [1, 2]

    assert restore_checkpoint(tmp_path, model, step=1)[1] == 1  # --restore_checkpoint=1
    assert checkpoint_steps(tmp_path) == [1]
    with pytest.raises(ValueError, match="steps available: 1"):
        restore_checkpoint(tmp_path, model, step=7)


def test_load_run_reads_the_checkpoint_of_a_given_step_and_leaves_the_run_alone(tmp_path):
    """`evaluate.py --checkpoint_step`: compare runs at equal steps while they go on training."""
    trained = run_with_checkpoints(tmp_path, wreck_last=True)
    newest, _ = load_run(tmp_path)
    older, _ = load_run(tmp_path, step=2)
    head = "head_conv"
    assert np.array_equal(newest.network.get_layer(head).kernel, trained.network.get_layer(head).kernel)
    assert not np.array_equal(older.network.get_layer(head).kernel, newest.network.get_layer(head).kernel)
    assert checkpoint_steps(tmp_path) == [1, 2, 3]
    with pytest.raises(ValueError, match="steps available: 1, 2, 3"):
        load_run(tmp_path, step=7)
    with pytest.raises(ValueError, match="exported model, which has no checkpoints"):
        load_generator(pathlib.Path(__file__).resolve().parents[1] / "savedmodel", step=2)


def test_a_run_config_of_another_version_still_reads(tmp_path, caplog):
    """Fields added since take their defaults; training fields this version lacks are dropped with a warning."""
    run_with_checkpoints(tmp_path)
    config = read_json(tmp_path / "config.json")
    del config["train"]["export_max_batch"]
    config["train"]["export_steps"] = 7  # a setting the run made, not a default
    config["train"]["retired_setting"] = 1
    write_json(tmp_path / "config.json", config)
    with caplog.at_level(logging.WARNING):
        model_config, train_config = read_run_config(tmp_path)
    assert "retired_setting" in caplog.text
    assert model_config == TINY and train_config.export_max_batch == TrainConfig().export_max_batch
    assert (train_config.dataset, train_config.export_steps) == ("synthetic", 7)
    assert load_run(tmp_path)[0].metadata["training_steps"] == 3

    config["model"]["wings"] = 2  # a model this version cannot build must not be read as another one
    write_json(tmp_path / "config.json", config)
    with pytest.raises(ValueError, match="config.json does not hold a valid run config.*wings"):
        read_run_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="No run directory at"):
        read_run_config(tmp_path / "missing")


def test_export_run_takes_the_runs_export_settings_unless_told_otherwise(tmp_path):
    model = TINY.build()
    run = TrainConfig(dataset="synthetic", export_sampler="dpm++", export_steps=7, export_eta=0.5, export_max_batch=8)
    as_run = read_metadata(export_run(model, tmp_path, TINY, run, training_steps=3))
    assert (as_run["sampler"], as_run["steps"], as_run["eta"], as_run["max_batch_size"]) == ("dpm++", 7, 0.5, 8)
    assert (as_run["training_steps"], as_run["dataset"]) == (3, "synthetic")
    assert ModelConfig.from_dict(as_run["model_config"]) == TINY
    other = read_metadata(export_run(model, tmp_path, TINY, run, 3, version=2, sampler="ddim"))
    assert (other["sampler"], other["steps"], other["eta"]) == ("ddim", 50, 0.0)  # DDIM's own steps and eta


def test_an_export_exports_again_with_other_sampling_defaults(tmp_path):
    """`reexport` rebuilds the network from the export's model config and weights: same images, new defaults."""
    model = TINY.build()
    model.ema_network.set_weights([w + 0.01 for w in model.ema_network.get_weights()])  # not the initial weights
    run = TrainConfig(dataset="synthetic", export_sampler="dpm++", export_steps=7, export_max_batch=8)
    export_run(model, tmp_path / "first", TINY, run, training_steps=3)
    again = reexport(tmp_path / "first", tmp_path / "again", sampler="edm", eta=1.0)
    metadata = read_metadata(again)
    assert (metadata["sampler"], metadata["steps"], metadata["eta"], metadata["spacing"]) == ("edm", 50, 1.0, "karras")  # 199 capped at T
    assert (metadata["training_steps"], metadata["dataset"], metadata["max_batch_size"]) == (3, "synthetic", 8)
    first, second = load_generator(tmp_path / "first"), load_generator(tmp_path / "again")
    np.testing.assert_array_equal(first.generate(seeds=[1, 2], steps=3), second.generate(seeds=[1, 2], sampler="dpm++",
                                                                                          steps=3))
    np.testing.assert_array_equal(first.generate(seeds=[1, 2], sampler="edm", steps=5, eta=1.0),
                                  second.generate(seeds=[1, 2], steps=5))  # the export's own graph, its default eta


def test_an_export_whose_model_config_does_not_fit_is_not_exported_again(tmp_path):
    run = TrainConfig(dataset="synthetic")
    version_dir = export_run(TINY.build(), tmp_path / "first", TINY, run, training_steps=3)
    metadata = read_json(version_dir / "assets.extra" / "keras_ddpm.json")
    metadata["model_config"]["width"] = 16  # other shapes: the weights would not fit
    write_json(version_dir / "assets.extra" / "keras_ddpm.json", metadata)
    with pytest.raises(ValueError, match="do not match its model_config"):
        reexport(tmp_path / "first", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    run_with_checkpoints(tmp_path)
    for data_file in (tmp_path / "checkpoints").glob("ckpt-*.data-*"):
        data_file.write_bytes(b"")
    with pytest.raises(ValueError, match="No checkpoint in .* can be used"):
        load_run(tmp_path)


def test_checkpoint_callback_refuses_weights_that_do_not_train(tmp_path):
    model = run_with_checkpoints(tmp_path, wreck_last=True)
    manager, _ = restore_checkpoint(tmp_path, model)
    saver = callbacks.Checkpoint(manager, *PROBE)
    saver.set_model(model)
    model.optimizer.iterations.assign(9)
    saver.on_epoch_end(0, {"loss": 0.5})
    assert "probe batch" in saver.refused and model.stop_training and 9 not in checkpoint_steps(tmp_path)


def test_trim_log_drops_steps_after_the_checkpoint_and_a_torn_line(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,loss,step\n0,0.9,10\n1,0.8,20\n2,0.7,30\n3,0.6")
    trim_log(log, 20)
    assert log.read_text() == "epoch,loss,step\n0,0.9,10\n1,0.8,20\n"
    log.write_text(log.read_text() + "2,0.7")  # torn, but within the steps kept
    trim_log(log, 20)
    assert log.read_text() == "epoch,loss,step\n0,0.9,10\n1,0.8,20\n"
    trim_log(log, 0)
    assert not log.exists()


def test_leftovers_of_killed_saves_and_exports_are_cleaned(tmp_path):
    run_with_checkpoints(tmp_path)
    checkpoints, exports = tmp_path / "checkpoints", tmp_path / "savedmodel"
    (checkpoints / "ckpt-4_temp").mkdir()
    (checkpoints / "ckpt-4_temp" / "part-00000-of-00001.index").write_bytes(b"x")
    (checkpoints / "ckpt-5.index").write_bytes(b"x")  # written, but the save never reached the index
    (exports / ".1.partial-1234abcd" / "variables").mkdir(parents=True)
    (exports / "2").mkdir()
    (exports / ".2.replaced-5678abcd").mkdir()
    (exports / ".3.replaced-9abc0123").mkdir()  # killed between _publish's renames: the old version 3
    clean_stale_files(tmp_path)
    assert sorted(path.name for path in checkpoints.iterdir()) == [
        "checkpoint", *[f"ckpt-{step}.{suffix}" for step in (1, 2, 3) for suffix in ("data-00000-of-00001", "index")]
    ]
    assert sorted(path.name for path in exports.iterdir()) == [".export.lock", "2", "3"]


def test_a_resumed_run_trains_as_the_uninterrupted_one_did(tmp_path):
    """The same data (the stream goes on at the resumed step), draws (keyed by the step) and optimizer state."""
    config = dict(steps_per_epoch=2, **FAST)
    uninterrupted = train(TINY, TrainConfig(train_steps=4, **config), tmp_path / "uninterrupted")
    train(TINY, TrainConfig(train_steps=2, **config), tmp_path / "resumed")
    resumed = train(TINY, TrainConfig(train_steps=4, **config), tmp_path / "resumed")
    for expected, actual in zip(uninterrupted.ema_network.weights, resumed.ema_network.weights, strict=True):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-5, atol=1e-7, err_msg=expected.path)


def test_a_rerun_with_other_steps_per_epoch_counts_steps_exactly(tmp_path):
    run_with_checkpoints(tmp_path)
    (tmp_path / "log.csv").write_text("epoch,loss,step\n0,0.9,1\n1,0.8,2\n2,0.7,3\n")
    model = train(TINY, TrainConfig(train_steps=8, steps_per_epoch=2, **FAST), tmp_path)
    assert int(model.optimizer.iterations) == 8
    assert checkpoint_steps(tmp_path) == [5, 7, 8]
    with open(tmp_path / "log.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 5, 7, 8]
    assert rows[0]["lr"] == "NA" and float(rows[-1]["lr"]) > 0  # new columns join the header


@pytest.mark.parametrize("source_kind", ["run", "export"])
def test_a_run_can_start_from_the_ema_weights_of_another_run_or_export(tmp_path, source_kind):
    """`--init_from`: at learning rate 0 the new run's weights are the source's EMA weights, not its own init,
    and its optimizer starts afresh."""
    source = TINY.build(seed=5)
    source.ema_network.set_weights([w + 0.01 for w in source.ema_network.get_weights()])  # not its trained weights
    if source_kind == "run":
        source.compile(optimizer=make_optimizer(TrainConfig()))
        prepare_run_directory(tmp_path / "source", TINY, TrainConfig(dataset="synthetic"))
        manager, _ = restore_checkpoint(tmp_path / "source", source)
        source.optimizer.iterations.assign(3)
        manager.save(checkpoint_number=3)
    else:
        export_run(source, tmp_path / "source", TINY, TrainConfig(dataset="synthetic"), training_steps=3)
    config = TrainConfig(train_steps=1, steps_per_epoch=1, init_from=str(tmp_path / "source"),
                         **{**FAST, "learning_rate": 0.0, "export": source_kind == "export"})
    model = train(TINY, config, tmp_path / "further")
    assert int(model.optimizer.iterations) == 1
    for network in (model.network, model.ema_network):
        for expected, actual in zip(source.ema_network.weights, network.weights, strict=True):
            np.testing.assert_allclose(actual.numpy(), expected.numpy(), atol=1e-7, err_msg=expected.path)
    if source_kind == "export":
        metadata = read_metadata(tmp_path / "further" / "savedmodel" / "1")
        assert (metadata["init_from"], metadata["training_steps"]) == (str(tmp_path / "source"), 1)


def test_a_run_resumes_from_its_own_checkpoint_and_keeps_the_init_from_it_started_with(tmp_path):
    config = dict(steps_per_epoch=1, **FAST)
    export_run(TINY.build(seed=5), tmp_path / "source", TINY, TrainConfig(dataset="synthetic"), training_steps=3)
    train(TINY, TrainConfig(train_steps=1, init_from=str(tmp_path / "source"), **config), tmp_path / "further")
    first = load_run(tmp_path / "further")[0].network.get_weights()
    shutil.rmtree(tmp_path / "source")  # not needed any more: the run has checkpoints of its own
    resumed = train(TINY, TrainConfig(train_steps=1, init_from=str(tmp_path / "elsewhere"), **config),
                    tmp_path / "further")
    for expected, actual in zip(first, resumed.network.get_weights(), strict=True):
        np.testing.assert_array_equal(actual, expected)
    assert read_run_config(tmp_path / "further")[1].init_from == str(tmp_path / "source")  # what its export records


def test_bad_init_from_or_restore_checkpoint_fails_before_the_run_directory_is_written(tmp_path):
    export_run(TINY.build(), tmp_path / "export", TINY, TrainConfig(dataset="synthetic"), training_steps=3)
    prepare_run_directory(tmp_path / "untrained_run", TINY, TrainConfig(dataset="synthetic"))
    wider = ModelConfig(**{**TINY.to_dict(), "width": 16})
    attempts = [
        (wider, dict(init_from=str(tmp_path / "export")), "holds a different network from this run's"),
        (TINY, dict(init_from=str(tmp_path / "nothing")), "--init_from=.*no export or run directory there"),
        (TINY, dict(init_from=str(tmp_path / "untrained_run")), "--init_from=.* cannot be loaded: .*no checkpoint"),
        (TINY, dict(init_from=str(tmp_path / "export"), restore_checkpoint=5), "No checkpoint of step 5"),
    ]
    for model_config, flags, message in attempts:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train(model_config, TrainConfig(train_steps=1, **flags, **FAST), tmp_path / "further")
        assert not (tmp_path / "further").exists(), flags
