"""vdpbf16ps from Numba: exact on known values, pairs and lanes in the documented order."""
import numpy as np
import pytest
from numba import njit

from minialex.kernels.simd import vload, vstore
from minialex.kernels.simd_bf16 import bload, has_avx512_bf16, vdpbf16

needs_bf16 = pytest.mark.skipif(not has_avx512_bf16(), reason="this CPU has no avx512_bf16")


@njit(cache=True)
def _dot(acc, a, b, out):
    # acc, out: (16,) float32 ; a, b: (32,) uint16 bf16 patterns
    vstore(out, 0, vdpbf16(vload(acc, 0), bload(a, 0), bload(b, 0)))


def _bf16(x):
    # exact for the small integers used here: the bf16 pattern is the float32's top half
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _run(acc, a, b):
    out = np.full(16, np.nan, np.float32)
    _dot(np.asarray(acc, np.float32), _bf16(a), _bf16(b), out)
    return out


@needs_bf16
def test_pairs_of_two_and_three_give_twelve_in_every_lane():
    assert (_run(np.zeros(16), np.full(32, 2.0), np.full(32, 3.0)) == 12.0).all()


@needs_bf16
def test_each_lane_adds_its_own_pair_to_its_accumulator():
    # small integers keep every product and sum exact, so any order of adding gives the same
    rng = np.random.default_rng(0)
    acc = rng.integers(-100, 100, 16).astype(np.float32)
    a = rng.integers(-8, 9, 32).astype(np.float32)
    b = rng.integers(-8, 9, 32).astype(np.float32)
    expected = acc + a[0::2] * b[0::2] + a[1::2] * b[1::2]
    np.testing.assert_array_equal(_run(acc, a, b), expected)


def test_cpu_flag_is_read_from_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: x avx512_bf16\nflags\t\t: fpu avx512f avx512_vnni\n")
    assert has_avx512_bf16(str(info)) is False
    info.write_text("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert has_avx512_bf16(str(info)) is True
    assert has_avx512_bf16(str(tmp_path / "missing")) is False
