"""Paths `winograd` and `winograd4`: Winograd's minimal filtering F(m x m, 3x3), m = 2 or 4, for
float32, groups 1, 3x3, stride 1, padding 1 convolutions (AlexNet's conv3-conv5): forward, input
gradient and weight gradient.

Each m x m output tile is computed from the (m+2) x (m+2) input window d around it as

    Y = Aᵀ [ U ⊙ (Bᵀ d B) ] A,   U = G g Gᵀ       (summed over input channels)

so the sum over input channels becomes, for each of the (m+2)² transform points p, one GEMM
(tiles x Cin) @ (Cin x Cout) on the GEMM's micro-kernel: 2.25x (m = 2) or 4x (m = 4) fewer
multiplications than the direct sum. The input gradient is the same convolution of dy with the
flipped weights, their channel axes swapped. U is written once per call as the GEMM's 32-column
panels; a thread takes TILE_BLOCK tiles at a time and carries them through input transform,
the GEMMs and output transform while they are in cache. The weight gradient is the same
identity read backwards, dW = Gᵀ [ sum over tiles (A dY Aᵀ) ⊙ (Bᵀ d B) ] G: every tile of the
batch is transformed first, then each point's sum over tiles is one GEMM (Cout x T) @ (T x Cin).

Layout: channels-last, channels zero-padded to multiples of 16, so every transform works on
16-channel vectors (simd.py) loaded from contiguous memory; each 2-D transform is a 1-D kernel
applied down the columns of a tile, then along its rows.

Both tiles are within 1e-5 of the largest output and gradient in float32 (F(4x4) with the
points below); the plan takes F(4x4) where its larger transforms pay (docs/performance.md).
"""
import numpy as np
from numba import njit, prange

from minialex.kernels.conv.layout import from_nhwc, to_padded_nhwc
from minialex.kernels.gemm import KC, NR, aligned_f32, gemm32_packed, gemm32_panels
from minialex.kernels.parallel import take
from minialex.kernels.simd import (vadd, vcat_hi, vcat_lo, vfma, vload, vmul, vsplat, vstore, vstore_hi8,
                                  vstore_lo8, vsub, vtranspose_8x16, vzero)

LANES = 16
TILE_BLOCK = 32  # tiles a thread carries through one pass: transforms and products stay in L2

# The transform matrices of F(m x m, 3x3) for the two output tiles m built here. The Numba
# kernels spell them out term by term; the NumPy twins use them as written.
# m = 2: Lavin & Gray (2016), interpolation points 0, 1, -1, inf.
BT2 = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G2 = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=np.float64)
AT2 = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)
# m = 4: points 0, 1, -1, 2, -1/2, inf. Lavin & Gray's 0, +-1, +-2 err up to 2e-5 of the largest
# output on AlexNet's layers in float32; trading -2 for -1/2 (Barabasz et al., 2020) keeps F(4x4)
# within 6e-6 (docs/performance.md).
BT4 = np.array([[1, 1.5, -2, -1.5, 1, 0], [0, -1, -2.5, -.5, 1, 0], [0, 1, .5, -2.5, 1, 0],
                [0, -.5, -1, .5, 1, 0], [0, 2, -1, -2, 1, 0], [0, 1, 1.5, -2, -1.5, 1]], dtype=np.float64)
G4 = np.array([[1, 0, 0], [-1 / 3, -1 / 3, -1 / 3], [1 / 3, -1 / 3, 1 / 3], [1 / 15, 2 / 15, 4 / 15],
               [-16 / 15, 8 / 15, -4 / 15], [0, 0, 1]], dtype=np.float64)
AT4 = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -.5, 0], [0, 1, 1, 4, .25, 0],
                [0, 1, -1, 8, -.125, 1]], dtype=np.float64)
MATRICES = {2: (BT2, G2, AT2), 4: (BT4, G4, AT4)}
# the weight gradient's Gᵀ W G as one (a*a, 9) table: GG[m][i*a + j, k*3 + l] = G[i, k] G[j, l]
GG_F32 = {m: np.einsum("ik,jl->ijkl", mats[1], mats[1]).reshape((m + 2) ** 2, 9).astype(np.float32)
          for m, mats in MATRICES.items()}
BT, G, AT = BT2, G2, AT2


def _ceil(c, k):
    """Whole k's covering c: the m x m tiles of a side (and the 16- or 32-lane groups of channels)."""
    return (c + k - 1) // k


@njit(cache=True)
def _ld(c):
    """Stride (elements) for rows of c (a multiple of 16) elements, or between the transformed
    weights' points of c elements each: an odd number of 64-byte lines, so that successive rows,
    or the 16 or 36 points the weight transform writes together, do not share cache sets."""
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


@njit(inline="always", cache=True)
def _bt6(src, so, ss, dst, do, ds):
    # Bᵀ d of F(4x4): 6 vectors -> 6 vectors (rows of BT4)
    d0 = vload(src, so); d1 = vload(src, so + ss); d2 = vload(src, so + 2 * ss)
    d3 = vload(src, so + 3 * ss); d4 = vload(src, so + 4 * ss); d5 = vload(src, so + 5 * ss)
    h, one5, two, two5 = vsplat(np.float32(0.5)), vsplat(np.float32(1.5)), vsplat(np.float32(2.0)), vsplat(np.float32(2.5))
    d13 = vsub(d1, d3)
    d42 = vsub(d4, d2)
    vstore(dst, do, vfma(one5, d13, vsub(vadd(d0, d4), vmul(two, d2))))
    vstore(dst, do + ds, vsub(vsub(d4, d1), vfma(two5, d2, vmul(h, d3))))
    vstore(dst, do + 2 * ds, vsub(vfma(h, d2, vadd(d4, d1)), vmul(two5, d3)))
    vstore(dst, do + 3 * ds, vsub(d42, vmul(h, d13)))
    vstore(dst, do + 4 * ds, vfma(two, d13, d42))
    vstore(dst, do + 5 * ds, vsub(vfma(one5, vsub(d2, d4), vadd(d5, d1)), vmul(two, d3)))


@njit(inline="always", cache=True)
def _at6(src, so, ss, dst, do, ds):
    # Aᵀ m of F(4x4): 6 vectors -> 4 vectors (rows of AT4)
    m0 = vload(src, so); m1 = vload(src, so + ss); m2 = vload(src, so + 2 * ss)
    m3 = vload(src, so + 3 * ss); m4 = vload(src, so + 4 * ss); m5 = vload(src, so + 5 * ss)
    p = vadd(m1, m2)
    q = vsub(m1, m2)
    vstore(dst, do, vadd(vadd(m0, p), vadd(m3, m4)))
    vstore(dst, do + ds, vfma(vsplat(np.float32(2.0)), m3, vfma(vsplat(np.float32(-0.5)), m4, q)))
    vstore(dst, do + 2 * ds, vfma(vsplat(np.float32(4.0)), m3, vfma(vsplat(np.float32(0.25)), m4, p)))
    vstore(dst, do + 3 * ds, vfma(vsplat(np.float32(8.0)), m3, vfma(vsplat(np.float32(-0.125)), m4, vadd(q, m5))))


@njit(inline="always", cache=True)
def _g6(src, so, ss, dst, do, ds):
    # G g of F(4x4): 3 vectors -> 6 vectors (rows of G4)
    g0 = vload(src, so); g1 = vload(src, so + ss); g2 = vload(src, so + 2 * ss)
    third = vsplat(np.float32(1 / 3))
    e = vadd(g0, g2)
    vstore(dst, do, g0)
    vstore(dst, do + ds, vmul(vsplat(np.float32(-1 / 3)), vadd(e, g1)))
    vstore(dst, do + 2 * ds, vmul(third, vsub(e, g1)))
    vstore(dst, do + 3 * ds, vmul(vsplat(np.float32(1 / 15)), vfma(vsplat(np.float32(2.0)), g1,
                                                                      vfma(vsplat(np.float32(4.0)), g2, g0))))
    vstore(dst, do + 4 * ds, vmul(vsplat(np.float32(4 / 15)), vfma(vsplat(np.float32(2.0)), g1,
                                                                      vfma(vsplat(np.float32(-4.0)), g0, vsub(vsplat(np.float32(0.0)), g2)))))
    vstore(dst, do + 5 * ds, g2)


# ---------------------------------------------------------------------------------------------
# Weights: U[p, row, lane] = (G g Gᵀ)[p] of the 3x3 g of weight (lane, row): lanes are Cout and
# rows Cin for the forward; lanes Cin and rows Cout, the taps reversed, for the input gradient.

TAP_BLOCK = LANES * LANES * LANES   # 16 rows x 16 lanes of 9 taps, each row padded to 16 taps


@njit(cache=True)
def _gather_taps(w, lane0, r0, flipped, buf):
    # w: (Cout, Cin, 3, 3) -> buf: the 9 taps of the 16 x 16 weights (lane0 + l, r0 + r) as 16-lane
    # vectors, tap t of row r at buf[r*144 + t*16] (forward) or buf[r*256 + t*16] (flipped: taps of
    # w[r0 + r, lane0 + l], in w's order), zero past w's edges. Whole blocks by 8 x 16 register
    # transposes, ragged ones one element at a time.
    cout, cin = w.shape[0], w.shape[1]
    wf = w.reshape(-1)
    nl, nr = (cin, cout) if flipped else (cout, cin)
    if lane0 + LANES <= nl and r0 + LANES <= nr:
        if flipped:   # row r's 16 lanes x 9 taps are 144 consecutive floats, read as 16 rows of 9
            for r in range(LANES):
                src = ((r0 + r) * cin + lane0) * 9
                for h in range(0, LANES, 8):    # columns 9-15 of each row read the next lane's taps
                    if src + (h + 7) * 9 + LANES <= wf.size:
                        vtranspose_8x16(wf, src + h * 9, 9, buf, r * 256 + h, LANES)
                    else:
                        for l in range(h, h + 8):
                            for t in range(9):
                                buf[r * 256 + t * LANES + l] = wf[src + l * 9 + t]
        else:         # lane l's rows r0.. r0+15 are 144 consecutive floats of w[lane0 + l]
            for h in range(0, LANES, 8):
                src = (lane0 + h) * cin * 9 + r0 * 9
                for k in range(0, 144, LANES):
                    vtranspose_8x16(wf, src + k, cin * 9, buf, k * LANES + h, LANES)
        return
    rs = 256 if flipped else 144
    for r in range(LANES):
        for t in range(9):
            for l in range(LANES):
                lane, row = lane0 + l, r0 + r
                v = np.float32(0.0)
                if lane < nl and row < nr:
                    v = wf[(row * cin + lane) * 9 + t] if flipped else wf[(lane * cin + row) * 9 + t]
                buf[r * rs + t * LANES + l] = v


@njit(parallel=True, cache=True)
def _weight_transform(m, w, flipped, ldw, kp, u, pstride):
    # w: (Cout, Cin, 3, 3) ; u: flat, point p's (ldw/32, kp, 32) panels for gemm32_panels from
    # p*pstride, a = m + 2, lanes padded to ldw (in 32s), rows to kp (in 16s), both with zeros:
    # u[p*pstride + ((lane // 32)*kp + row)*32 + lane % 32]
    alpha = m + 2
    rblocks = kp // LANES
    # tap t of a row at base + t*ts: the input gradient's weights w[:, :, ::-1, ::-1] read backwards
    rs, ts, t0 = (256, -LANES, 8 * LANES) if flipped else (144, LANES, 0)
    for blk in prange(ldw // NR * rblocks):   # a unit writes whole 32-lane panel rows
        r0 = blk % rblocks * LANES
        buf = np.empty(TAP_BLOCK, dtype=np.float32)
        tmp = np.empty(alpha * 3 * LANES, dtype=np.float32)
        for c in range(blk // rblocks * NR, blk // rblocks * NR + NR, LANES):
            _gather_taps(w, c, r0, flipped, buf)
            for r in range(LANES):
                dst = ((c // NR) * kp + r0 + r) * NR + c % NR
                base = r * rs + t0
                for kw in range(3):         # down column kw: tmp[i, kw] = (G g)[i, kw]
                    if m == 4:
                        _g6(buf, base + kw * ts, 3 * ts, tmp, kw * LANES, 3 * LANES)
                    else:
                        _g(buf, base + kw * ts, 3 * ts, tmp, kw * LANES, 3 * LANES)
                for i in range(alpha):      # along row i: u[i*alpha + j] = (tmp Gᵀ)[i, j]
                    if m == 4:
                        _g6(tmp, i * 3 * LANES, LANES, u, i * alpha * pstride + dst, pstride)
                    else:
                        _g(tmp, i * 3 * LANES, LANES, u, i * alpha * pstride + dst, pstride)


def _transform(w, flipped, m):
    # -> (u flat, its point stride, lanes padded to 32s, rows padded to 16s): transform_weights'
    # panels, point p's from p * stride
    w = np.ascontiguousarray(w)
    rows, lanes = (w.shape[0], w.shape[1]) if flipped else (w.shape[1], w.shape[0])
    ldw, kp = _ceil(lanes, NR) * NR, _ceil(rows, LANES) * LANES
    ust = _ld(ldw * kp)
    u = np.empty((m + 2) ** 2 * ust, dtype=np.float32)
    if rows and lanes:
        _weight_transform(m, w, flipped, ldw, kp, u, ust)
    else:
        u[...] = 0
    return u, ust, ldw, kp


def transform_weights(w, flipped=False, m=2):
    """w (Cout, Cin, 3, 3) float32 -> U ((m+2)², Cout padded to 32 / 32, Cin padded to 16, 32)
    float32, the GEMM's B panels: U[p, co // 32, ci, co % 32] = (G w[co, ci] Gᵀ)[p]; flipped: the
    same for the weights of the input gradient, w[:, :, ::-1, ::-1] with the channel axes
    swapped (Cin and Cout trade places). A view: the points lie _ld(...) elements apart."""
    u, ust, ldw, kp = _transform(w, flipped, m)
    return u.reshape(-1, ust)[:, :ldw * kp].reshape(-1, ldw // NR, kp, NR)


# ---------------------------------------------------------------------------------------------
# Tiles. T = N * th_n * tw_n, tile t = (n*th_n + th)*tw_n + tw covers outputs
# (m*th .. m*th + m-1, m*tw .. m*tw + m-1).

@njit(inline="always", cache=True)
def _tile(t, th_n, tw_n):
    # tile t = (img*th_n + th)*tw_n + tw -> (img, th, tw)
    img = t // (th_n * tw_n)
    r = t - img * (th_n * tw_n)
    return img, r // tw_n, r % tw_n


@njit(cache=True)
def _input_tiles(m, xc, hp, wp, cp, th_n, tw_n, t0, t1, v, ldv, pan, pstride, tmp):
    # xc: flat (N, hp, wp, cp) zero-bordered channels-last input
    # v: flat (a*a, pstride), a = m + 2: v[p, (t - t0)*ldv + (c // 32)*pan + c % 32] = (Bᵀ d B)[p] of
    # tile t's a x a window: rows of channels for pan = 32, the GEMM's B panels for ldv = 32
    alpha = m + 2
    for t in range(t0, t1):
        img, th, tw = _tile(t, th_n, tw_n)
        base = ((img * hp + th * m) * wp + tw * m) * cp
        row = (t - t0) * ldv
        for c in range(0, cp, LANES):
            col = (c // NR) * pan + c % NR
            for j in range(alpha):      # down column j: tmp[i, j] = (Bᵀ d)[i, j]
                if m == 4:
                    _bt6(xc, base + j * cp + c, wp * cp, tmp, j * LANES, alpha * LANES)
                else:
                    _bt(xc, base + j * cp + c, wp * cp, tmp, j * LANES, alpha * LANES)
            for i in range(alpha):      # along row i: v[i*alpha + j] = (tmp B)[i, j]
                if m == 4:
                    _bt6(tmp, i * alpha * LANES, LANES, v, i * alpha * pstride + row + col, pstride)
                else:
                    _bt(tmp, i * alpha * LANES, LANES, v, i * alpha * pstride + row + col, pstride)


@njit(cache=True)
def _output_tiles(m, mt, ldm, pstride, th_n, tw_n, t0, t1, yc, h, w, ldy, tmp, out):
    # mt: flat (a*a, pstride), a = m + 2: mt[p, (t - t0)*ldm + co], the products summed over Cin
    # yc: flat (N, H, W, ldy) channels-last, written where inside: yc[n, m*th + i, m*tw + j, co] =
    # (Aᵀ M A)[i, j] for co < ldy (bias and ReLU come with the way back to planes)
    alpha = m + 2
    for t in range(t0, t1):
        img, th, tw = _tile(t, th_n, tw_n)
        rows = min(m, h - th * m)
        cols = min(m, w - tw * m)
        row = (t - t0) * ldm
        for c in range(0, ldy, LANES):
            for j in range(alpha):      # down column j: tmp[i, j] = (Aᵀ M)[i, j]
                if m == 4:
                    _at6(mt, j * pstride + row + c, alpha * pstride, tmp, j * LANES, alpha * LANES)
                else:
                    _at(mt, j * pstride + row + c, alpha * pstride, tmp, j * LANES, alpha * LANES)
            for i in range(m):          # along row i: out[i, j] = (tmp A)[i, j]
                if m == 4:
                    _at6(tmp, i * alpha * LANES, LANES, out, i * m * LANES, LANES)
                else:
                    _at(tmp, i * alpha * LANES, LANES, out, i * m * LANES, LANES)
            for i in range(rows):
                dst = ((img * h + th * m + i) * w + tw * m) * ldy + c
                for j in range(cols):
                    vstore(yc, dst + j * ldy, vload(out, (i * m + j) * LANES))


@njit(parallel=True, cache=True)
def _winograd(m, tb, xc, hp, wp, cp, n, th_n, tw_n, u, ust, cop, yc, h, w, ldy, nthreads, counter):
    # xc: flat (N, hp, wp, cp) ; u: flat, point p's (cop/32, cp, 32) B panels from p*ust ;
    # yc: flat (N, H, W, ldy) channels-last output, ldy <= cop in 16s ; tb: tiles per block, in 8s ;
    # counter: (1,) zero
    alpha = m + 2
    points = alpha * alpha
    ntile = n * th_n * tw_n
    nblocks = (ntile + tb - 1) // tb
    ldv = _ld(cp)
    vst = tb * ldv
    mst = tb * cop
    upoint = cp * cop
    for _ in prange(nthreads):
        v = aligned_f32(points * vst)
        mt = aligned_f32(points * mst)
        abuf = aligned_f32(tb * min(cp, KC))
        tin = np.empty(points * LANES, dtype=np.float32)
        tout = np.empty(m * alpha * LANES, dtype=np.float32)
        out = np.empty(m * m * LANES, dtype=np.float32)
        while True:
            blk = take(counter)
            if blk >= nblocks:
                break
            t0 = blk * tb
            t1 = min(ntile, t0 + tb)
            _input_tiles(m, xc, hp, wp, cp, th_n, tw_n, t0, t1, v, ldv, NR, vst, tin)
            for p in range(points):     # (tiles x Cin) @ (Cin x Cout) on U's panels
                gemm32_panels(v[p * vst:], ldv, False, t1 - t0, cp, u[p * ust:p * ust + upoint], cop,
                              mt[p * mst:], cop, abuf)
            _output_tiles(m, mt, cop, mst, th_n, tw_n, t0, t1, yc, h, w, ldy, tout, out)


def _channels_last(x, mask, m, lanes=LANES):
    # x (N, C, H, W) -> (flat (N, hp, wp, C padded to `lanes`) copy with a zero border of 1 and zero
    # up to whole m x m tiles, hp, wp, padded C); x zeroed where mask <= 0 when mask is given
    n, c, h, w = x.shape
    hp, wp = _ceil(h, m) * m + 2, _ceil(w, m) * m + 2
    cp = _ceil(c, lanes) * lanes
    xc = np.empty((n, hp, wp, cp), dtype=np.float32)
    to_padded_nhwc(x, x if mask is None else mask, mask is not None, 1, 1, xc)
    return xc.reshape(-1), hp, wp, cp


def _conv(m, xc, hp, wp, cp, n, h, w, transformed, cout, b, relu, nthreads):
    # xc from _channels_last -> (N, cout, H, W) through _transform's U (cout padded to 32s, cp
    # rows): the tiles write channels-last with vector stores, one transpose (+ bias, ReLU)
    # makes the planes
    u, ust, ldw, _ = transformed
    ldy = _ceil(cout, LANES) * LANES
    yc = aligned_f32(n * h * w * ldy)
    _winograd(m, TILE_BLOCK, xc, hp, wp, cp, n, _ceil(h, m), _ceil(w, m), u, ust, ldw, yc, h, w, ldy,
              nthreads, np.zeros(1, dtype=np.int64))
    y = np.empty((n, cout, h, w), dtype=np.float32)
    from_nhwc(yc, ldy, b, relu, y.reshape(n, cout, h * w))
    return y


def forward(x, w, b, g, relu, nthreads, m=2):
    """The package's forward (x: (N, Cin, H, W) float32, g: layout.Geometry), by F(m x m, 3x3)."""
    xc, hp, wp, cp = _channels_last(x, None, m)
    return _conv(m, xc, hp, wp, cp, g.n, g.h, g.w, _transform(w, False, m), g.cout, b, relu, nthreads)


def backward(dy, x, w, dw, db, g, accumulate, need_dx, relu_out, nthreads, m=2):
    """The package's backward by F(m x m, 3x3): dW (+)= into dw (float32, C-contiguous), db (+)=
    into db (or None); returns dx (dy, masked where relu_out <= 0 when given, convolved with the
    flipped weights) or None when not need_dx. One channels-last copy of dy serves both."""
    dc, hp, wp, cop = _channels_last(dy, None if relu_out is None else np.ascontiguousarray(relu_out), m)
    _weight_grad(m, dc, cop, hp, wp, x, dw, db, g, accumulate)
    if not need_dx:
        return None
    return _conv(m, dc, hp, wp, cop, g.n, g.h, g.w, _transform(w, True, m), g.cin, None, False,
                 nthreads)


# ---------------------------------------------------------------------------------------------
# Weight gradient: dW[co, ci] = Gᵀ [ sum over tiles (A dY Aᵀ) ⊙ (Bᵀ d B) ] G, the sum over all
# tiles of the batch being, per transform point, one GEMM (Cout x T) @ (T x Cin).

@njit(inline="always", cache=True)
def _a2(src, so, ss, dst, do, ds):
    # A dy of F(2x2): 2 vectors -> 4 vectors (columns of AT2)
    d0 = vload(src, so); d1 = vload(src, so + ss)
    vstore(dst, do, d0)
    vstore(dst, do + ds, vadd(d0, d1))
    vstore(dst, do + 2 * ds, vsub(d0, d1))
    vstore(dst, do + 3 * ds, vsub(vzero(), d1))


@njit(inline="always", cache=True)
def _a4(src, so, ss, dst, do, ds):
    # A dy of F(4x4): 4 vectors -> 6 vectors (columns of AT4)
    d0 = vload(src, so); d1 = vload(src, so + ss); d2 = vload(src, so + 2 * ss); d3 = vload(src, so + 3 * ss)
    e = vadd(d0, d2)
    o = vadd(d1, d3)
    vstore(dst, do, d0)
    vstore(dst, do + ds, vadd(e, o))
    vstore(dst, do + 2 * ds, vsub(e, o))
    vstore(dst, do + 3 * ds, vfma(vsplat(np.float32(8.0)), d3, vfma(vsplat(np.float32(4.0)), d2,
                                                                    vfma(vsplat(np.float32(2.0)), d1, d0))))
    vstore(dst, do + 4 * ds, vfma(vsplat(np.float32(-0.125)), d3, vfma(vsplat(np.float32(0.25)), d2,
                                                                       vfma(vsplat(np.float32(-0.5)), d1, d0))))
    vstore(dst, do + 5 * ds, d3)


@njit(cache=True)
def _grad_out_tiles(m, dc, hp, wp, cop, th_n, tw_n, t0, t1, yh, ntile, tmp, pts):
    # dc: flat (N, hp, wp, cop) zero-bordered channels-last dy (border 1, as _channels_last)
    # yh: flat (a*a, cop/8, T, 8), a = m + 2, T = ntile: yh[p, co // 8, t, co % 8] = (A dY Aᵀ)[p] of
    # tile t's m x m dY: per point the GEMM's packed A (8-row panels of Cout along the tiles), so
    # the weight gradient's GEMM packs nothing; two tiles' 8-lane halves make one 64-byte line
    alpha = m + 2
    pstride = cop * ntile
    for c in range(0, cop, LANES):      # channels outer: each panel is written tile after tile
        for t in range(t0, t1):
            img, th, tw = _tile(t, th_n, tw_n)
            base = ((img * hp + th * m + 1) * wp + tw * m + 1) * cop + c
            for j in range(m):          # down column j: tmp[i, j] = (A dY)[i, j]
                if m == 4:
                    _a4(dc, base + j * cop, wp * cop, tmp, j * LANES, m * LANES)
                else:
                    _a2(dc, base + j * cop, wp * cop, tmp, j * LANES, m * LANES)
            odd = (t - t0) % 2        # along row i: pts[odd, i*alpha + j] = (tmp Aᵀ)[i, j]
            for i in range(alpha):
                if m == 4:
                    _a4(tmp, i * m * LANES, LANES, pts, (odd * alpha * alpha + i * alpha) * LANES, LANES)
                else:
                    _a2(tmp, i * m * LANES, LANES, pts, (odd * alpha * alpha + i * alpha) * LANES, LANES)
            lo = (c // 8 * ntile + t) * 8
            if odd:                     # tiles t-1, t fill whole 64-byte lines of both panels
                for p in range(alpha * alpha):
                    a = vload(pts, p * LANES)
                    b = vload(pts, (alpha * alpha + p) * LANES)
                    vstore(yh, p * pstride + lo - 8, vcat_lo(a, b))
                    vstore(yh, p * pstride + lo - 8 + ntile * 8, vcat_hi(a, b))
            elif t + 1 == t1:           # an unpaired last tile: half lines
                for p in range(alpha * alpha):
                    v = vload(pts, p * LANES)
                    vstore_lo8(yh, p * pstride + lo, v)
                    vstore_hi8(yh, p * pstride + lo + ntile * 8, v)


@njit(parallel=True, cache=True)
def _grad_tiles(m, xc, cp, dc, cop, hp, wp, n, th_n, tw_n, xh, yh):
    # every tile of the batch: xh: flat (a*a, cp/32, T, 32) = Bᵀ d B as the GEMM's B panels (cp in
    # 32s) ; yh: flat (a*a, cop/8, T, 8) = A dY Aᵀ as its packed A
    alpha = m + 2
    ntile = n * th_n * tw_n
    nblocks = (ntile + TILE_BLOCK - 1) // TILE_BLOCK
    for blk in prange(nblocks):
        t0 = blk * TILE_BLOCK
        t1 = min(ntile, t0 + TILE_BLOCK)
        tin = np.empty(alpha * alpha * LANES, dtype=np.float32)
        pts = np.empty(2 * alpha * alpha * LANES, dtype=np.float32)
        _input_tiles(m, xc, hp, wp, cp, th_n, tw_n, t0, t1, xh[t0 * NR:], NR, ntile * NR, ntile * cp, tin)
        _grad_out_tiles(m, dc, hp, wp, cop, th_n, tw_n, t0, t1, yh, ntile, tin, pts)


@njit(parallel=True, cache=True)
def _grad_products(alpha, ntile, xh, cp, yh, cop, wh, ldw):
    # wh: flat (a*a, cop, ldw): wh[p, co, ci] = sum over tiles t of yh[p, co, t] * xh[p, t, ci]
    for p in prange(alpha * alpha):
        gemm32_packed(yh[p * cop * ntile:(p + 1) * cop * ntile], cop, ntile, xh[p * ntile * cp:(p + 1) * ntile * cp],
                      cp, wh[p * cop * ldw:], ldw)


@njit(parallel=True, cache=True)
def _panel_sums(yp, ntile, db, accumulate):
    # db[co] (+)= sum over t of yp[co // 8, t, co % 8] (yp: flat (cop/8, T, 8)), summed in float64
    # in tile order, one task per panel
    cout = db.size
    for q in prange((cout + 7) // 8):
        acc = np.zeros(8, dtype=np.float64)
        for t in range(ntile):
            for r in range(8):
                acc[r] += yp[(q * ntile + t) * 8 + r]
        for r in range(min(8, cout - q * 8)):
            if accumulate:
                db[q * 8 + r] += acc[r]
            else:
                db[q * 8 + r] = acc[r]


@njit(parallel=True, cache=True)
def _grad_weights(wh, cop, ldw, gg, dw, accumulate):
    # dw: (Cout, Cin, 3, 3) (+)= sum over points p of gg[p, q] * wh[p, co, ci] for the 9 taps q
    # (gg: (a*a, 9) float32, (G ⊗ G)ᵀ: Gᵀ W G written out point by point). Each point's row of
    # wh is one vector load; the 9 taps leave through a register transpose as 144 contiguous floats
    cout, cin = dw.shape[0], dw.shape[1]
    dwf = dw.reshape(-1)
    pstride = cop * ldw
    for co in prange(cout):
        taps = np.empty(9 * LANES, dtype=np.float32)      # [tap][lane]
        rows = np.empty(9 * LANES, dtype=np.float32)      # [lane][tap]: dw[co, c + lane, tap]
        for c in range(0, cin, LANES):
            a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero(); a4 = vzero()
            a5 = vzero(); a6 = vzero(); a7 = vzero(); a8 = vzero()
            for p in range(gg.shape[0]):
                v = vload(wh, p * pstride + co * ldw + c)
                a0 = vfma(vsplat(gg[p, 0]), v, a0); a1 = vfma(vsplat(gg[p, 1]), v, a1)
                a2 = vfma(vsplat(gg[p, 2]), v, a2); a3 = vfma(vsplat(gg[p, 3]), v, a3)
                a4 = vfma(vsplat(gg[p, 4]), v, a4); a5 = vfma(vsplat(gg[p, 5]), v, a5)
                a6 = vfma(vsplat(gg[p, 6]), v, a6); a7 = vfma(vsplat(gg[p, 7]), v, a7)
                a8 = vfma(vsplat(gg[p, 8]), v, a8)
            vstore(taps, 0, a0); vstore(taps, LANES, a1); vstore(taps, 2 * LANES, a2)
            vstore(taps, 3 * LANES, a3); vstore(taps, 4 * LANES, a4); vstore(taps, 5 * LANES, a5)
            vstore(taps, 6 * LANES, a6); vstore(taps, 7 * LANES, a7); vstore(taps, 8 * LANES, a8)
            base = (co * cin + c) * 9
            if c + LANES <= cin:
                vtranspose_8x16(taps, 0, LANES, rows, 0, 9)     # taps 0-7; tap 8 below
                for lane in range(LANES):
                    rows[lane * 9 + 8] = taps[8 * LANES + lane]
                for q in range(0, 9 * LANES, LANES):
                    if accumulate:
                        vstore(dwf, base + q, vadd(vload(dwf, base + q), vload(rows, q)))
                    else:
                        vstore(dwf, base + q, vload(rows, q))
            else:
                for lane in range(cin - c):
                    for q in range(9):
                        if accumulate:
                            dwf[base + lane * 9 + q] += taps[q * LANES + lane]
                        else:
                            dwf[base + lane * 9 + q] = taps[q * LANES + lane]


def _weight_grad(m, dc, cop, hp, wp, x, dw, db, g, accumulate):
    # dc: flat (N, hp, wp, cop) masked dy from _channels_last ; dw (+)= Gᵀ [sum (A dY Aᵀ) ⊙ (Bᵀ d B)] G
    n = g.n
    th_n, tw_n = _ceil(g.h, m), _ceil(g.w, m)
    xc, _, _, cp = _channels_last(x, None, m, NR)
    ntile = n * th_n * tw_n
    alpha = m + 2
    ldw = _ld(cp)
    xh = aligned_f32(alpha * alpha * ntile * cp)
    yh = aligned_f32(alpha * alpha * cop * ntile)
    _grad_tiles(m, xc, cp, dc, cop, hp, wp, n, th_n, tw_n, xh, yh)
    wh = aligned_f32(alpha * alpha * cop * ldw)
    _grad_products(alpha, ntile, xh, cp, yh, cop, wh, ldw)
    _grad_weights(wh, cop, ldw, GG_F32[m], dw, accumulate)
    if db is not None:   # point (1, 1) of A dY Aᵀ is the sum of the tile (row 1 of A is all ones)
        p11 = alpha + 1
        _panel_sums(yh[p11 * cop * ntile:(p11 + 1) * cop * ntile], ntile, db, accumulate)


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
