"""bench/restart_sampling.py: its path and its sampler, checked on Gaussian data as tests/test_samplers.py does."""

import argparse
import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
from conftest import REPO
from keras_ddpm import samplers
from keras_ddpm.schedule import NoiseSchedule

sys.path.insert(0, str(REPO / "bench"))
import restart_sampling  # noqa: E402
from restart_sampling import Restart  # noqa: E402

# Zero mean and a small std, so that clipping x0_hat to [-1, 1] never bites (3.3 std away).
MU, STD = 0.0, 0.3
IMAGE_SHAPE = (16, 16, 1)


def gaussian_generator(schedule):
    return conftest.gaussian_generator(schedule, MU, STD, IMAGE_SHAPE)


def float_samples(generator, path, num_images=32):
    """The sampler's images mapped back from uint8 to [-1, 1]."""
    images = restart_sampling.compile_restart_sampler(generator, path)(tf.range(num_images, dtype=tf.int64))
    return images.numpy() / 127.5 - 1.0


def test_parse_reads_a_restart_and_refuses_nonsense():
    assert Restart.parse("1:5:2:10") == Restart(1.0, 5.0, 2, 10)
    assert Restart.parse("0") is None
    for bad in ("1:5:2", "5:1:2:10", "1:5:0:10", "a:b:c:d"):
        with pytest.raises(argparse.ArgumentTypeError, match="sigma_min:sigma_max|0 < sigma_min"):
            Restart.parse(bad)


def test_the_path_is_the_main_ode_with_the_loops_spliced_in_at_t_min():
    schedule = NoiseSchedule()
    main = list(samplers.sampling_timesteps(schedule, 20, "logsnr").numpy())
    assert restart_sampling.restart_path(schedule, 20, None) == main

    path = restart_sampling.restart_path(schedule, 20, Restart(1.0, 5.0, 2, 10))
    jumps = [(t, t_next) for t, t_next in zip(path, path[1:]) if t_next > t]
    assert len(jumps) == 2
    t_min, t_max = jumps[0]
    assert t_min in main and t_max > t_min
    sigma = lambda t: np.sqrt((1 - schedule.alpha_bar_at(t)) / schedule.alpha_bar_at(t))  # noqa: E731
    assert abs(sigma(t_max) - 5.0) < 0.1
    at = main.index(t_min)
    assert path[: at + 1] == main[: at + 1] and path[len(path) - (len(main) - at - 1) :] == main[at + 1 :]
    loop = path[at + 1 : path.index(t_min, at + 1) + 1]  # t_max down to t_min in 10 network calls, twice
    assert loop[0] == t_max and loop[-1] == t_min and len(loop) == 11
    assert path == main[: at + 1] + loop * 2 + main[at + 1 :]


def test_the_plain_path_draws_the_library_dpm_solver_images():
    schedule = NoiseSchedule()
    generator = gaussian_generator(schedule)
    seeds = tf.range(8, dtype=tf.int64)
    denoise = samplers.make_denoiser(generator.network_output, schedule, "epsilon")
    library = samplers.to_uint8(samplers.sample(denoise, schedule, seeds, IMAGE_SHAPE, 20, "dpm++")).numpy()
    path = restart_sampling.restart_path(schedule, 20, None)
    np.testing.assert_array_equal(restart_sampling.compile_restart_sampler(generator, path)(seeds).numpy(), library)


@pytest.mark.parametrize("restart", [Restart(0.5, 2.0, 2, 8), Restart(1.0, 10.0, 3, 10)])
def test_restarts_keep_the_data_distribution(restart):
    """With the exact denoiser every restart leaves the distribution alone: the forward jump is q(x_max | x_min)."""
    schedule = NoiseSchedule()
    images = float_samples(gaussian_generator(schedule), restart_sampling.restart_path(schedule, 20, restart))
    assert abs(images.mean() - MU) < 0.02, images.mean()
    assert abs(images.std() / STD - 1) < 0.05, images.std()


def test_a_wrong_jump_fails_the_check(monkeypatch):
    """The check above can fail: a jump that forgets to scale x_t by sqrt(alpha_bar_max / alpha_bar_min)."""

    def unscaled_jump(schedule, x_t, t, t_next, noise):
        ratio = schedule.alpha_bar_at(t_next) / schedule.alpha_bar_at(t)
        return x_t + tf.sqrt(1.0 - ratio) * noise

    monkeypatch.setattr(restart_sampling, "forward_jump", unscaled_jump)
    schedule = NoiseSchedule()
    path = restart_sampling.restart_path(schedule, 20, Restart(1.0, 10.0, 3, 10))
    images = float_samples(gaussian_generator(schedule), path)
    assert abs(images.std() / STD - 1) > 0.05, images.std()
