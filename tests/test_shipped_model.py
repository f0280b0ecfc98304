"""The shipped model in savedmodel/: `python sample.py` with no flags, its faces on CelebA, a damaged copy."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

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
    assert "Sampling 4 images: dpm++, 4 network calls each, eta 0, in batches of 4." in result.stdout
    assert (tmp_path / "samples" / "grid.png").stat().st_size > 1000


def test_the_shipped_sampler_takes_eta():
    """The export samples with DPM-Solver++: eta = 1 (its SDE form) must draw other images than the ODE, and the
    same ones again for the same seeds (an export made before DPM-Solver++ took eta would ignore it)."""
    generator = load_generator(SHIPPED)
    assert generator.metadata["sampler"] == "dpm++"
    ode = generator.generate(seeds=[0, 1], steps=4, eta=0.0)
    sde = generator.generate(seeds=[0, 1], steps=4, eta=1.0)
    assert (ode != sde).mean() > 0.5
    assert (sde == generator.generate(seeds=[0, 1], steps=4, eta=1.0)).all()


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
@pytest.mark.celeba
def test_shipped_faces_score_near_the_real_vs_real_floor(celeba_dir):
    """SWD of 256 samples (the export's sampler, DPM-Solver++-20) vs held-out faces: within 2x of real vs real.

    Measured when the model shipped: 0.82x (19.65 vs a floor of 23.86; 256 images are within the floor's
    noise); the two models before it scored 0.93x (min-SNR, 7,500 steps) and 1.03x (unweighted v). The epsilon-predicting model shipped before both
    scored 4.4x with this sampler and 2.8x with DDIM-50 at eta 1, so a sampler or recipe that regresses that far
    fails here.
    """
    held_out = load_images("celeba", "validation", 32, 256, data_dir=celeba_dir)
    train = load_images("celeba", "train", 32, 256, data_dir=celeba_dir)
    samples = generate_in_batches(load_generator(SHIPPED), 256, 128, seed=0, verbose=False)
    floor = sliced_wasserstein_distance(train, held_out)["swd_mean"]
    swd = sliced_wasserstein_distance(samples, held_out)["swd_mean"]
    assert swd < 2.0 * floor, (swd, floor)
