"""The vector intrinsics that are more than one LLVM instruction: exp and the lane reductions."""
import numpy as np
import pytest
from numba import njit

from minialex.kernels.simd import LANES, vexp, vhmax, vhsum, vload, vmax, vstore


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
