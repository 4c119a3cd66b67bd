"""Fully connected layer, y = x @ w.T + b (torch.nn.functional.linear), on our GEMM."""
import numpy as np
from numba import njit, prange

from minialex.kernels.gemm import gemm


@njit(parallel=True, cache=True)
def _fill_rows(y, b):
    # y: (N, out) ; b: (out,) ; every row of y starts as the bias, the GEMM accumulates onto it
    n, m = y.shape
    for i in prange(n):
        row = y[i]
        for j in range(m):
            row[j] = b[j]


@njit(parallel=True, cache=True)
def _col_sums(dy, db, accumulate):
    # dy: (N, out) ; db: (out,) accumulated (or overwritten) ; each task owns one column block of db
    n, m = dy.shape
    nblk = (m + 63) // 64
    for blk in prange(nblk):
        j0 = blk * 64
        j1 = min(m, j0 + 64)
        acc = np.zeros(j1 - j0, dtype=np.float64)
        for i in range(n):
            row = dy[i, j0:j1]
            for j in range(j1 - j0):
                acc[j] += row[j]
        for j in range(j1 - j0):
            if accumulate:
                db[j0 + j] += acc[j]
            else:
                db[j0 + j] = acc[j]


def linear_forward(x, w, b):
    """x: (N, in) ; w: (out, in) ; b: (out,) or None. Returns y: (N, out) = x @ w.T + b."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear expects x (N, in) and w (out, in), got {x.shape}, {w.shape}")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w dtypes differ: {x.dtype} vs {w.dtype}")
    y = np.empty((x.shape[0], w.shape[0]), dtype=x.dtype)
    if b is None:
        return gemm(x, w, out=y, trans_b=True)
    _fill_rows(y, np.ascontiguousarray(b, dtype=x.dtype))
    return gemm(x, w, out=y, trans_b=True, accumulate=True)


def linear_backward(dy, x, w, dw, db, need_dx=True, accumulate=True):
    """Accumulates dw += dy.T @ x and db += dy.sum(0) (db may be None); returns dx = dy @ w or None.
    With accumulate=False dw and db are overwritten instead (a freshly zeroed gradient).

    dy: (N, out) ; x: (N, in) ; w, dw: (out, in) ; db: (out,) or None
    """
    dy = np.asarray(dy, dtype=x.dtype)
    gemm(dy, x, out=dw, trans_a=True, accumulate=accumulate)
    if db is not None:
        _col_sums(dy, db, accumulate)
    if not need_dx:
        return None
    return gemm(dy, w)


def linear_forward_ref(x, w, b):
    """NumPy reference twin. x: (N, in) ; w: (out, in) ; b: (out,) or None."""
    y = np.einsum("ni,oi->no", x, w)
    return y if b is None else y + b


def linear_backward_ref(dy, x, w, dw, db, need_dx=True, accumulate=True):
    """NumPy reference twin with the same accumulate semantics."""
    if not accumulate:
        dw[...] = 0
        if db is not None:
            db[...] = 0
    dw += np.einsum("no,ni->oi", dy, x)
    if db is not None:
        db += dy.sum(axis=0)
    return np.einsum("no,oi->ni", dy, w) if need_dx else None
