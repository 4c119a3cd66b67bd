"""int8 GEMM for quantised inference: uint8 activations times int8 weights, int32 sums, and the
requantising epilogue fused into the store.

    acc[m, n] = sum_k a[m, k] * w[n, k]                     (int32; |acc + bias| < 2**31 is the
                                                              quantiser's job, see kernels.quant)
    t[m, n]   = float32(acc[m, n] + bias[n]) * scale[n]     (float32 convert and multiply, RNE)
    out       = t                                           if out is float32 (dequantised logits)
              = min(max(rint(t), 0), 255)                   if out is uint8 (requantised; the clamp
                                                              at 0 is the fused ReLU)
Weights are packed once (`pack_weights`); the K dimension is padded to a multiple of 4 (`padded_k`),
the group of bytes one 32-bit lane of `vpdpbusd` multiplies, and `a` carries those pad columns.

How it runs (`int8_path()` says which path a call takes):

- "vnni" (CPU flags list avx512_vnni): `vpdpbusd` multiplies 4 bytes of a row of `a` (broadcast
  to every lane) by 4 k of 16 columns of the packed weights, 64 multiply-adds per instruction.
  Packed layout, per panel of NR = 32 output columns: [k group of 4][32 columns][4 bytes], zero
  beyond N and K, 64-byte aligned (two zmm loads per k group). An 8x32 micro-kernel holds 16
  int32 accumulators over the whole depth, reading the 8 rows of `a` where they lie (4-byte
  broadcasts; no packing of `a`), then adds the bias, converts, scales and stores the tile with
  masked stores at the right edge. Loop nest: panels in blocks of about NC_BYTES of packed
  weights (kept in L2) -> 8-row panels of `a` (kept in L1) -> 32-column panels. A single row
  (batch-1 FC layers, bound by reading the weights) runs a 1x32 kernel that streams each panel
  once. Two threads take disjoint halves of the output: rows when M is large, panels otherwise.
- "emulated" (no avx512_vnni, or MINIALEX_INT8=emulate, read at every call; other values but
  empty or `auto` are an error): the same arithmetic in plain Numba integer code on the packed
  layout, for CPUs without the instruction and for testing anywhere.
"""
import functools
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from .simd import instruction_path, prefetch, vload, vmul
from .simd_int8 import (has_avx512_vnni, i2f, iadd, iload, izero, s8load, store_out, u8broadcast4,
                        vpdpbusd)

MR = 8                   # rows of the micro-tile (broadcast from a)
NR = 32                  # columns of a packed panel and of the micro-tile (two 16-lane vectors)
GROUP = 4 * NR           # bytes of one k group (4 k) of a packed panel
NC_BYTES = 384 * 1024    # packed weights per column block, kept in L2 while the rows stream by
PAR_MIN_OPS = 4_000_000  # below this many multiply-adds * 2 a second thread costs more than it saves
GEMV_PREFETCH = 8192     # bytes ahead in a streamed weight panel (batch-1 kernel; 1024: fc6 1.3x slower)


def padded_k(k):
    """K rounded up to the 4-byte groups the kernel multiplies."""
    return (int(k) + 3) // 4 * 4


class PackedWeights(NamedTuple):
    """(N, K) int8 weights in the kernel's layout; n, k are the unpadded sizes."""
    data: np.ndarray
    n: int
    k: int


def pack_weights(w):
    """(N, K) int8 -> PackedWeights, once per model: data is the flat, 64-byte aligned int8 array
    [panel of 32 columns][k group][32 columns][4 k], zero-padded to whole panels and groups."""
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"weights must be a 2-D int8 array, got {w.dtype} {w.shape}")
    n, k = w.shape
    npan, kg = (n + NR - 1) // NR, padded_k(k) // 4
    size = npan * kg * GROUP
    raw = np.zeros(size + 64, dtype=np.int8)
    off = (-raw.ctypes.data) % 64
    data = raw[off:off + size]
    padded = np.zeros((npan * NR, kg * 4), dtype=np.int8)
    padded[:n, :k] = w
    data.reshape(npan, kg, NR, 4)[...] = padded.reshape(npan, NR, kg, 4).transpose(0, 2, 1, 3)
    return PackedWeights(data, n, k)


# -- choosing the path ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _cpu_has_vnni():
    return has_avx512_vnni()


def int8_path():
    """"vnni" (vpdpbusd) or "emulated" (plain integer Numba code): what gemm_u8s8 runs now, from
    the CPU flags and the environment variable MINIALEX_INT8."""
    return instruction_path("MINIALEX_INT8", "vnni", _cpu_has_vnni)


# -- vnni path ------------------------------------------------------------------------------------

@njit(cache=True)
def _micro_8x32(kh, qpr, seg, a, p0, p1, p2, p3, p4, p5, p6, p7, h, wp, w_off, bias, scale, j0,
                out, o_off, ldo, w, pf, pf_len):
    # out[r, :w] (row r at o_off + r*ldo) <- epilogue(a rows @ panel) for r < h
    # a: flat uint8; row r's K bytes are kh runs of 4*qpr bytes, run i at p_r + i*seg (a plain
    # matrix: one run, the row itself; a convolution read in place: one run per kernel row);
    # the rows' p_r past h repeat the last row (computed, not stored)
    # wp: packed weights, this panel's groups from w_off ; bias, scale: padded, columns from j0
    # pf, pf_len: in every run, bytes pf + i*seg .. + pf_len of a to prefetch, 32 per k group
    # (the next 8 rows); rows short as conv1's (364 bytes) are too short a stream for the
    # hardware prefetcher, and missing them cost a third of conv1's time
    c00 = izero(); c01 = izero(); c10 = izero(); c11 = izero()
    c20 = izero(); c21 = izero(); c30 = izero(); c31 = izero()
    c40 = izero(); c41 = izero(); c50 = izero(); c51 = izero()
    c60 = izero(); c61 = izero(); c70 = izero(); c71 = izero()
    pw = w_off
    for i in range(kh):
        o = i * seg
        for g in range(qpr):
            q = o + 4 * g
            if 32 * g < pf_len:
                prefetch(a, pf + o + 32 * g)
            b0 = s8load(wp, pw)
            b1 = s8load(wp, pw + 64)
            x = u8broadcast4(a, p0 + q)
            c00 = vpdpbusd(c00, x, b0); c01 = vpdpbusd(c01, x, b1)
            x = u8broadcast4(a, p1 + q)
            c10 = vpdpbusd(c10, x, b0); c11 = vpdpbusd(c11, x, b1)
            x = u8broadcast4(a, p2 + q)
            c20 = vpdpbusd(c20, x, b0); c21 = vpdpbusd(c21, x, b1)
            x = u8broadcast4(a, p3 + q)
            c30 = vpdpbusd(c30, x, b0); c31 = vpdpbusd(c31, x, b1)
            x = u8broadcast4(a, p4 + q)
            c40 = vpdpbusd(c40, x, b0); c41 = vpdpbusd(c41, x, b1)
            x = u8broadcast4(a, p5 + q)
            c50 = vpdpbusd(c50, x, b0); c51 = vpdpbusd(c51, x, b1)
            x = u8broadcast4(a, p6 + q)
            c60 = vpdpbusd(c60, x, b0); c61 = vpdpbusd(c61, x, b1)
            x = u8broadcast4(a, p7 + q)
            c70 = vpdpbusd(c70, x, b0); c71 = vpdpbusd(c71, x, b1)
            pw += GROUP
    bi0 = iload(bias, j0); bi1 = iload(bias, j0 + 16)
    s0 = vload(scale, j0); s1 = vload(scale, j0 + 16)
    w1 = w - 16
    store_out(out, o_off, vmul(i2f(iadd(c00, bi0)), s0), w)
    store_out(out, o_off + 16, vmul(i2f(iadd(c01, bi1)), s1), w1)
    if h > 1:
        o = o_off + ldo
        store_out(out, o, vmul(i2f(iadd(c10, bi0)), s0), w)
        store_out(out, o + 16, vmul(i2f(iadd(c11, bi1)), s1), w1)
    if h > 2:
        o = o_off + 2 * ldo
        store_out(out, o, vmul(i2f(iadd(c20, bi0)), s0), w)
        store_out(out, o + 16, vmul(i2f(iadd(c21, bi1)), s1), w1)
    if h > 3:
        o = o_off + 3 * ldo
        store_out(out, o, vmul(i2f(iadd(c30, bi0)), s0), w)
        store_out(out, o + 16, vmul(i2f(iadd(c31, bi1)), s1), w1)
    if h > 4:
        o = o_off + 4 * ldo
        store_out(out, o, vmul(i2f(iadd(c40, bi0)), s0), w)
        store_out(out, o + 16, vmul(i2f(iadd(c41, bi1)), s1), w1)
    if h > 5:
        o = o_off + 5 * ldo
        store_out(out, o, vmul(i2f(iadd(c50, bi0)), s0), w)
        store_out(out, o + 16, vmul(i2f(iadd(c51, bi1)), s1), w1)
    if h > 6:
        o = o_off + 6 * ldo
        store_out(out, o, vmul(i2f(iadd(c60, bi0)), s0), w)
        store_out(out, o + 16, vmul(i2f(iadd(c61, bi1)), s1), w1)
    if h > 7:
        o = o_off + 7 * ldo
        store_out(out, o, vmul(i2f(iadd(c70, bi0)), s0), w)
        store_out(out, o + 16, vmul(i2f(iadd(c71, bi1)), s1), w1)


@njit(cache=True)
def _micro_1x32(kg, a, a_off, wp, w_off, bias, scale, j0, out, o_off, w):
    # one row of out (batch 1): the panel streams from memory once; two accumulators per
    # 16 columns (even and odd groups) keep four vpdpbusd chains in flight
    c0 = izero(); c1 = izero(); d0 = izero(); d1 = izero()
    pw = w_off
    for g in range(0, kg - 1, 2):
        prefetch(wp, pw + GEMV_PREFETCH)
        prefetch(wp, pw + GEMV_PREFETCH + 64)
        prefetch(wp, pw + GEMV_PREFETCH + 128)
        prefetch(wp, pw + GEMV_PREFETCH + 192)
        x = u8broadcast4(a, a_off + 4 * g)
        c0 = vpdpbusd(c0, x, s8load(wp, pw)); c1 = vpdpbusd(c1, x, s8load(wp, pw + 64))
        x = u8broadcast4(a, a_off + 4 * g + 4)
        d0 = vpdpbusd(d0, x, s8load(wp, pw + GROUP)); d1 = vpdpbusd(d1, x, s8load(wp, pw + GROUP + 64))
        pw += 2 * GROUP
    if kg % 2:
        x = u8broadcast4(a, a_off + 4 * (kg - 1))
        c0 = vpdpbusd(c0, x, s8load(wp, pw)); c1 = vpdpbusd(c1, x, s8load(wp, pw + 64))
    c0 = iadd(iadd(c0, d0), iload(bias, j0))
    c1 = iadd(iadd(c1, d1), iload(bias, j0 + 16))
    store_out(out, o_off, vmul(i2f(c0), vload(scale, j0)), w)
    store_out(out, o_off + 16, vmul(i2f(c1), vload(scale, j0 + 16)), w - 16)


@njit(cache=True)
def _row_start(r, rows):
    # where row r of a starts: rows = (oh_n, ow_n, image, row, col, kh, qpr, seg), see Rows
    plane = rows[0] * rows[1]
    n = r // plane
    p = r - n * plane
    oh = p // rows[1]
    return n * rows[2] + oh * rows[3] + (p - oh * rows[1]) * rows[4]


@njit(cache=True)
def _next_row(p, n, oh, ow, advance, rows):
    # (start, n, oh, ow) of the row after (n, oh, ow) if advance, else the same row: a tile's
    # rows are found by counting, not by two integer divisions each (a tenth of conv1's time)
    if not advance:
        return p, n, oh, ow
    ow += 1
    if ow == rows[1]:
        ow = 0
        oh += 1
        if oh == rows[0]:
            oh = 0
            n += 1
    return n * rows[2] + oh * rows[3] + ow * rows[4], n, oh, ow


@njit(cache=True)
def _vnni_block(a, rows, wp, bias, scale, out, ldo, n, m0, m1, q0, q1, ncp):
    # out[m0:m1, columns of panels q0..q1] ; ncp panels per column block
    kh, qpr, seg = rows[5], rows[6], rows[7]
    kg = kh * qpr
    for qc in range(q0, q1, ncp):
        qe = min(q1, qc + ncp)
        if m1 - m0 == 1 and kh == 1:
            for q in range(qc, qe):
                j0 = q * NR
                _micro_1x32(kg, a, _row_start(m0, rows), wp, q * kg * GROUP, bias, scale, j0, out,
                            m0 * ldo + j0, min(NR, n - j0))
            continue
        for i0 in range(m0, m1, MR):
            h = min(MR, m1 - i0)
            # the tile's rows; past h they repeat the last one
            plane = rows[0] * rows[1]
            im = i0 // plane
            oh = (i0 - im * plane) // rows[1]
            ow = i0 - im * plane - oh * rows[1]
            p0 = im * rows[2] + oh * rows[3] + ow * rows[4]
            p1, im, oh, ow = _next_row(p0, im, oh, ow, h > 1, rows)
            p2, im, oh, ow = _next_row(p1, im, oh, ow, h > 2, rows)
            p3, im, oh, ow = _next_row(p2, im, oh, ow, h > 3, rows)
            p4, im, oh, ow = _next_row(p3, im, oh, ow, h > 4, rows)
            p5, im, oh, ow = _next_row(p4, im, oh, ow, h > 5, rows)
            p6, im, oh, ow = _next_row(p5, im, oh, ow, h > 6, rows)
            p7, im, oh, ow = _next_row(p6, im, oh, ow, h > 7, rows)
            # the first panel's call prefetches the next rows' bytes in every run: from the
            # start of the next tile's first row to the end of its last (one stretch when
            # the rows follow each other, as they do within an output row)
            hn = min(MR, m1 - i0 - h)
            pf = 0
            pf_len = 0
            if hn > 0:
                pf, im, oh, ow = _next_row(p7, im, oh, ow, True, rows)
                pl = pf
                for _ in range(hn - 1):
                    pl, im, oh, ow = _next_row(pl, im, oh, ow, True, rows)
                pf_len = max(0, pl - pf) + 4 * qpr
            for q in range(qc, qe):
                j0 = q * NR
                _micro_8x32(kh, qpr, seg, a, p0, p1, p2, p3, p4, p5, p6, p7, h, wp, q * kg * GROUP,
                            bias, scale, j0, out, i0 * ldo + j0, ldo, min(NR, n - j0), pf, pf_len)
                pf_len = 0


@njit(parallel=True, cache=True)
def _vnni_par(a, rows, wp, bias, scale, out, ldo, m, n, ncp, nslab, split_n):
    # disjoint slabs of out: along the panels (split_n) or along rows in multiples of MR
    npan = (n + NR - 1) // NR
    if split_n:
        step = (npan + nslab - 1) // nslab
    else:
        step = ((m + MR - 1) // MR + nslab - 1) // nslab * MR
    for s in prange(nslab):
        lo = s * step
        if split_n:
            hi = min(npan, lo + step)
            if lo < hi:
                _vnni_block(a, rows, wp, bias, scale, out, ldo, n, 0, m, lo, hi, ncp)
        else:
            hi = min(m, lo + step)
            if lo < hi:
                _vnni_block(a, rows, wp, bias, scale, out, ldo, n, lo, hi, 0, npan, ncp)


def _vnni(a, rows, wp, bias, scale, out, ldo, m, n):
    npan = (n + NR - 1) // NR
    kg = rows[5] * rows[6]
    ncp = max(1, NC_BYTES // (kg * GROUP)) if kg else npan
    nthreads = numba.get_num_threads()
    if nthreads > 1 and 2.0 * m * n * 4 * kg >= PAR_MIN_OPS:
        # rows when there are enough of them for every thread, else the weights' panels
        split_n = m < 8 * MR * nthreads
        nslab = min(nthreads, npan if split_n else (m + MR - 1) // MR)
        if nslab > 1:
            _vnni_par(a, rows, wp, bias, scale, out, ldo, m, n, ncp, nslab, split_n)
            return
    _vnni_block(a, rows, wp, bias, scale, out, ldo, n, 0, m, 0, npan, ncp)


# -- emulated path --------------------------------------------------------------------------------

def _put(out, idx, v):
    pass


@numba.extending.overload(_put)
def _put_impl(out, idx, v):
    # the epilogue's last step on one float32 value, by out's dtype (see requantize_ref)
    if out.dtype == numba.types.uint8:
        def put_u8(out, idx, v):
            r = np.rint(v)
            out[idx] = np.uint8(255) if r >= 255 else (np.uint8(r) if r > 0 else np.uint8(0))
        return put_u8

    def put_f32(out, idx, v):
        out[idx] = v
    return put_f32


@njit(parallel=True, cache=True)
def _emulated(a, rows, wp, bias, scale, out, ldo, m, n):
    # the vnni path's arithmetic in plain integer code on the packed layout, reading the rows of
    # a where Rows puts them: int32 sums that wrap
    npan = (n + NR - 1) // NR
    kh, qpr, seg = rows[5], rows[6], rows[7]
    kg = kh * qpr
    for i in prange(m):
        acc = np.empty(NR, dtype=np.int32)
        start = _row_start(i, rows)
        for q in range(npan):
            acc[:] = 0
            base = q * kg * GROUP
            for g in range(kg):
                at = start + (g // qpr) * seg + 4 * (g % qpr)
                x0 = np.int32(a[at])
                x1 = np.int32(a[at + 1])
                x2 = np.int32(a[at + 2])
                x3 = np.int32(a[at + 3])
                p = base + g * GROUP
                for jj in range(NR):
                    acc[jj] += (x0 * np.int32(wp[p + 4 * jj]) + x1 * np.int32(wp[p + 4 * jj + 1])
                                + x2 * np.int32(wp[p + 4 * jj + 2]) + x3 * np.int32(wp[p + 4 * jj + 3]))
            for jj in range(min(NR, n - q * NR)):
                j = q * NR + jj
                t = np.int32(acc[jj] + bias[j])
                _put(out, i * ldo + j, np.float32(t) * scale[j])


# -- entry point ----------------------------------------------------------------------------------

def _flat(x, rows, cols, writeable):
    # (flat 1-D view from x's first element, row stride in elements) of a 2-D array whose
    # columns are unit-stride
    ld = x.strides[0] // x.itemsize if rows > 1 else cols
    size = (rows - 1) * ld + cols if rows and cols else 0
    return np.lib.stride_tricks.as_strided(x, shape=(size,), strides=(x.itemsize,), writeable=writeable), ld


def gemm_u8s8(a, packed, bias, scale, out):
    """out[m, n] <- the requantised or dequantised a @ w.T as above (see gemm_u8s8_ref).
    a: (M, padded_k(K)) uint8, C-contiguous; bias: (N,) int32; scale: (N,) float32;
    out: (M, N) uint8 or float32, unit column stride (a column slice of a wider array is fine)."""
    return _gemm(a, packed, bias, scale, out, int8_path())


def _gemm(a, packed, bias, scale, out, path):
    # gemm_u8s8 on the named path ("vnni" or "emulated")
    m, kp = a.shape
    _check_weights(packed)
    if a.dtype != np.uint8 or kp != padded_k(packed.k) or (m > 1 and kp > 1 and a.strides[1] != 1):
        raise ValueError(f"a must be (M, {padded_k(packed.k)}) uint8 with unit column stride, "
                         f"got {a.dtype} {a.shape}")
    af, lda = _flat(a, m, kp, False)
    return _run(af, Rows(1, 1, lda, 0, 0, 1, kp // 4, 0), m, packed, bias, scale, out, path)


class Rows(NamedTuple):
    """Where the M rows of a lie in a flat uint8 buffer, for gemm_u8s8_rows: row r, taken as
    (n, oh, ow) in C order over (N, oh_n, ow_n), starts at n*image + oh*row + ow*col, and its K
    bytes are kh runs of 4*qpr contiguous bytes, run i starting i*seg after the row's start.
    A matrix with leading dimension lda is Rows(M, 1, lda, 0, 0, 1, K/4, 0); a convolution's
    windows on a padded channels-last image are read in place with one run per kernel row."""
    oh_n: int
    ow_n: int
    image: int
    row: int
    col: int
    kh: int
    qpr: int
    seg: int


def gemm_u8s8_rows(buf, rows, m, packed, bias, scale, out):
    """gemm_u8s8 with a's M rows read where `rows` (a Rows) puts them in the flat uint8 buffer buf
    (implicit GEMM: no im2col matrix). packed.k must be rows.kh * 4 * rows.qpr."""
    return _run_rows(buf, rows, m, packed, bias, scale, out, int8_path())


def _run_rows(buf, rows, m, packed, bias, scale, out, path):
    # gemm_u8s8_rows on the named path
    if not (isinstance(buf, np.ndarray) and buf.ndim == 1 and buf.dtype == np.uint8):
        raise ValueError("buf must be a flat uint8 array")
    return _prepare(buf.size, rows, m, packed, bias, scale, out, path)(buf)


def prepare_rows(nbytes, rows, m, packed, bias, scale, out):
    """gemm_u8s8_rows for flat uint8 buffers of `nbytes` bytes and this one `out`, everything but
    the arithmetic done once: returns run(buf), which writes out. An int8 model keeps one per
    layer and batch size, since at batch 1 the per-call checks cost a tenth of the forward."""
    return _prepare(nbytes, rows, m, packed, bias, scale, out, int8_path())


def _check_weights(packed):
    d = packed.data
    if not (isinstance(d, np.ndarray) and d.ndim == 1 and d.dtype == np.int8
            and d.size == (packed.n + NR - 1) // NR * padded_k(packed.k) * NR):
        raise ValueError("packed must come from pack_weights (a flat int8 array of whole panels)")


def _prepare(nbytes, rows, m, packed, bias, scale, out, path):
    # checks rows against a buffer of nbytes, and out, bias and scale; returns run(buf) running
    # the kernel of `path` on a's rows as `rows` places them in buf
    _check_weights(packed)
    rows = Rows(*(int(v) for v in rows))
    k = rows.kh * 4 * rows.qpr   # bytes a row provides: K, or for one run K padded to groups of 4
    if min(rows) < 0 or rows.oh_n < 1 or rows.ow_n < 1 or not (packed.k == k or (
            rows.kh == 1 and padded_k(packed.k) == k)):
        raise ValueError(f"rows {rows} do not fit weights of K = {packed.k}")
    if m > 0:
        last = _row_start(m - 1, rows) + max(0, rows.kh - 1) * rows.seg + 4 * rows.qpr
        if last > nbytes:
            raise ValueError(f"rows {rows} read up to byte {last} of a {nbytes}-byte buffer")
    n = packed.n
    if out.shape != (m, n) or out.dtype not in (np.uint8, np.float32) or (n > 1 and out.strides[1] != out.itemsize) \
            or (m > 1 and out.strides[0] % out.itemsize) or not out.flags.writeable:
        raise ValueError(f"out must be a writeable ({m}, {n}) uint8 or float32 array with unit column "
                         f"stride, got {out.dtype} {out.shape}")
    if bias.shape != (n,) or bias.dtype != np.int32 or scale.shape != (n,) or scale.dtype != np.float32:
        raise ValueError(f"bias and scale must be ({n},) int32 and float32, got {bias.dtype} {bias.shape} "
                         f"and {scale.dtype} {scale.shape}")
    if m == 0 or n == 0:
        return lambda buf: out
    of, ldo = _flat(out, m, n, True)
    rows = tuple(rows)
    wp = packed.data
    if path == "emulated":
        bias, scale = bias.copy(), scale.copy()

        def run(buf):
            _check_buffer(buf, nbytes)
            _emulated(buf, rows, wp, bias, scale, of, ldo, m, n)
            return out
        return run
    npad = (n + NR - 1) // NR * NR
    bias_p = np.zeros(npad, np.int32)
    bias_p[:n] = bias
    scale_p = np.zeros(npad, np.float32)
    scale_p[:n] = scale

    def run(buf):
        _check_buffer(buf, nbytes)
        _vnni(buf, rows, wp, bias_p, scale_p, of, ldo, m, n)
        return out
    return run


def _check_buffer(buf, nbytes):
    if not (isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.ndim == 1 and buf.size >= nbytes):
        raise ValueError(f"the rows' buffer must be a flat uint8 array of at least {nbytes} bytes")


def _run(af, rows, m, packed, bias, scale, out, path):
    # checks out, bias and scale, then runs the kernel of `path` on a's rows as `rows` places them
    return _prepare(af.size, rows, m, packed, bias, scale, out, path)(af)


def requantize_ref(acc, bias, scale, out_dtype):
    """The epilogue on int64 sums acc (M, N): see the module docstring; int32 out_dtype returns
    acc + bias unscaled. Sums outside int32 are an error (the kernel would wrap)."""
    t = acc.astype(np.int64) + bias.astype(np.int64)[None, :]
    if t.size and (t.min() < -2 ** 31 or t.max() >= 2 ** 31):
        raise OverflowError("int8 GEMM sum outside int32")
    if np.dtype(out_dtype) == np.int32:
        return t.astype(np.int32)
    v = t.astype(np.int32).astype(np.float32) * scale.astype(np.float32)[None, :]
    if np.dtype(out_dtype) == np.float32:
        return v
    if np.dtype(out_dtype) == np.uint8:
        return np.clip(np.rint(v), 0, 255).astype(np.uint8)
    raise ValueError(f"out_dtype must be uint8, float32 or int32, got {out_dtype}")


def gemm_u8s8_ref(a, w, bias, scale, out_dtype):
    """NumPy twin: a (M, K) uint8, w (N, K) int8, bias (N,) int32, scale (N,) float32 -> (M, N)."""
    acc = a.astype(np.int64) @ w.astype(np.int64).T
    return requantize_ref(acc, bias, scale, out_dtype)
