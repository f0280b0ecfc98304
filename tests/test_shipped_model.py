"""The shipped model in savedmodel/: `python sample.py` with no flags, its faces on CelebA, a damaged copy."""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from keras_ddpm import samplers
from keras_ddpm.data import load_images
from keras_ddpm.export import read_metadata
from keras_ddpm.generation import generate_in_batches
from keras_ddpm.runs import load_generator
from keras_ddpm.metrics import sliced_wasserstein_distance

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = REPO / "savedmodel"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def run_sample_py(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


def test_the_shipped_model_is_a_celeba_model_within_the_size_limit():
    metadata = read_metadata(SHIPPED / "1")
    assert metadata["dataset"] == "celeba" and metadata["num_classes"] == 0
    size_mb = sum(path.stat().st_size for path in SHIPPED.rglob("*") if path.is_file()) / 2**20
    assert size_mb < 40


def test_sample_py_with_no_model_flag_uses_the_shipped_model_from_any_folder(tmp_path):
    # Run from an empty folder: the default model is the one beside sample.py, not ./savedmodel.
    result = run_sample_py("--num_images=4", "--steps=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dataset: celeba" in result.stdout
    assert ("Sampling 4 images: edm, 4 network calls each, eta 1 (churn for sigma in [0.05, 1]), in batches of 4."
            in result.stdout)
    assert (tmp_path / "samples" / "grid.png").stat().st_size > 1000


def test_the_shipped_sampler_is_edms_with_its_churn():
    """The export samples with EDM's stochastic sampler at eta 1 (REPORT.md 6.18) in the library's churn band (6.23):
    its own graph draws the images the library's sampler draws through the `denoise` signature (to within one grey
    level in a few pixels, where the two graphs round differently), eta 0 (Heun's ODE) draws others, and a seed
    draws the same image again."""
    generator = load_generator(SHIPPED)
    assert (generator.metadata["sampler"], generator.metadata["steps"], generator.metadata["eta"]) == ("edm", 199, 1.0)
    assert generator.metadata["edm_churn_sigmas"] == list(samplers.EDM_CHURN_SIGMAS)
    default = generator.generate(seeds=[0, 1], steps=9)  # the export's generate signature
    library = generator.generate(seeds=[0, 1], steps=9, on_step=lambda calls: None)  # samplers.py on `denoise`
    assert np.abs(default.astype(int) - library).max() <= 1 and (default != library).mean() < 0.001
    assert (default != generator.generate(seeds=[0, 1], steps=9, eta=0.0)).mean() > 0.3
    assert (default == generator.generate(seeds=[0, 1], steps=9)).all()


def test_sample_py_refuses_a_churn_band_upside_down_and_writes_nothing(tmp_path):
    result = run_sample_py("--edm_churn_sigmas=50,0.05", "--num_images=2", "--steps=3",
                           f"--output={tmp_path / 'grid.png'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "0 <= S_tmin < S_tmax, got S_tmin 50 and S_tmax 0.05" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("damaged_file", ["saved_model.pb", "variables/variables.index"])
def test_a_damaged_savedmodel_is_one_clear_error(tmp_path, damaged_file):
    copy = tmp_path / "savedmodel"
    shutil.copytree(SHIPPED, copy)
    (copy / "1" / damaged_file).write_bytes(b"not a protocol buffer")
    result = run_sample_py(f"--model={copy}", "--num_images=2", "--steps=2", f"--output={tmp_path / 'grid.png'}",
                           cwd=tmp_path)
    assert result.returncode == 1
    assert "damaged" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.slow  # 256 samples of the shipped model
def test_shipped_faces_score_near_the_real_vs_real_floor(celeba_dir):
    """SWD of 256 samples (the export's sampler, EDM's with 199 calls) vs held-out faces: within 2x of real vs real.

    Measured with DPM-Solver++-20 on the 10,500-step network (REPORT.md 6.13), then the export's sampler: 0.82x
    (19.65 vs a floor of 23.86; 256 images are within the floor's noise); the two models before it scored 0.93x
    (min-SNR, 7,500 steps) and 1.03x (unweighted v). The epsilon-predicting model shipped before both scored 4.4x
    with this sampler and 2.8x with DDIM-50 at eta 1, so a sampler or recipe that regresses that far fails here.
    """
    held_out = load_images("celeba", "validation", 32, 256, data_dir=celeba_dir)
    train = load_images("celeba", "train", 32, 256, data_dir=celeba_dir)
    samples = generate_in_batches(load_generator(SHIPPED), 256, 128, seed=0, verbose=False)
    floor = sliced_wasserstein_distance(train, held_out)["swd_mean"]
    swd = sliced_wasserstein_distance(samples, held_out)["swd_mean"]
    assert swd < 2.0 * floor, (swd, floor)
