"""The vector intrinsics that are more than one LLVM instruction: exp, the lane reductions and
the max pool's permutes, select and index store."""
import numpy as np
import pytest
from numba import njit

from minialex.kernels.simd import (LANES, veven, vexp, vhmax, vhsum, vload, vmax, vmax_index, vodd, vstore,
                                   vstore_int64)


@njit(cache=True)
def _exp_all(x, y):
    for i in range(0, x.size, LANES):
        vstore(y, i, vexp(vload(x, i)))


@njit(cache=True)
def _reduce(x, out):
    # out[0] = sum, out[1] = max of x (16 lanes exactly), out[2] = max via vmax of two halves
    v = vload(x, 0)
    out[0] = vhsum(v)
    out[1] = vhmax(v)
    out[2] = vhmax(vmax(v, v))


def _exp(x):
    x = np.asarray(x, np.float32)
    pad = np.concatenate([x, np.zeros(-x.size % LANES, np.float32)])
    y = np.empty_like(pad)
    _exp_all(pad, y)
    return y[:x.size]


def test_exp_within_one_ulp_over_the_whole_range():
    # every float32 result from overflow down through the denormals
    x = np.linspace(-104.5, 89.5, 1 << 20, dtype=np.float32)
    y = _exp(x)
    ref = np.exp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        ref32 = ref.astype(np.float32)
    finite = np.isfinite(ref32) & (ref32 != 0)
    ulps = np.abs(y[finite] - ref[finite]) / np.spacing(np.abs(ref32[finite]))
    assert ulps.max() <= 1.0
    assert (y[ref32 == 0] == 0).all() and np.isinf(y[np.isinf(ref32)]).all()


def test_exp_special_values():
    y = _exp([np.nan, np.inf, -np.inf, 0.0, -0.0, 88.72283, 88.7229, -87.33655, -103.97, -1e30, 1e30])
    assert np.isnan(y[0])
    assert y[1] == np.inf and y[2] == 0.0 and y[3] == 1.0 and y[4] == 1.0
    assert np.isfinite(y[5]) and y[6] == np.inf
    assert 0 < y[7] < 1.2e-38 and 0 < y[8] < 1e-44
    assert y[9] == 0.0 and y[10] == np.inf


@pytest.mark.parametrize("seed", range(3))
def test_lane_reductions(seed):
    x = np.random.default_rng(seed).standard_normal(LANES).astype(np.float32)
    out = np.empty(3, np.float32)
    _reduce(x, out)
    np.testing.assert_allclose(out[0], x.astype(np.float64).sum(), rtol=1e-6, atol=1e-6)
    assert out[1] == x.max() and out[2] == x.max()


@njit(cache=True)
def _pool_ops(x, best, at, out, idx):
    # out[0:16] / out[16:32]: even and odd elements of x[0:32] ; out[32:48], idx[0:16]: vmax_index
    # of (best, at) with (x[0:16], x[32:48]) ; idx[16:32]: x[32:48] as int64
    lo, hi = vload(x, 0), vload(x, LANES)
    vstore(out, 0, veven(lo, hi))
    vstore(out, LANES, vodd(lo, hi))
    b, a = vmax_index(vload(best, 0), vload(at, 0), lo, vload(x, 2 * LANES))
    vstore(out, 2 * LANES, b)
    vstore_int64(idx, 0, a)
    vstore_int64(idx, LANES, vload(x, 2 * LANES))


def test_max_pool_permutes_select_and_index_store():
    x = np.arange(3 * LANES, dtype=np.float32)
    x[:LANES] = [1, 5, np.nan, 2, -np.inf, 3, 3, np.nan, 0, -1, 4, 4, 7, 7, -0.0, 8]
    best = np.array([2, 5, 1, np.nan, -np.inf, 2, 3, np.nan, 0, -2, 5, 4, 6, 8, 0.0, 8], np.float32)
    at = np.full(LANES, 100, np.float32)
    out, idx = np.empty(3 * LANES, np.float32), np.empty(2 * LANES, np.int64)
    _pool_ops(x, best, at, out, idx)
    np.testing.assert_array_equal(out[:LANES], x[0:2 * LANES:2])
    np.testing.assert_array_equal(out[LANES:2 * LANES], x[1:2 * LANES:2])
    v = x[:LANES]
    take = (v > best) | np.isnan(v)      # the later tap wins only when larger or NaN
    np.testing.assert_array_equal(out[2 * LANES:], np.where(take, v, best))
    np.testing.assert_array_equal(idx[:LANES], np.where(take, x[2 * LANES:], at).astype(np.int64))
    np.testing.assert_array_equal(idx[LANES:], np.arange(2 * LANES, 3 * LANES))
