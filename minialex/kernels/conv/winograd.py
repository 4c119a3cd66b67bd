"""Path `winograd`: Winograd's minimal filtering F(2x2, 3x3) for float32, groups 1, 3x3, stride 1,
padding 1 convolutions (AlexNet's conv3-conv5): the forward pass and the input gradient.

Each 2x2 output tile is computed from the 4x4 input window d around it as

    Y = Aᵀ [ U ⊙ (Bᵀ d B) ] A,   U = G g Gᵀ       (summed over input channels)

so the sum over input channels becomes, for each of the 16 transform points p, one GEMM
(tiles x Cin) @ (Cin x Cout) on the GEMM's micro-kernel: 2.25x fewer multiplications than
the direct sum. The input gradient is the same convolution of dy with the flipped weights, their
channel axes swapped. A thread takes TILE_BLOCK tiles at a time and carries them through input
transform, the 16 GEMMs (U read in place) and output transform while they are in cache.

Layout: channels-last, channels zero-padded to multiples of 16, so every transform works on
16-channel vectors (simd.py) loaded from contiguous memory; each 2-D transform is a 1-D kernel
applied down the columns of a tile, then along its rows.

The weight gradient is not computed here: routed through this path, it takes the path the plan
gives the same call without an input gradient (plan.weight_grad_call). Why this and only this:
F(2x2) is the tile within 1e-5 of the largest output in float32; F(4x4) is not, and a
Winograd weight gradient was slower than the direct one (docs/performance.md).
"""
import numpy as np
from numba import njit, prange

from minialex.kernels.gemm import aligned_f32, gemm32_slab
from minialex.kernels.parallel import take
from minialex.kernels.simd import vadd, vload, vstore, vsub, vtranspose_8x16, vfma, vsplat

LANES = 16
M = 2            # output tile
ALPHA = M + 2    # input tile
POINTS = ALPHA * ALPHA
TILE_BLOCK = 32  # tiles a thread carries through one pass: transforms and products stay in L2
_NONE = np.empty(0, dtype=np.float32)  # gemm32_slab's "A not pre-packed"

# The transform matrices (Lavin & Gray, 2016; interpolation points 0, 1, -1, inf). The Numba
# kernels spell them out term by term; the NumPy twins use them as written.
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)


@njit(cache=True)
def _pad16(c):
    return (c + LANES - 1) // LANES * LANES


@njit(cache=True)
def _ld(c):
    """Row stride (elements) for a matrix of c (multiple of 16) columns that the GEMM reads in
    place: an odd number of 64-byte lines, so successive rows do not share cache sets."""
    return c if (c // LANES) % 2 == 1 else c + LANES


# 1-D transforms on 16-lane vectors: the k-th input vector at src[so + k*ss], the i-th output
# written at dst[do + i*ds].

@njit(inline="always", cache=True)
def _bt(src, so, ss, dst, do, ds):
    # Bᵀ d: 4 vectors -> 4 vectors
    d0 = vload(src, so); d1 = vload(src, so + ss); d2 = vload(src, so + 2 * ss); d3 = vload(src, so + 3 * ss)
    vstore(dst, do, vsub(d0, d2))
    vstore(dst, do + ds, vadd(d1, d2))
    vstore(dst, do + 2 * ds, vsub(d2, d1))
    vstore(dst, do + 3 * ds, vsub(d1, d3))


@njit(inline="always", cache=True)
def _at(src, so, ss, dst, do, ds):
    # Aᵀ m: 4 vectors -> 2 vectors
    d0 = vload(src, so); d1 = vload(src, so + ss); d2 = vload(src, so + 2 * ss); d3 = vload(src, so + 3 * ss)
    vstore(dst, do, vadd(vadd(d0, d1), d2))
    vstore(dst, do + ds, vsub(vsub(d1, d2), d3))


@njit(inline="always", cache=True)
def _g(src, so, ss, dst, do, ds):
    # G g: 3 vectors -> 4 vectors
    g0 = vload(src, so); g1 = vload(src, so + ss); g2 = vload(src, so + 2 * ss)
    h = vsplat(np.float32(0.5))
    e = vfma(h, g0, vfma(h, g2, vsplat(np.float32(0.0))))     # (g0 + g2) / 2
    vstore(dst, do, g0)
    vstore(dst, do + ds, vfma(h, g1, e))
    vstore(dst, do + 2 * ds, vfma(vsplat(np.float32(-0.5)), g1, e))
    vstore(dst, do + 3 * ds, g2)


# ---------------------------------------------------------------------------------------------
# Weights: U[p, ci, co] = (G w[co, ci] Gᵀ)[p]

@njit(parallel=True, cache=True)
def _taps_last(w, out, ldo):
    # w: (Cout, Cin, 3, 3) ; out: flat (Cin, 9, ldo): out[(ci*9 + t)*ldo + co] = w[co, ci, t]
    # 8 x 16 blocks by register transposes, the ragged edges one element at a time
    na, rows = w.shape[0], w.shape[1] * 9
    wf = w.reshape(-1)
    for ab in prange((na + 7) // 8):
        a0 = ab * 8
        r16 = rows - rows % 16 if a0 + 8 <= na else 0
        for r0 in range(0, r16, 16):
            vtranspose_8x16(wf, a0 * rows + r0, rows, out, r0 * ldo + a0, ldo)
        for a in range(a0, min(na, a0 + 8)):
            for r in range(r16, rows):
                out[r * ldo + a] = wf[a * rows + r]


@njit(parallel=True, cache=True)
def _taps_last_flipped(w, out, ldo):
    # w: (Cout, Cin, 3, 3) ; out: flat (Cout, 9, ldo): out[(co*9 + t)*ldo + ci] = w[co, ci, 8 - t]
    cout, cin = w.shape[0], w.shape[1]
    wf = w.reshape(-1)
    for co in prange(cout):
        for ci in range(cin):
            for t in range(9):
                out[(co * 9 + t) * ldo + ci] = wf[(co * cin + ci) * 9 + 8 - t]


@njit(parallel=True, cache=True)
def _weight_transform(wt, rows, ldw, u, ldu):
    # wt: flat (rows, 9, ldw) taps-last weights ; u: flat (POINTS, rows padded, ldu):
    # u[p, r, lane] = (G g Gᵀ)[p] of the 3x3 g = wt[r, :, lane]
    pstride = u.size // POINTS
    for r in prange(rows):
        tmp = np.empty(ALPHA * 3 * LANES, dtype=np.float32)
        for c in range(0, ldw, LANES):
            for kw in range(3):         # down column kw: tmp[i, kw] = (G g)[i, kw]
                _g(wt, (r * 9 + kw) * ldw + c, 3 * ldw, tmp, kw * LANES, 3 * LANES)
            for i in range(ALPHA):      # along row i: u[i*ALPHA + j] = (tmp Gᵀ)[i, j]
                _g(tmp, i * 3 * LANES, LANES, u, i * ALPHA * pstride + r * ldu + c, pstride)


def transform_weights(w, flipped=False):
    """w (Cout, Cin, 3, 3) float32 -> U (16, Cin padded to 16, row stride) float32 with
    U[p, ci, co] = (G w[co, ci] Gᵀ)[p]; flipped: the same for the weights of the input gradient,
    w[:, :, ::-1, ::-1] with the channel axes swapped, i.e. U[p, co, ci]."""
    w = np.ascontiguousarray(w)
    rows, lanes = (w.shape[0], w.shape[1]) if flipped else (w.shape[1], w.shape[0])
    ldw, ldu = _pad16(lanes), _ld(_pad16(lanes))
    u = np.zeros((POINTS, _pad16(rows), ldu), dtype=np.float32)
    if rows and lanes:
        wt = np.zeros(rows * 9 * ldw, dtype=np.float32)
        (_taps_last_flipped if flipped else _taps_last)(w, wt, ldw)
        _weight_transform(wt, rows, ldw, u.reshape(-1), ldu)
    return u


# ---------------------------------------------------------------------------------------------
# Tiles. T = N * th_n * tw_n, tile t = (n*th_n + th)*tw_n + tw covers outputs
# (2th .. 2th+1, 2tw .. 2tw+1).

@njit(parallel=True, cache=True)
def _to_channels_last(x, mask, use_mask, out, hp, wp, cp):
    # x: (N, C, H, W) ; mask: same shape (a ReLU output), x kept only where mask > 0
    # out: flat (N, hp, wp, cp), zero on entry: out[n, r + 1, c + 1, ch] = x[n, ch, r, c]
    n, ch_n, h, w = x.shape
    for task in prange(n * h):
        img = task // h
        r = task - img * h
        row = ((img * hp + r + 1) * wp + 1) * cp
        for ch in range(ch_n):
            src = x[img, ch, r]
            if use_mask:
                keep = mask[img, ch, r]
                for c in range(w):
                    out[row + c * cp + ch] = src[c] if keep[c] > 0.0 else np.float32(0.0)
            else:
                for c in range(w):
                    out[row + c * cp + ch] = src[c]


@njit(cache=True)
def _input_tiles(xc, hp, wp, cp, th_n, tw_n, t0, t1, v, ldv, pstride, tmp):
    # xc: flat (N, hp, wp, cp) zero-bordered channels-last input
    # v: flat (POINTS, pstride): v[p, (t - t0)*ldv + c] = (Bᵀ d B)[p] of tile t's 4x4 window
    for t in range(t0, t1):
        img = t // (th_n * tw_n)
        r = t - img * (th_n * tw_n)
        th = r // tw_n
        tw = r - th * tw_n
        base = ((img * hp + th * M) * wp + tw * M) * cp
        row = (t - t0) * ldv
        for c in range(0, cp, LANES):
            for j in range(ALPHA):      # down column j: tmp[i, j] = (Bᵀ d)[i, j]
                _bt(xc, base + j * cp + c, wp * cp, tmp, j * LANES, ALPHA * LANES)
            for i in range(ALPHA):      # along row i: v[i*ALPHA + j] = (tmp B)[i, j]
                _bt(tmp, i * ALPHA * LANES, LANES, v, i * ALPHA * pstride + row + c, pstride)


@njit(cache=True)
def _output_tiles(mt, ldm, pstride, th_n, tw_n, t0, t1, y, b, has_bias, relu, tmp, out):
    # mt: flat (POINTS, pstride): mt[p, (t - t0)*ldm + co], the products summed over Cin
    # y: (N, Cout, H, W), written where inside: y[n, co, 2th + i, 2tw + j] = (Aᵀ M A)[i, j] + b[co]
    # (rectified when relu)
    _, cout, h, w = y.shape
    yf = y.reshape(-1)
    for t in range(t0, t1):
        img = t // (th_n * tw_n)
        r = t - img * (th_n * tw_n)
        th = r // tw_n
        tw = r - th * tw_n
        rows = min(M, h - th * M)
        cols = min(M, w - tw * M)
        row = (t - t0) * ldm
        for c in range(0, cout, LANES):
            for j in range(ALPHA):      # down column j: tmp[i, j] = (Aᵀ M)[i, j]
                _at(mt, j * pstride + row + c, ALPHA * pstride, tmp, j * LANES, ALPHA * LANES)
            for i in range(M):          # along row i: out[i, j] = (tmp A)[i, j]
                _at(tmp, i * ALPHA * LANES, LANES, out, i * M * LANES, LANES)
            for lane in range(min(LANES, cout - c)):
                co = c + lane
                bv = b[co] if has_bias else np.float32(0.0)
                for i in range(rows):
                    dst = ((img * cout + co) * h + th * M + i) * w + tw * M
                    for j in range(cols):
                        v = out[(i * M + j) * LANES + lane] + bv
                        if relu and v <= 0.0:   # as relu_forward: a NaN passes through
                            v = np.float32(0.0)
                        yf[dst + j] = v


@njit(parallel=True, cache=True)
def _winograd(xc, hp, wp, cp, n, th_n, tw_n, u, ldu, cop, y, b, has_bias, relu, nthreads, counter):
    # xc: flat (N, hp, wp, cp) ; u: flat (POINTS, cp, ldu) ; y: (N, Cout, H, W) ; counter: (1,) zero
    ntile = n * th_n * tw_n
    nblocks = (ntile + TILE_BLOCK - 1) // TILE_BLOCK
    ldv = _ld(cp)
    vst = TILE_BLOCK * ldv
    mst = TILE_BLOCK * cop
    upoint = cp * ldu
    for _ in prange(nthreads):
        v = aligned_f32(POINTS * vst)
        mt = aligned_f32(POINTS * mst)
        tin = np.empty(POINTS * LANES, dtype=np.float32)
        tout = np.empty(M * ALPHA * LANES, dtype=np.float32)
        out = np.empty(M * M * LANES, dtype=np.float32)
        while True:
            blk = take(counter)
            if blk >= nblocks:
                break
            t0 = blk * TILE_BLOCK
            t1 = min(ntile, t0 + TILE_BLOCK)
            _input_tiles(xc, hp, wp, cp, th_n, tw_n, t0, t1, v, ldv, vst, tin)
            for p in range(POINTS):     # (tiles x Cin) @ (Cin x Cout), U read in place
                gemm32_slab(v[p * vst:(p + 1) * vst], ldv, False, u[p * upoint:(p + 1) * upoint], ldu, False,
                            mt[p * mst:(p + 1) * mst], cop, 0, t1 - t0, 0, cop, cp, False, True, _NONE, 0)
            _output_tiles(mt, cop, mst, th_n, tw_n, t0, t1, y, b, has_bias, relu, tout, out)


def _conv(x, mask, u, cout, b, relu, nthreads):
    # x (N, C, H, W) -> (N, cout, H, W) through U (POINTS, C padded, ld); x masked by `mask` > 0
    n, c, h, w = x.shape
    y = np.empty((n, cout, h, w), dtype=np.float32)
    th_n, tw_n = (h + M - 1) // M, (w + M - 1) // M
    cp = _pad16(c)
    hp, wp = th_n * M + 2, tw_n * M + 2
    xc = np.zeros(n * hp * wp * cp, dtype=np.float32)
    _to_channels_last(x, x if mask is None else mask, mask is not None, xc, hp, wp, cp)
    bias = np.zeros(1, dtype=np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    _winograd(xc, hp, wp, cp, n, th_n, tw_n, u.reshape(-1), u.shape[2], _pad16(cout), y, bias, b is not None,
              relu, nthreads, np.zeros(1, dtype=np.int64))
    return y


def forward(x, w, b, g, relu, nthreads):
    """The package's forward (x: (N, Cin, H, W) float32, g: layout.Geometry), by F(2x2, 3x3)."""
    return _conv(x, None, transform_weights(w), g.cout, b, relu, nthreads)


def input_grad(dy, w, g, relu_out, nthreads):
    """dx (N, Cin, H, W) of the forward: dy (masked where relu_out <= 0 when given) convolved with
    the flipped weights, by F(2x2, 3x3)."""
    mask = None if relu_out is None else np.ascontiguousarray(relu_out)
    return _conv(dy, mask, transform_weights(w, flipped=True), g.cin, None, False, nthreads)


# ---------------------------------------------------------------------------------------------
# NumPy twin: the same algorithm written plainly with einsum, in the input's dtype, for any
# F(m x m, 3x3) whose matrices are given (the error measurements compare tiles with it).

def winograd_forward_ref(x, w, b, bt=BT, g=G, at=AT, relu=False):
    """conv2d(x, w, b, stride 1, padding 1) as Aᵀ[(G w Gᵀ) ⊙ (Bᵀ d B)]A over m x m tiles."""
    n, c, h, wd = x.shape
    m = at.shape[0]
    bt, g, at = (a.astype(x.dtype) for a in (bt, g, at))
    th_n, tw_n = (h + m - 1) // m, (wd + m - 1) // m
    xp = np.zeros((n, c, th_n * m + 2, tw_n * m + 2), dtype=x.dtype)
    xp[:, :, 1:1 + h, 1:1 + wd] = x
    win = np.lib.stride_tricks.sliding_window_view(xp, (m + 2, m + 2), axis=(2, 3))[:, :, ::m, ::m]
    u = np.einsum("ik,ockl,jl->ijoc", g, w, g)                                  # (a, a, Cout, Cin)
    v = np.einsum("ik,ncstkl,jl->ijncst", bt, win[:, :, :th_n, :tw_n], bt)     # (a, a, N, Cin, th, tw)
    prod = np.einsum("ijoc,ijncst->ijnost", u, v)                                # (a, a, N, Cout, th, tw)
    y = np.einsum("ai,ijnost,bj->nosatb", at, prod, at)                         # (N, Cout, th, m, tw, m)
    y = y.reshape(n, w.shape[0], th_n * m, tw_n * m)[:, :, :h, :wd]
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return np.where(y <= 0, 0, y).astype(x.dtype) if relu else y
