"""`--precision=auto`: mixed_float16 on a GPU, mixed_bfloat16 on a CPU with native bf16, float32 elsewhere;
sampling in another precision than float32 for run directories only."""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ddpm.config import ModelConfig, TrainConfig
from keras_ddpm.precision import native_bf16_cpu_flags, resolve_precision
from keras_ddpm.runs import load_generator, prepare_run_directory, restore_checkpoint, sampling_precision
from keras_ddpm.training import make_optimizer

ZEN4_FLAGS = "fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
SAPPHIRE_RAPIDS_FLAGS = "fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"
SKYLAKE_FLAGS = "fpu sse2 avx avx2 avx512f avx512bw avx512vl"


def cpuinfo(tmp_path, flags):
    """A two-core /proc/cpuinfo with the given flags line."""
    path = tmp_path / "cpuinfo"
    core = f"processor\t: {{}}\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\n"
    path.write_text(core.format(0) + core.format(1))
    return path


@pytest.mark.parametrize(
    "flags, expected",
    [(ZEN4_FLAGS, ["avx512_bf16"]), (SAPPHIRE_RAPIDS_FLAGS, ["amx_bf16", "avx512_bf16"]), (SKYLAKE_FLAGS, [])],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, expected):
    assert native_bf16_cpu_flags(cpuinfo(tmp_path, flags)) == expected


def test_a_flag_must_match_whole(tmp_path):
    # A longer flag that merely contains the name is no evidence of the instruction set.
    assert native_bf16_cpu_flags(cpuinfo(tmp_path, "avx512_bf16x avx2")) == []


@pytest.mark.parametrize(
    "flags, expected",
    [(SAPPHIRE_RAPIDS_FLAGS, "mixed_bfloat16"), (ZEN4_FLAGS, "mixed_bfloat16"), (SKYLAKE_FLAGS, "float32")],
)
def test_auto_picks_bf16_only_where_the_cpu_has_it(tmp_path, flags, expected):
    precision, reason = resolve_precision("auto", cpuinfo_path=cpuinfo(tmp_path, flags))
    assert precision == expected
    assert reason.startswith("auto: no GPU")


def test_auto_is_float32_where_the_cpu_cannot_be_read(tmp_path):
    assert resolve_precision("auto", cpuinfo_path=tmp_path / "absent")[0] == "float32"


def test_an_explicit_precision_is_kept_whatever_the_cpu(tmp_path):
    assert resolve_precision("float32", cpuinfo_path=cpuinfo(tmp_path, ZEN4_FLAGS)) == ("float32", "set by --precision")


def test_an_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        resolve_precision("bf16")


# Sampling: run directories in any policy, exported models in float32 only.

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ModelConfig(image_size=8, width=8, channel_multipliers=(1,), num_res_blocks=1, attention_resolutions=(),
                   bottleneck_attention=False, norm_groups=4, num_timesteps=50, dropout=0.0, num_classes=0)


def test_an_export_samples_in_its_own_precision_only():
    assert sampling_precision(REPO / "savedmodel") == ("float32", "as exported")  # the shipped model's
    assert sampling_precision(REPO / "savedmodel", "auto") == ("float32", "as exported")
    with pytest.raises(ValueError, match="samples in float32 as it was exported.*needs a run directory"):
        load_generator(REPO / "savedmodel", precision="mixed_bfloat16")


def test_sample_py_refuses_bf16_for_an_export_before_loading_it(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "sample.py"), "--precision=mixed_bfloat16",
                             f"--output={tmp_path / 'grid.png'}"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 1
    assert "needs a run directory" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "grid.png").exists()


def test_a_run_directory_samples_in_bf16_when_asked(tmp_path):
    model = TINY.build()
    head = model.ema_network.get_layer("head_conv")  # zero-initialised: give the network an output to round
    head.kernel.assign(tf.random.stateless_normal(head.kernel.shape, [0, 1], stddev=0.1))
    model.compile(optimizer=make_optimizer(TrainConfig()))
    prepare_run_directory(tmp_path, TINY, TrainConfig(dataset="synthetic"))
    manager, _ = restore_checkpoint(tmp_path, model)
    manager.save(checkpoint_number=1)

    assert sampling_precision(tmp_path) == ("float32", "the default for run directories")
    float32 = load_generator(tmp_path).generate(8, steps=4).astype(int)
    bf16_model = load_generator(tmp_path, precision="mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32"  # building under bf16 left the global policy alone
    assert bf16_model.ema_network.get_layer("head_conv").compute_dtype == "bfloat16"
    bf16 = bf16_model.generate(8, steps=4).astype(int)
    assert 0 < np.abs(bf16 - float32).max() and np.abs(bf16 - float32).mean() < 4  # rounded, not another model
