"""PLACEHOLDER gemm with the final signature; being replaced by the packed SIMD GEMM."""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def _gemm_nn(a, b, c, accumulate):
    m, k = a.shape
    n = b.shape[1]
    for i in prange(m):
        if not accumulate:
            for j in range(n):
                c[i, j] = 0.0
        for p in range(k):
            aip = a[i, p]
            for j in range(n):
                c[i, j] += aip * b[p, j]


def gemm(a, b, out=None, trans_a=False, trans_b=False, accumulate=False):
    """out = op(a) @ op(b) (or out += ... when accumulate); op = transpose when trans_*.

    a, b: 2-D float32 or float64 arrays of one dtype (any strides). Returns out.
    """
    a2 = np.ascontiguousarray(a.T if trans_a else a)
    b2 = np.ascontiguousarray(b.T if trans_b else b)
    if out is None:
        out = np.empty((a2.shape[0], b2.shape[1]), dtype=a.dtype)
        accumulate = False
    _gemm_nn(a2, b2, out, accumulate)
    return out


def gemm_ref(a, b, out=None, trans_a=False, trans_b=False, accumulate=False):
    """NumPy reference twin (tests only)."""
    r = (a.T if trans_a else a) @ (b.T if trans_b else b)
    if out is None:
        return r
    if accumulate:
        out += r
    else:
        out[...] = r
    return out
