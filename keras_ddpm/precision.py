"""Precision: which dtype policy a run or a sampler uses, chosen per device.

Training's `--precision=auto` (and sampling's, for run directories) means mixed_float16 on a GPU, mixed_bfloat16
on a CPU with native bf16 instructions and float32 elsewhere. An exported SavedModel samples in the policy it was
exported with (`keras_ddpm.runs.sampling_precision`).
"""

import contextlib
import pathlib
from typing import Iterator

import keras
import tensorflow as tf

from keras_ddpm.config import PRECISIONS

# CPU flags (as Linux names them in /proc/cpuinfo) of instructions that multiply bfloat16 natively; oneDNN
# runs bf16 convolutions on them several times faster than fp32 ones. Without them bf16 is emulated, and slow.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bf16_cpu_flags(cpuinfo_path="/proc/cpuinfo") -> list[str]:
    """The NATIVE_BF16_CPU_FLAGS this CPU reports; empty where /proc/cpuinfo does not exist (not Linux)."""
    try:
        text = pathlib.Path(cpuinfo_path).read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]


def resolve_precision(precision: str, cpuinfo_path="/proc/cpuinfo") -> tuple[str, str]:
    """The dtype policy for `precision`, and why: `auto` picks per device.

    `auto` means mixed_float16 on a GPU, mixed_bfloat16 on a CPU with native bf16 instructions (AMX-BF16 or
    AVX512_BF16) and float32 on other CPUs, where float16 and bfloat16 are emulated and slower than float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {PRECISIONS}.")
    if precision != "auto":
        return precision, "set by --precision"
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16", "auto: a GPU is visible"
    bf16_flags = native_bf16_cpu_flags(cpuinfo_path)
    if bf16_flags:
        return "mixed_bfloat16", f"auto: no GPU, and the CPU has native bf16 ({', '.join(bf16_flags)})"
    return "float32", "auto: no GPU, and the CPU has no native bf16 (amx_bf16 or avx512_bf16)"


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Build layers under the dtype policy `precision`; the global policy is restored afterwards."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
