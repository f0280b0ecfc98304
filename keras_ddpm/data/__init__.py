"""tf.data input pipelines: CelebA (image folder or TFDS), Fashion-MNIST, CIFAR-10 and synthetic shapes.

One module per idea:

    pipeline.py   make_dataset / load_images: any source -> cache -> shuffle -> float32 batches in [-1, 1];
                  dataset_info (channels, classes, usual size of each dataset)
    celeba.py     CelebA from an image folder: files, splits (list_eval_partition.txt), the crop geometry
    tfds.py       TensorFlow Datasets (celeb_a, fashion_mnist, cifar10), keras.datasets as the offline fallback
    fashion_mnist.py  Fashion-MNIST from the official IDX files (gz or plain), checked, and its held-out split
    synthetic.py  procedural shapes drawn from a seed (no files)
    common.py     split names, argument checks, messages logged once

A new source goes beside tfds.py as a function returning `(examples, count)` of uint8 images (and labels),
and is dispatched by `pipeline._uint8_examples`, as fashion_mnist.py is.
"""

from keras_ddpm.data.celeba import CROP_BOXES, CropBox, celeba_crop_box, celeba_files, crop_and_resize, resolve_celeba_folder
from keras_ddpm.data.common import SPLITS, DatasetName, SplitName
from keras_ddpm.data.pipeline import DatasetInfo, dataset_info, load_images, make_dataset
from keras_ddpm.data.synthetic import SYNTHETIC_SHAPES

__all__ = [
    "CROP_BOXES", "CropBox", "DatasetInfo", "DatasetName", "SPLITS", "SYNTHETIC_SHAPES", "SplitName", "celeba_crop_box",
    "celeba_files", "crop_and_resize", "dataset_info", "load_images", "make_dataset", "resolve_celeba_folder",
]
