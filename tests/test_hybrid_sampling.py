"""bench/hybrid_sampling.py: its path, and its two ends (no band, every level) against the library's samplers."""

import argparse
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, gaussian_generator
from keras_ddpm import samplers
from keras_ddpm.schedule import NoiseSchedule

sys.path.insert(0, str(REPO / "bench"))
import hybrid_sampling  # noqa: E402

MU, STD = 0.0, 0.3
IMAGE_SHAPE = (8, 8, 1)


def test_parse_band_reads_a_band_and_refuses_nonsense():
    assert hybrid_sampling.parse_band("0:1") == (0.0, 1.0)
    assert hybrid_sampling.parse_band("1:inf") == (1.0, float("inf"))
    assert hybrid_sampling.parse_band("none") is None
    for bad in ("1", "2:1", "-1:1", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError, match="sigma_lo"):
            hybrid_sampling.parse_band(bad)


def test_the_path_has_every_timestep_inside_the_band_and_the_odes_outside():
    schedule = NoiseSchedule()
    ode = list(samplers.sampling_timesteps(schedule, 20, "logsnr").numpy())
    t_one = int(schedule.nearest_timesteps(np.log([1.0])).numpy()[0])  # sigma = 1

    path, is_ddpm = hybrid_sampling.hybrid_path(schedule, 20, (0.0, 1.0))
    assert path == sorted(set(path), reverse=True) and path[0] == 999 and path[-1] == 0
    ddpm_steps = [t for t, ddpm in zip(path, is_ddpm) if ddpm]  # each from t to t - 1, down to t = 1
    assert ddpm_steps == list(range(ddpm_steps[0], 0, -1)) and abs(ddpm_steps[0] - t_one) <= 1
    assert [t for t in path if t > ddpm_steps[0]] == [t for t in ode if t > ddpm_steps[0]]
    assert not is_ddpm[-1]  # t = 0 returns x0_hat


@pytest.mark.parametrize("band, sampler, steps", [
    pytest.param(None, "dpm++", 20, id="none_is_the_ode"),
    pytest.param((0.0, float("inf")), "ddpm", 1000, id="everything_is_ddpm_1000", marks=pytest.mark.slow),
])
def test_the_ends_draw_the_library_images(band, sampler, steps):
    schedule = NoiseSchedule()
    generator = gaussian_generator(schedule, MU, STD, IMAGE_SHAPE)
    seeds = tf.range(4, dtype=tf.int64)
    denoise = samplers.make_denoiser(generator.network_output, schedule, "epsilon")
    library = samplers.to_uint8(samplers.sample(denoise, schedule, seeds, IMAGE_SHAPE, steps, sampler)).numpy()
    path, is_ddpm = hybrid_sampling.hybrid_path(schedule, 20, band)
    images = hybrid_sampling.compile_hybrid_sampler(generator, path, is_ddpm)(seeds).numpy()
    np.testing.assert_array_equal(images, library)


def band_std(is_ddpm_of=lambda is_ddpm: is_ddpm) -> float:
    """The std of N(MU, STD^2) samples drawn with DDPM for sigma in [0.3, 3] and the ODE elsewhere, over STD."""
    schedule = NoiseSchedule()
    generator = gaussian_generator(schedule, MU, STD, (16, 16, 1))
    path, is_ddpm = hybrid_sampling.hybrid_path(schedule, 20, (0.3, 3.0))
    images = hybrid_sampling.compile_hybrid_sampler(generator, path, is_ddpm_of(is_ddpm))(tf.range(32, dtype=tf.int64))
    return (images.numpy() / 127.5 - 1.0).std() / STD


def test_a_band_keeps_the_data_distribution():
    """DDPM inside the band and the ODE outside both sample N(MU, STD^2) with the exact denoiser, and so does the
    switch between them (the ODE first order again after DDPM)."""
    assert abs(band_std() - 1) < 0.03


def test_a_large_ddpm_step_out_of_the_band_fails_the_check():
    """The check above can fail: leaving the band with one DDPM step down to the ODE's next timestep loses 6% of
    the std (beta tilde is the posterior variance of a known x0, too small for one large step)."""

    def ddpm_out_of_the_band(is_ddpm):
        exit_step = max(i for i, ddpm in enumerate(is_ddpm) if ddpm) + 1
        return [ddpm or i == exit_step for i, ddpm in enumerate(is_ddpm)]

    assert abs(band_std(ddpm_out_of_the_band) - 1) > 0.05
