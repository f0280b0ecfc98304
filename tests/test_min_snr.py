"""min-SNR-gamma loss weights (Hang et al. 2023, Eq. 8) against their formula, computed in float64.

The x0-space weight min(SNR_t, gamma) becomes min(SNR_t, gamma) / SNR_t for epsilon-prediction and
min(SNR_t, gamma) / (SNR_t + 1) for v-prediction, with SNR_t = alpha_bar_t / (1 - alpha_bar_t).
"""

import numpy as np
import pytest

from keras_ddpm.model import DiffusionModel
from keras_ddpm.schedule import NoiseSchedule
from keras_ddpm.unet import build_unet

NETWORK = dict(image_size=8, width=8, channel_multipliers=(1,), num_res_blocks=1, norm_groups=4,
               attention_resolutions=(), bottleneck_attention=False)


def linear_snr_float64(num_timesteps=1000, beta_start=1e-4, beta_end=0.02) -> np.ndarray:
    alpha_bar = np.cumprod(1.0 - np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))
    return alpha_bar / (1.0 - alpha_bar)


@pytest.mark.parametrize("objective, denominator", [("epsilon", 0.0), ("v", 1.0)])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_follow_the_formula(objective, denominator, gamma):
    model = DiffusionModel(build_unet(**NETWORK), NoiseSchedule("linear", 1000), objective=objective,
                           loss_weighting="min_snr", min_snr_gamma=gamma)
    timesteps = np.arange(1000, dtype=np.int32)
    snr = linear_snr_float64()
    expected = np.minimum(snr, gamma) / (snr + denominator)

    weights = np.asarray(model._loss_weights(timesteps), np.float64)

    np.testing.assert_allclose(weights, expected, rtol=1e-4)
    # Both regimes are exercised: clipped at small t (SNR > gamma), weight 1 (eps) at large t.
    assert snr[0] > gamma > snr[-1]


def test_no_weighting_is_one():
    model = DiffusionModel(build_unet(**NETWORK), NoiseSchedule("linear", 1000))
    np.testing.assert_array_equal(model._loss_weights(np.arange(1000, dtype=np.int32)), np.ones(1000))
