"""The one sampling path: a plain DiffusionModel is a full `Generator`, and a `.keras` file keeps its images."""

import keras
import numpy as np
import pytest

from keras_ddpm import plots, samplers
from keras_ddpm.generation import CallProgress, check_request, generate_in_batches, resolve_sampling
from keras_ddpm.model import DiffusionModel
from keras_ddpm.schedule import NoiseSchedule
from keras_ddpm.unet import build_unet

TINY_UNET = dict(image_size=16, width=16, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=8)


@pytest.fixture(scope="module")
def trained_model():
    """A tiny model after two optimizer steps, so its weights and EMA weights differ from their initial values."""
    keras.utils.set_random_seed(0)
    model = DiffusionModel(build_unet(**TINY_UNET), NoiseSchedule("linear", 100), objective="v",
                           metadata={"dataset": "synthetic"}, seed=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype("float32")
    model.fit(images, batch_size=4, epochs=1, verbose=0)
    return model


def test_a_plain_model_has_real_metadata(trained_model):
    metadata = trained_model.metadata
    assert metadata["dataset"] == "synthetic"
    assert (metadata["image_size"], metadata["channels"], metadata["num_classes"]) == ([16, 16], 3, 0)
    assert metadata["schedule"] == trained_model.schedule.get_config() and metadata["objective"] == "v"
    assert (metadata["sampler"], metadata["eta"], metadata["spacing"]) == ("ddim", 0.0, None)
    assert trained_model.max_batch_size is None


def test_defaults_come_from_the_metadata(trained_model):
    request = check_request(trained_model, 2)
    assert (request.sampler, request.eta, request.steps) == ("ddim", 0.0, 50)
    np.testing.assert_array_equal(trained_model.generate(2, steps=3), trained_model.generate(2, steps=3, eta=0.0,
                                                                                            sampler="ddim"))


def test_process_figures_work_with_a_plain_model(trained_model, tmp_path):
    written = plots.process_figures(trained_model, tmp_path, seed=1, num_rows=2, num_frames=3, steps=3)
    assert [path.name for path in written] == ["forward.png", "reverse.png"]  # synthetic data needs no files
    assert all(path.stat().st_size > 0 for path in written)


def test_process_figures_take_the_labels_of_a_whole_grid(tmp_path):
    """`sample.py --process_strip` on a conditional model passes one label per grid image; the strip has 2 rows."""
    model = DiffusionModel(build_unet(**TINY_UNET, num_classes=3), NoiseSchedule("linear", 100),
                           metadata={"dataset": "synthetic"})
    for grid_labels in (np.arange(64) % 3, [2]):  # a grid of 64, and of one image (fewer labels than rows)
        written = plots.process_figures(model, tmp_path, num_rows=2, num_frames=3, steps=2, labels=grid_labels)
        assert [path.name for path in written] == ["forward.png", "reverse.png"]


def test_a_keras_file_of_a_trained_model_draws_the_same_images(trained_model, tmp_path):
    path = tmp_path / "model.keras"
    trained_model.save(path)

    loaded = keras.saving.load_model(path, compile=False)

    assert isinstance(loaded, DiffusionModel) and loaded.metadata == trained_model.metadata
    for network in ("network", "ema_network"):
        for saved, restored in zip(getattr(trained_model, network).weights, getattr(loaded, network).weights):
            np.testing.assert_array_equal(restored.numpy(), saved.numpy())
    np.testing.assert_array_equal(loaded.generate(3, seed=5, steps=4), trained_model.generate(3, seed=5, steps=4))
    np.testing.assert_array_equal(generate_in_batches(loaded, 3, batch_size=2, seed=5, verbose=False, steps=4),
                                  trained_model.generate(3, seed=5, steps=4))


def test_training_curves_plot_the_monitored_epochs_in_a_panel_of_their_own(tmp_path):
    """loss.png: the loss alone, or with SWD and the face FD below it, at the epochs that measured them."""
    import matplotlib.image
    import matplotlib.pyplot as plt

    steps = np.array([500.0, 1000.0, 1500.0])
    column = {"swd": np.array([77.4, np.nan, 35.1]), "face_fd": np.array([1.75, np.nan, 0.31])}
    figure, axes = plt.subplots()
    plots._plot_sample_quality(axes, steps, column)
    swd_line, = axes.get_lines()
    face_line, = figure.axes[1].get_lines()  # the face FD's own axis, on the right
    assert swd_line.get_xdata().tolist() == [500, 1500] and swd_line.get_ydata().tolist() == [77.4, 35.1]
    assert face_line.get_xdata().tolist() == [500, 1500] and face_line.get_ydata().tolist() == [1.75, 0.31]
    plt.close(figure)

    header = "epoch,loss,step,swd,face_fd\n"
    rows = ["0,0.05,500,77.4,1.75\n", "1,0.010,1000,NA,NA\n", "2,0.009,1500,35.1,0.31\n"]
    plain, monitored = tmp_path / "plain.csv", tmp_path / "monitored.csv"
    plain.write_text(header + "".join(row.rsplit(",", 2)[0] + ",NA,NA\n" for row in rows))
    monitored.write_text(header + "".join(rows))
    heights = [matplotlib.image.imread(plots.plot_training_curves(csv, tmp_path / f"{csv.stem}.png")).shape[0]
               for csv in (plain, monitored)]
    assert heights[1] > 1.5 * heights[0]  # the panel is there only when the run monitored


def test_a_churn_band_is_checked_for_every_sampler_and_kept_only_for_edms(trained_model):
    """Other samplers ignore the band, so it must not split their compiled functions or leave an export's graph."""
    imagenet = samplers.EDM_IMAGENET_CHURN_SIGMAS
    assert check_request(trained_model, 1, sampler="edm", churn_sigmas=imagenet).churn_sigmas == imagenet
    ddim_request = check_request(trained_model, 1, sampler="ddim", churn_sigmas=imagenet)
    assert ddim_request.churn_sigmas == trained_model.churn_sigmas
    with pytest.raises(ValueError, match="S_tmin < S_tmax"):
        check_request(trained_model, 1, sampler="ddim", churn_sigmas=(50, 0.05))


def test_an_exports_steps_and_eta_are_the_default_only_for_its_own_sampler():
    exported = {"sampler": "dpm++", "steps": 12, "eta": 0.5}
    assert resolve_sampling(exported, 1000) == ("dpm++", 12, 0.5)
    assert resolve_sampling(exported, 1000, sampler="ddim") == ("ddim", 50, 0.0)
    assert resolve_sampling(exported, 1000, sampler="ddpm") == ("ddpm", 1000, 0.0)
    assert resolve_sampling(exported, 1000, sampler="edm", eta=1.0) == ("edm", 199, 1.0)
    assert resolve_sampling(exported, 1000, steps=7, eta=0.0) == ("dpm++", 7, 0.0)
    assert resolve_sampling({"sampler": "ddim", "eta": 0.0}, 100) == ("ddim", 50, 0.0)  # a model in memory


def test_step_reports_follow_every_network_call_and_leave_the_images_alone(trained_model):
    calls = []
    reported = trained_model.generate(3, seed=2, steps=5, sampler="ddpm", on_step=calls.append)
    assert calls == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(reported, trained_model.generate(3, seed=2, steps=5, sampler="ddpm"))
    assert trained_model.sample_function("ddpm", report_steps=True).step_listener.callback is None  # unset after


def test_the_progress_bar_counts_network_calls_across_batches(trained_model, capsys, monkeypatch):
    reached = []
    original_reach = CallProgress.reach
    monkeypatch.setattr(CallProgress, "reach", lambda self, calls: (reached.append(calls), original_reach(self, calls)))
    images = generate_in_batches(trained_model, 5, batch_size=2, seed=1, steps=4)
    out = capsys.readouterr().out
    assert "Sampling 5 images: ddim, 4 network calls each, eta 0, in batches of 2." in out
    assert "12/12" in out  # three batches of four calls
    # each call of each batch, then the batch's end (which moves the bar only for generators that do not report)
    assert reached == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8, 9, 10, 11, 12, 12]
    np.testing.assert_array_equal(images, trained_model.generate(5, seed=1, steps=4))
