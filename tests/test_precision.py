"""`--precision=auto`: mixed_float16 on a GPU, mixed_bfloat16 on a CPU with native bf16, float32 elsewhere."""

import pytest

from keras_ddpm.training import native_bf16_cpu_flags, resolve_precision

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
