"""Fully connected layer, y = x @ w.T + b (torch.nn.functional.linear), on our GEMM.

At small batch (N <= SMALL_BATCH, as in training AlexNet at batch 8) the backward pass is bound
by memory, not arithmetic: fc6 reads a 151 MB weight for dx and writes a 151 MB gradient for
dW, with only 2N multiply-adds per element each. Two GEMMs walk those arrays twice, the dW one
down 8-row tiles that the hardware prefetcher cannot follow. `_backward_small` makes one pass
instead: for each block of 8 rows of W it writes the 8 rows of dW (streaming stores that skip
reading the old contents into the cache) and adds the rows' share of dx into a per-thread
partial, summed at the end. Measured on fc6 at batch 8, two threads: 22-33 ms -> 10-12 ms.

precision="bf16" (float32 data): with more than SMALL_BATCH rows the three products run on the
bf16 GEMM (kernels.gemm_bf16: operands rounded to bfloat16, float32 sums); the bias and its
gradient stay float32. With at most SMALL_BATCH rows the layer reads each weight for 2N
multiply-adds and is bound by reading the float32 weights, not by arithmetic: it keeps the
float32 kernels above, which measured faster than the bf16 GEMM there (docs/performance.md).
"""
import numba
import numpy as np
from numba import njit, prange

from minialex.kernels.gemm import gemm
from minialex.kernels.gemm_bf16 import gemm_bf16
from minialex.kernels.parallel import column_sums
from minialex.kernels.simd import (LANES, prefetch, store_fence, vadd, vbroadcast, vfma, vload, vmul,
                                   vstore, vstore_nt)

SMALL_BATCH = 8     # at most this many rows of x: the fused one-pass backward
_ROWS = 8           # rows of W per block in that pass
_PREFETCH = 256     # elements ahead on each of the block's W rows


@njit(parallel=True, cache=True)
def _fill_rows(y, b):
    # y: (N, out) ; b: (out,) ; every row of y starts as the bias, the GEMM accumulates onto it
    n, m = y.shape
    for i in prange(n):
        row = y[i]
        for j in range(m):
            row[j] = b[j]


@njit(cache=True)
def _rows8_backward(dyp, xp, ldx, w, dw, ldw, dxp, o0, ncols, add, nt, need_dx):
    # rows o0..o0+7 of W and dW, columns 0..ncols (a multiple of 16)
    # dyp: (O, 8) dy transposed, zero-padded to 8 batch rows ; xp: (8, ldx) x zero-padded
    # dW[o, j] (+)= sum_n dy[n, o] x[n, j] ;  dxp[n, j] += sum_o dy[n, o] W[o, j]
    for j in range(0, ncols, LANES):
        x0 = vload(xp, j)
        x1 = vload(xp, ldx + j)
        x2 = vload(xp, 2 * ldx + j)
        x3 = vload(xp, 3 * ldx + j)
        x4 = vload(xp, 4 * ldx + j)
        x5 = vload(xp, 5 * ldx + j)
        x6 = vload(xp, 6 * ldx + j)
        x7 = vload(xp, 7 * ldx + j)
        for r in range(_ROWS):
            q = (o0 + r) * 8
            acc = vmul(vbroadcast(dyp, q), x0)
            acc = vfma(vbroadcast(dyp, q + 1), x1, acc)
            acc = vfma(vbroadcast(dyp, q + 2), x2, acc)
            acc = vfma(vbroadcast(dyp, q + 3), x3, acc)
            acc = vfma(vbroadcast(dyp, q + 4), x4, acc)
            acc = vfma(vbroadcast(dyp, q + 5), x5, acc)
            acc = vfma(vbroadcast(dyp, q + 6), x6, acc)
            acc = vfma(vbroadcast(dyp, q + 7), x7, acc)
            p = (o0 + r) * ldw + j
            if add:
                acc = vadd(acc, vload(dw, p))
            if nt:
                vstore_nt(dw, p, acc)
            else:
                vstore(dw, p, acc)
        if need_dx:
            b = o0 * ldw + j
            for r in range(_ROWS):
                prefetch(w, b + r * ldw + _PREFETCH)
            w0 = vload(w, b)
            w1 = vload(w, b + ldw)
            w2 = vload(w, b + 2 * ldw)
            w3 = vload(w, b + 3 * ldw)
            w4 = vload(w, b + 4 * ldw)
            w5 = vload(w, b + 5 * ldw)
            w6 = vload(w, b + 6 * ldw)
            w7 = vload(w, b + 7 * ldw)
            q = o0 * 8
            for n in range(8):
                d = vload(dxp, n * ldx + j)
                d = vfma(vbroadcast(dyp, q + n), w0, d)
                d = vfma(vbroadcast(dyp, q + 8 + n), w1, d)
                d = vfma(vbroadcast(dyp, q + 16 + n), w2, d)
                d = vfma(vbroadcast(dyp, q + 24 + n), w3, d)
                d = vfma(vbroadcast(dyp, q + 32 + n), w4, d)
                d = vfma(vbroadcast(dyp, q + 40 + n), w5, d)
                d = vfma(vbroadcast(dyp, q + 48 + n), w6, d)
                d = vfma(vbroadcast(dyp, q + 56 + n), w7, d)
                vstore(dxp, n * ldx + j, d)


@njit(cache=True)
def _rows_backward_scalar(dyp, xp, ldx, w, dw, ldw, dxp, o0, o1, j0, j1, add, need_dx):
    # the same sums as _rows8_backward for rows o0..o1 and columns j0..j1 (edges), plain loops
    for o in range(o0, o1):
        for j in range(j0, j1):
            v = 0.0
            for n in range(8):
                v += dyp[o * 8 + n] * xp[n * ldx + j]
            if add:
                dw[o * ldw + j] += v
            else:
                dw[o * ldw + j] = v
        if need_dx:
            for n in range(8):
                g = dyp[o * 8 + n]
                for j in range(j0, j1):
                    dxp[n * ldx + j] += g * w[o * ldw + j]


@njit(parallel=True, cache=True)
def _backward_small(dyp, xp, ldx, w, dw, ncols, dxps, add, nt, need_dx):
    # dyp: (O*8,) ; xp: (8*ldx,) ; w, dw: (O*ncols,) C-contiguous ; dxps: (T, 8*ldx) partials
    # Each thread owns a contiguous range of 8-row blocks (its rows of dW have one writer) and
    # its own dx partial, so the result depends on the thread count but not on timing.
    nout = dyp.size // 8
    nthr = dxps.shape[0]
    blocks = nout // _ROWS
    vcols = ncols - ncols % LANES
    step = (blocks + nthr - 1) // nthr
    for t in prange(nthr):
        dxp = dxps[t]
        dxp[:] = 0.0
        lo = min(blocks, t * step)
        hi = min(blocks, lo + step)
        for bl in range(lo, hi):
            _rows8_backward(dyp, xp, ldx, w, dw, ncols, dxp, bl * _ROWS, vcols, add, nt, need_dx)
            if vcols < ncols:
                _rows_backward_scalar(dyp, xp, ldx, w, dw, ncols, dxp, bl * _ROWS, (bl + 1) * _ROWS,
                                      vcols, ncols, add, need_dx)
        if t == nthr - 1 and blocks * _ROWS < nout:
            _rows_backward_scalar(dyp, xp, ldx, w, dw, ncols, dxp, blocks * _ROWS, nout,
                                  0, ncols, add, need_dx)
        if nt:
            store_fence()


def _linear_backward_small(dy, x, w, dw, need_dx, accumulate):
    """dW (+)= dy.T @ x and dx = dy @ w in one pass over w (float32, N <= SMALL_BATCH)."""
    n, nin = x.shape
    nout = w.shape[0]
    ldx = (nin + LANES - 1) // LANES * LANES + LANES  # padded: rows of x do not share cache sets
    xp = np.zeros((8, ldx), dtype=np.float32)
    xp[:n, :nin] = x
    dyp = np.zeros((nout, 8), dtype=np.float32)
    dyp[:, :n] = dy.T
    nthreads = numba.get_num_threads() if nout * nin >= 1 << 16 else 1
    dxps = np.empty((nthreads, 8 * ldx), dtype=np.float32)
    nt = dw.ctypes.data % 64 == 0 and nin % LANES == 0
    _backward_small(dyp.reshape(-1), xp.reshape(-1), ldx, w.reshape(-1), dw.reshape(-1), nin,
                    dxps, accumulate, nt, need_dx)
    if not need_dx:
        return None
    return dxps.sum(axis=0).reshape(8, ldx)[:n, :nin].copy()


def _products(precision, dtype, rows):
    """The GEMM that computes the products of a layer call on `rows` rows at `precision`."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if precision == "bf16" and dtype != np.float32:
        raise TypeError(f"precision bf16 needs float32 data, got {dtype}")
    return gemm_bf16 if precision == "bf16" and rows > SMALL_BATCH else gemm


def linear_forward(x, w, b, precision="fp32"):
    """x: (N, in) ; w: (out, in) ; b: (out,) or None. Returns y: (N, out) = x @ w.T + b."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear expects x (N, in) and w (out, in), got {x.shape}, {w.shape}")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w dtypes differ: {x.dtype} vs {w.dtype}")
    mm = _products(precision, x.dtype, x.shape[0])
    y = np.empty((x.shape[0], w.shape[0]), dtype=x.dtype)
    if b is None:
        return mm(x, w, out=y, trans_b=True)
    _fill_rows(y, np.ascontiguousarray(b, dtype=x.dtype))
    return mm(x, w, out=y, trans_b=True, accumulate=True)


def linear_backward(dy, x, w, dw, db, need_dx=True, accumulate=True, precision="fp32"):
    """Accumulates dw += dy.T @ x and db += dy.sum(0) (db may be None); returns dx = dy @ w or None.
    With accumulate=False dw and db are overwritten instead (a freshly zeroed gradient).

    dy: (N, out) ; x: (N, in) ; w, dw: (out, in) ; db: (out,) or None
    """
    dy = np.asarray(dy, dtype=x.dtype)
    mm = _products(precision, x.dtype, x.shape[0])
    if x.shape[0] == 0:   # an empty batch adds nothing; "overwrite" means zero
        if not accumulate:
            dw[...] = 0
            if db is not None:
                db[...] = 0
        return np.zeros_like(x) if need_dx else None
    if db is not None:
        column_sums(dy, db, accumulate)
    if (mm is gemm and x.dtype == np.float32 and x.shape[0] <= SMALL_BATCH and w.shape[0] >= _ROWS
            and w.flags.c_contiguous and dw.flags.c_contiguous and dw.dtype == np.float32):
        return _linear_backward_small(np.ascontiguousarray(dy), np.ascontiguousarray(x), w, dw,
                                      need_dx, accumulate)
    mm(dy, x, out=dw, trans_a=True, accumulate=accumulate)
    if not need_dx:
        return None
    return mm(dy, w)


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
