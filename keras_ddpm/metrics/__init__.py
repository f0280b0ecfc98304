"""Sample-quality metrics and the NLL bound, one module per idea.

    swd.py         sliced Wasserstein distance (Karras et al. 2018): no pretrained network, runs anywhere
    inception.py   FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) on InceptionV3 features
    likelihood.py  the variational bound (Ho et al. 2020) in bits per dimension: needs the model, not samples
    face.py        a pretrained face network (MTCNN, offline): do samples hold together as faces?
    classifier.py  a small CNN that judges Fashion-MNIST samples' classes, and within-class diversity
    images.py      what all share: the uint8 [N, H, W, C] input check (C = 1 or 3), RMS pixel distances

The functions take images as uint8 `[N, H, W, C]` arrays, the project's boundary format (except
`variational_bound`, the NLL's core, which takes data in [-1, 1]). `face` and `classifier` are imported on their
own (`from keras_ddpm.metrics import face`): face loads MTCNN only when it runs.
"""

from keras_ddpm.metrics.images import check_images, rms_distances
from keras_ddpm.metrics.inception import (INCEPTION_IMAGE_SIZE, INCEPTION_WEIGHTS_URL, RealStatistics,
                                          cached_real_statistics, feature_statistics, fid_from_features,
                                          frechet_distance, inception_features, kid_from_features, load_inception)
from keras_ddpm.metrics.likelihood import (NLL_STRATA_SPACING, NLL_TIMESTEP_DRAWS, discretized_gaussian_log_likelihood,
                                           nll_bits_per_dim, variational_bound)
from keras_ddpm.metrics.swd import laplacian_pyramid, sliced_wasserstein_distance

__all__ = [
    "INCEPTION_IMAGE_SIZE", "INCEPTION_WEIGHTS_URL", "NLL_STRATA_SPACING", "NLL_TIMESTEP_DRAWS", "RealStatistics",
    "cached_real_statistics", "check_images", "discretized_gaussian_log_likelihood", "feature_statistics",
    "fid_from_features", "frechet_distance", "inception_features", "kid_from_features", "laplacian_pyramid",
    "load_inception", "nll_bits_per_dim", "rms_distances", "sliced_wasserstein_distance", "variational_bound",
]
