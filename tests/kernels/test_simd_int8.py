"""vpdpbusd from Numba: exact on known values (the u8 x s8 extremes), bytes and lanes in the
documented order, the 4-byte broadcast, and the epilogue's stores (rint ties, clamps, masks)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from minialex.kernels.simd import vload
from minialex.kernels.simd_int8 import (has_avx512_vnni, i2f, iadd, iload, istore, izero, s8load,
                                        store_f32, store_u8_rint, u8broadcast4, u8load, vpdpbusd)

needs_vnni = pytest.mark.skipif(not has_avx512_vnni(), reason="this CPU has no avx512_vnni")


@njit(cache=True)
def _dot(acc, a, b, out):
    # acc, out: (16,) int32 ; a: (64,) uint8 ; b: (64,) int8 -> out = one vpdpbusd
    istore(out, 0, vpdpbusd(iload(acc, 0), u8load(a, 0), s8load(b, 0)))


@njit(cache=True)
def _dot_broadcast(acc, a, at, b, out):
    # as _dot with a[at : at + 4] in every lane
    istore(out, 0, vpdpbusd(iload(acc, 0), u8broadcast4(a, at), s8load(b, 0)))


def _ref(acc, a, b):
    return acc.astype(np.int64) + (a.astype(np.int64) * b.astype(np.int64)).reshape(16, 4).sum(1)


def _run(acc, a, b):
    out = np.zeros(16, np.int32)
    _dot(np.asarray(acc, np.int32), np.asarray(a, np.uint8), np.asarray(b, np.int8), out)
    return out


@needs_vnni
@pytest.mark.parametrize("a, b", [(255, -128), (255, 127), (0, -128), (1, -1), (128, 1)])
def test_extremes_of_unsigned_times_signed_bytes(a, b):
    # 255 * -128 * 4 = -130560: the first operand is read unsigned, the second signed
    assert (_run(np.zeros(16), np.full(64, a), np.full(64, b)) == 4 * a * b).all()


@needs_vnni
def test_each_lane_adds_its_own_four_bytes_to_its_accumulator():
    rng = np.random.default_rng(0)
    acc = rng.integers(-2 ** 31, 2 ** 31 - 200_000, 16).astype(np.int32)
    a = rng.integers(0, 256, 64).astype(np.uint8)
    b = rng.integers(-128, 128, 64).astype(np.int8)
    np.testing.assert_array_equal(_run(acc, a, b), _ref(acc, a, b))


@needs_vnni
def test_the_accumulator_wraps_modulo_two_to_the_32():
    acc = np.full(16, 2 ** 31 - 1, np.int32)
    assert (_run(acc, np.full(64, 1), np.full(64, 1)) == -2 ** 31 + 3).all()


@needs_vnni
def test_the_broadcast_puts_one_group_of_four_bytes_in_every_lane():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, 64).astype(np.uint8)
    b = rng.integers(-128, 128, 64).astype(np.int8)
    acc = np.zeros(16, np.int32)
    out = np.zeros(16, np.int32)
    _dot_broadcast(acc, a, 7, b, out)   # any byte offset, not only multiples of 4
    np.testing.assert_array_equal(out, _ref(acc, np.tile(a[7:11], 16), b))


@njit(cache=True)
def _stores(x, count, out8, out32):
    store_u8_rint(out8, 0, vload(x, 0), count)
    store_f32(out32, 0, vload(x, 0), count)


@njit(cache=True)
def _convert(acc, bias, out):
    store_f32(out, 0, i2f(iadd(iload(acc, 0), iadd(izero(), iload(bias, 0)))), 16)


def test_uint8_store_rounds_ties_to_even_clamps_and_writes_only_count_lanes():
    x = np.array([-1.0, 0.5, 1.5, 2.5, 254.5, 255.5, 1e9, np.nan, -0.5, 3.49, 100.0, 7.0,
                  8.0, 9.0, 10.0, 11.0], np.float32)
    for count in (0, 1, 10, 16, 40):
        out8 = np.full(20, 99, np.uint8)
        out32 = np.full(20, -7.0, np.float32)
        _stores(x, count, out8, out32)
        c = min(count, 16)
        expected = np.clip(np.rint(np.nan_to_num(x, nan=0.0)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(out8[:c], expected[:c])
        assert (out8[c:] == 99).all() and (out32[c:] == -7.0).all()
        np.testing.assert_array_equal(out32[:c], x[:c])
    assert expected[:6].tolist() == [0, 0, 2, 2, 254, 255]


def test_int32_to_float32_rounds_to_nearest_even_after_a_wrapping_add():
    acc = np.array([2 ** 24 + 1, 2 ** 24 + 3, 2 ** 31 - 1, -2 ** 31, 5, -5] + [0] * 10, np.int32)
    bias = np.array([0, 0, 1, -1, 2, -2] + [0] * 10, np.int32)
    out = np.zeros(16, np.float32)
    _convert(acc, bias, out)
    expected = (acc + bias).astype(np.float32)   # NumPy wraps and converts with RNE too
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


@needs_vnni
def test_a_cached_function_with_the_inline_assembly_reloads_exact_in_a_new_process():
    _run(np.zeros(16), np.full(64, 255), np.full(64, -128))   # compiled and cached here
    code = ("import numpy as np\n"
            "from tests.kernels.test_simd_int8 import _dot\n"
            "out = np.zeros(16, np.int32)\n"
            "_dot(np.zeros(16, np.int32), np.full(64, 255, np.uint8), np.full(64, -128, np.int8), out)\n"
            "print(int(sum(_dot.stats.cache_hits.values())), int(out.min()), int(out.max()))\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                         check=True)
    assert res.stdout.split() == ["1", "-130560", "-130560"]


def test_cpu_flag_is_read_from_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: x avx512_vnni\nflags\t\t: fpu avx512f avx_vnni\n")
    assert has_avx512_vnni(str(info)) is False
    info.write_text("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert has_avx512_vnni(str(info)) is True
    assert has_avx512_vnni(str(tmp_path / "missing")) is False
