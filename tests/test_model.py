import keras
import numpy as np
import pytest

from keras_ddpm.model import DiffusionModel
from keras_ddpm.schedule import NoiseSchedule
from keras_ddpm.unet import build_unet

TINY_UNET = dict(image_size=16, width=16, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=8)


def toy_images(count=64, size=16, seed=0):
    """Smooth, easy-to-learn images: a random-colour horizontal gradient per image, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)[None, None, :, None]
    colours = rng.uniform(-1, 1, (count, 1, 1, 3)).astype(np.float32)
    return np.broadcast_to(ramp * colours, (count, size, size, 3)).copy()


def make_model(num_classes=0, run_eagerly=False, **kwargs):
    """A tiny DiffusionModel; `run_eagerly` skips tracing the train step: ~9 CPU-s, the cost of ~8 eager steps."""
    keras.utils.set_random_seed(0)
    network = build_unet(**TINY_UNET, num_classes=num_classes)
    model = DiffusionModel(network, NoiseSchedule("linear", 100), **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), run_eagerly=run_eagerly)
    return model


# mixed_float16 is emulated on CPUs, and slow: it runs in the full run.
@pytest.mark.parametrize("policy", ["float32", pytest.param("mixed_float16", marks=pytest.mark.slow), "mixed_bfloat16"])
def test_fit_lowers_the_loss_without_nan(policy):
    keras.mixed_precision.set_dtype_policy(policy)
    model = make_model(ema_decay=0.9)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert model.network.output.dtype == "float32"
    history = model.fit(toy_images(64), batch_size=16, epochs=5, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(np.all(np.isfinite(w)) for w in model.ema_network.get_weights())


def test_ema_differs_from_weights_and_moves_toward_them():
    model = make_model(ema_decay=0.99, run_eagerly=True)
    images = toy_images(64)
    model.fit(images, batch_size=32, epochs=2, verbose=0)

    def distance():
        return sum(np.sum((e - w) ** 2) for e, w in zip(model.ema_network.get_weights(), model.network.get_weights()))

    before = distance()
    assert before > 0
    # With the learning rate at zero the weights stand still and the EMA closes in on them.
    model.optimizer.learning_rate.assign(0.0)
    model.fit(images, batch_size=32, epochs=2, verbose=0)
    assert distance() < 0.9 * before


def test_ema_warm_up_follows_the_stated_decay():
    model = make_model(ema_decay=0.999, run_eagerly=True)
    ema_before = [w.copy() for w in model.ema_network.get_weights()]
    model.fit(toy_images(32), batch_size=32, epochs=1, verbose=0)  # step n=1: decay = min(0.999, 2/11)
    expected = [2 / 11 * e + 9 / 11 * w for e, w in zip(ema_before, model.network.get_weights())]
    for got, want in zip(model.ema_network.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def trained_model():
    """One briefly trained tiny model shared by the sampling tests (eager: they test sampling, not the train step)."""
    model = make_model(run_eagerly=True)
    model.history_for_tests = model.fit(
        toy_images(64), batch_size=32, epochs=1, verbose=0, validation_data=toy_images(32, seed=1)
    )
    return model


def test_validation_reports_loss_and_ema_loss(trained_model):
    assert {"loss", "val_loss", "val_ema_loss"} <= set(trained_model.history_for_tests.history)


def test_generate_is_deterministic_per_seed_and_uint8(trained_model):
    model = trained_model
    first = model.generate(4, seed=10, steps=5)
    again = model.generate(4, seed=10, steps=5)
    assert first.dtype == np.uint8 and first.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], first[1])
    # Image i comes from seed + i alone: a single image with seed 12 is the third one above.
    np.testing.assert_array_equal(model.generate(seeds=[12], steps=5)[0], first[2])
    for sampler in ["ddpm", "dpm++"]:
        images = model.generate(2, steps=5, sampler=sampler)
        np.testing.assert_array_equal(images, model.generate(2, steps=5, sampler=sampler))


def test_generate_does_not_retrace_for_new_seeds_or_sizes(trained_model):
    model = trained_model
    model.generate(2, seed=0, steps=3)
    sample = model.sample_function("ddim")
    traces = sample.experimental_get_tracing_count()
    model.generate(3, seed=5, steps=4, eta=0.5)
    assert sample.experimental_get_tracing_count() == traces


def test_conditional_model_guidance_and_null_label():
    model = make_model(num_classes=3, run_eagerly=True)
    labels = np.arange(32) % 3
    model.fit(toy_images(32), labels, batch_size=16, epochs=1, verbose=0)
    conditional = model.generate(2, steps=4, labels=1)
    np.testing.assert_array_equal(model.generate(2, steps=4, labels=1, guidance=1.0), conditional)
    # With the null label, guidance mixes the unconditional prediction with itself: any scale is unguided.
    np.testing.assert_array_equal(model.generate(2, steps=4, labels=3, guidance=3.0), model.generate(2, steps=4, labels=3))
    with pytest.raises(ValueError, match="conditional"):
        model.generate(2, steps=4)
    with pytest.raises(ValueError, match="labels must be in"):
        model.generate(2, steps=4, labels=7)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"steps": 0}, "steps must be"), ({"steps": 101}, "steps must be"), ({"eta": 2.0}, "eta must be"),
     ({"sampler": "euler"}, "Unknown sampler")],
)
def test_generate_rejects_bad_arguments(trained_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        trained_model.generate(2, **kwargs)


@pytest.mark.parametrize("setting", ["objective", "loss_weighting", "timestep_sampling"])
def test_the_model_rejects_an_unknown_training_choice(setting):
    with pytest.raises(ValueError, match=f"Unknown {setting} 'typo'; choose one of"):
        make_model(**{setting: "typo"})


def test_v_objective_and_min_snr_train():
    model = make_model(objective="v", loss_weighting="min_snr")
    history = model.fit(toy_images(128), batch_size=32, epochs=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_config_round_trip():
    model = make_model(objective="v", ema_decay=0.95)
    clone = DiffusionModel.from_config(model.get_config())
    assert clone.objective == "v" and clone.ema_decay == 0.95
    assert clone.schedule.get_config() == model.schedule.get_config()
    assert clone.network.count_params() == model.network.count_params()
