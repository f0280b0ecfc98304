"""bench/edm_sampling.py: its noise levels and its sampler, checked on Gaussian data with the exact denoiser."""

import argparse
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, gaussian_generator
from keras_ddpm.schedule import NoiseSchedule

sys.path.insert(0, str(REPO / "bench"))
import edm_sampling  # noqa: E402
from edm_sampling import Churn  # noqa: E402

# Zero mean and a small std, so that clipping x0_hat to [-1, 1] never bites (3.3 std away).
MU, STD = 0.0, 0.3
IMAGE_SHAPE = (16, 16, 1)


def float_samples(config: Churn, num_images=32):
    """Samples of N(MU, STD^2) data drawn with `config`, mapped back from uint8 to [-1, 1]."""
    schedule = NoiseSchedule()
    generator = gaussian_generator(schedule, MU, STD, IMAGE_SHAPE)
    sample = edm_sampling.compile_edm_sampler(generator, edm_sampling.edm_path(schedule, config), config.s_noise)
    return sample(tf.range(num_images, dtype=tf.int64)).numpy() / 127.5 - 1.0


def test_parse_reads_a_configuration_and_refuses_nonsense():
    assert Churn.parse("20:8") == Churn(20, 8.0)
    assert Churn.parse("40:16:0.5:10:1.007") == Churn(40, 16.0, 0.5, 10.0, 1.007)
    for bad in ("20", "20:8:1", "1:8", "20:-1", "20:8:10:1", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError, match="N:S_churn|N >= 2"):
            Churn.parse(bad)


def test_the_path_descends_in_rho_spaced_levels_and_churns_only_in_the_band():
    schedule = NoiseSchedule()
    sigma = edm_sampling.sigmas_of(schedule)
    path = edm_sampling.edm_path(schedule, Churn(20, 8.0, 0.5, 10.0))
    levels = [t for t, _, _ in path]
    assert levels[0] == schedule.num_timesteps - 1 and levels[-1] == 0
    assert [t_next for _, _, t_next in path] == levels[1:] + [-1]
    assert all(a > b for a, b in zip(levels, levels[1:]))
    assert len(levels) > 15  # snapping to timesteps merges a few of the 20 levels near sigma_min, not most
    for t, t_hat, _ in path:
        if 0.5 <= sigma[t] <= 10.0:  # gamma = min(8 / 20, sqrt(2) - 1) = 0.4
            assert abs(sigma[t_hat] / sigma[t] - 1.4) < 0.05, (t, t_hat)
        else:
            assert t_hat == t
    assert edm_sampling.network_calls(path) == 2 * len(path) - 1


@pytest.mark.parametrize("config", [Churn(100, 0.0), Churn(100, 40.0), Churn(100, 40.0, 0.5, 10.0)],
                         ids=["heun_ode", "churn_everywhere", "churn_in_a_band"])
def test_the_sampler_keeps_the_data_distribution(config):
    """With the exact denoiser Heun's ODE and the churn both end at N(MU, STD^2): the added noise takes sigma_i
    exactly to sigma_hat. Both converge as N grows; the churn more slowly (std 12% high at N = 20 with gamma = 0.4
    everywhere, 2% at N = 100; Heun's ODE 6% and 0.4%), so the check uses 100 levels."""
    images = float_samples(config)
    assert abs(images.mean() - MU) < 0.02, images.mean()
    assert abs(images.std() / STD - 1) < 0.05, images.std()


def test_too_much_noise_fails_the_check():
    """The check above can fail: S_noise = 1.1 adds 10% more noise than the churn's levels account for."""
    images = float_samples(Churn(100, 40.0, s_noise=1.1))
    assert abs(images.std() / STD - 1) > 0.05, images.std()
