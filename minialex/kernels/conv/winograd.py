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
from minialex.kernels.simd import vadd, vfma, vload, vmul, vsplat, vstore, vsub, vtranspose_8x16

LANES = 16
M = 2            # output tile
ALPHA = M + 2    # input tile of F(2x2, 3x3)
POINTS = ALPHA * ALPHA
TILE_BLOCK = 32  # tiles a thread carries through one pass: transforms and products stay in L2
_NONE = np.empty(0, dtype=np.float32)  # gemm32_slab's "A not pre-packed"

# The transform matrices (Lavin & Gray, 2016; interpolation points 0, 1, -1, inf). The Numba
# kernels spell them out term by term; the NumPy twins use them as written.
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)
# F(2x2, 5x5): Toom-Cook on the points 0, 1, -1, 2, -2, inf (6x6 input tiles, 36 points); the
# kernels apply these matrices as written (_mat)
BT5 = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64)
G5 = np.array([[1 / 4, 0, 0, 0, 0], [-1 / 6, -1 / 6, -1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6, 1 / 3, 2 / 3], [1 / 24, -1 / 12, 1 / 6, -1 / 3, 2 / 3], [0, 0, 0, 0, 1]],
              dtype=np.float64)
AT5 = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 1]], dtype=np.float64)
MATRICES = {3: (BT, G, AT), 5: (BT5, G5, AT5)}   # kernel size -> (Bᵀ, G, Aᵀ)
_MATRICES32 = {r: tuple(np.ascontiguousarray(a, dtype=np.float32) for a in m) for r, m in MATRICES.items()}


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
def _bt5(src, so, ss, dst, do, ds):
    # Bᵀ d of F(2x2, 5x5): 6 vectors -> 6 vectors
    d0 = vload(src, so); d1 = vload(src, so + ss); d2 = vload(src, so + 2 * ss)
    d3 = vload(src, so + 3 * ss); d4 = vload(src, so + 4 * ss); d5 = vload(src, so + 5 * ss)
    m4, m5, two = vsplat(np.float32(-4.0)), vsplat(np.float32(-5.0)), vsplat(np.float32(2.0))
    vstore(dst, do, vfma(m5, d2, vfma(vsplat(np.float32(4.0)), d0, d4)))     # 4d0 - 5d2 + d4
    t0 = vfma(m4, d2, d4)                                                     # d4 - 4d2
    t1 = vfma(m4, d1, d3)                                                     # d3 - 4d1
    vstore(dst, do + ds, vadd(t0, t1))
    vstore(dst, do + 2 * ds, vsub(t0, t1))
    t2 = vsub(d4, d2)
    t3 = vmul(two, vsub(d3, d1))
    vstore(dst, do + 3 * ds, vadd(t2, t3))
    vstore(dst, do + 4 * ds, vsub(t2, t3))
    vstore(dst, do + 5 * ds, vfma(m5, d3, vfma(vsplat(np.float32(4.0)), d1, d5)))  # 4d1 - 5d3 + d5


@njit(inline="always", cache=True)
def _at5(src, so, ss, dst, do, ds):
    # Aᵀ m of F(2x2, 5x5): 6 vectors -> 2 vectors
    d1 = vload(src, so + ss); d2 = vload(src, so + 2 * ss); d3 = vload(src, so + 3 * ss); d4 = vload(src, so + 4 * ss)
    s12, s34 = vadd(d1, d2), vadd(d3, d4)
    vstore(dst, do, vadd(vadd(vload(src, so), s12), s34))
    two = vsplat(np.float32(2.0))
    vstore(dst, do + ds, vadd(vfma(two, vsub(d3, d4), vsub(d1, d2)), vload(src, so + 5 * ss)))


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
def _mat(a, src, so, ss, dst, do, ds):
    # a (rows, cols) float32: the i-th output vector = sum over k of a[i, k] * the k-th input
    # (zero entries skipped, so a NaN reaches only the outputs whose entries touch it)
    for i in range(a.shape[0]):
        acc = vsplat(np.float32(0.0))
        for k in range(a.shape[1]):
            if a[i, k] != 0.0:
                acc = vfma(vsplat(a[i, k]), vload(src, so + k * ss), acc)
        vstore(dst, do + i * ds, acc)


# ---------------------------------------------------------------------------------------------
# Weights: U[p, ci, co] = (G w[co, ci] Gᵀ)[p]

@njit(parallel=True, cache=True)
def _taps_last(w, out, ldo):
    # w: (Cout, Cin, r, r) ; out: flat (Cin, r*r, ldo): out[(ci*r*r + t)*ldo + co] = w[co, ci, t]
    # 8 x 16 blocks by register transposes, the ragged edges one element at a time
    na, rows = w.shape[0], w.shape[1] * w.shape[2] * w.shape[3]
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
    # w: (Cout, Cin, r, r) ; out: flat (Cout, r*r, ldo): out[(co*r*r + t)*ldo + ci] = w[co, ci, r*r-1 - t]
    cout, cin, taps = w.shape[0], w.shape[1], w.shape[2] * w.shape[3]
    wf = w.reshape(-1)
    for co in prange(cout):
        for ci in range(cin):
            for t in range(taps):
                out[(co * taps + t) * ldo + ci] = wf[(co * cin + ci) * taps + taps - 1 - t]


@njit(parallel=True, cache=True)
def _weight_transform(wt, rows, ldw, u, ldu, g):
    # wt: flat (rows, r*r, ldw) taps-last weights ; g: G (alpha, r) ;
    # u: flat (alpha², rows padded, ldu): u[p, r, lane] = (G k Gᵀ)[p] of the r x r k = wt[r, :, lane]
    alpha, r = g.shape
    pstride = u.size // (alpha * alpha)
    for row in prange(rows):
        tmp = np.empty(alpha * r * LANES, dtype=np.float32)
        for c in range(0, ldw, LANES):
            for kw in range(r):         # down column kw: tmp[i, kw] = (G k)[i, kw]
                src, dst = (row * r * r + kw) * ldw + c, kw * LANES
                if r == 3:
                    _g(wt, src, r * ldw, tmp, dst, r * LANES)
                else:
                    _mat(g, wt, src, r * ldw, tmp, dst, r * LANES)
            for i in range(alpha):      # along row i: u[i*alpha + j] = (tmp Gᵀ)[i, j]
                dst = i * alpha * pstride + row * ldu + c
                if r == 3:
                    _g(tmp, i * r * LANES, LANES, u, dst, pstride)
                else:
                    _mat(g, tmp, i * r * LANES, LANES, u, dst, pstride)


def transform_weights(w, flipped=False):
    """w (Cout, Cin, r, r) float32, r 3 or 5 -> U ((r+1)², Cin padded to 16, row stride) float32
    with U[p, ci, co] = (G w[co, ci] Gᵀ)[p]; flipped: the same for the weights of the input
    gradient, w[:, :, ::-1, ::-1] with the channel axes swapped, i.e. U[p, co, ci]."""
    w = np.ascontiguousarray(w)
    r = w.shape[2]
    g = _MATRICES32[r][1]
    rows, lanes = (w.shape[0], w.shape[1]) if flipped else (w.shape[1], w.shape[0])
    ldw, ldu = _pad16(lanes), _ld(_pad16(lanes))
    u = np.zeros((g.shape[0] ** 2, _pad16(rows), ldu), dtype=np.float32)
    if rows and lanes:
        wt = np.zeros(rows * r * r * ldw, dtype=np.float32)
        (_taps_last_flipped if flipped else _taps_last)(w, wt, ldw)
        _weight_transform(wt, rows, ldw, u.reshape(-1), ldu, g)
    return u


# ---------------------------------------------------------------------------------------------
# Tiles. T = N * th_n * tw_n, tile t = (n*th_n + th)*tw_n + tw covers outputs
# (2th .. 2th+1, 2tw .. 2tw+1).

@njit(parallel=True, cache=True)
def _to_channels_last(x, mask, use_mask, out, hp, wp, cp, pad):
    # x: (N, C, H, W) ; mask: same shape (a ReLU output), x kept only where mask > 0
    # out: flat (N, hp, wp, cp), zero on entry: out[n, r + pad, c + pad, ch] = x[n, ch, r, c]
    n, ch_n, h, w = x.shape
    for task in prange(n * h):
        img = task // h
        r = task - img * h
        row = ((img * hp + r + pad) * wp + pad) * cp
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
def _input_tiles(xc, hp, wp, cp, th_n, tw_n, t0, t1, v, ldv, pstride, bt, tmp):
    # xc: flat (N, hp, wp, cp) zero-bordered channels-last input ; bt: Bᵀ (alpha, alpha)
    # v: flat (alpha², pstride): v[p, (t - t0)*ldv + c] = (Bᵀ d B)[p] of tile t's alpha x alpha window
    alpha = bt.shape[0]
    for t in range(t0, t1):
        img = t // (th_n * tw_n)
        r = t - img * (th_n * tw_n)
        th = r // tw_n
        tw = r - th * tw_n
        base = ((img * hp + th * M) * wp + tw * M) * cp
        row = (t - t0) * ldv
        for c in range(0, cp, LANES):
            for j in range(alpha):      # down column j: tmp[i, j] = (Bᵀ d)[i, j]
                if alpha == 4:
                    _bt(xc, base + j * cp + c, wp * cp, tmp, j * LANES, alpha * LANES)
                else:
                    _bt5(xc, base + j * cp + c, wp * cp, tmp, j * LANES, alpha * LANES)
            for i in range(alpha):      # along row i: v[i*alpha + j] = (tmp B)[i, j]
                if alpha == 4:
                    _bt(tmp, i * alpha * LANES, LANES, v, i * alpha * pstride + row + c, pstride)
                else:
                    _bt5(tmp, i * alpha * LANES, LANES, v, i * alpha * pstride + row + c, pstride)


@njit(cache=True)
def _output_tiles(mt, ldm, pstride, th_n, tw_n, t0, t1, co0, co1, y, b, has_bias, relu, at, tmp, out):
    # mt: flat (alpha², pstride): mt[p, (t - t0)*ldm + co], the products summed over Cin ; at: Aᵀ (M, alpha)
    # y: (N, Cout, H, W), written for co0 <= co < co1 (co0 a multiple of 16) where inside:
    # y[n, co, 2th + i, 2tw + j] = (Aᵀ M A)[i, j] + b[co] (rectified when relu)
    _, cout, h, w = y.shape
    alpha = at.shape[1]
    yf = y.reshape(-1)
    for t in range(t0, t1):
        img = t // (th_n * tw_n)
        r = t - img * (th_n * tw_n)
        th = r // tw_n
        tw = r - th * tw_n
        rows = min(M, h - th * M)
        cols = min(M, w - tw * M)
        row = (t - t0) * ldm
        for c in range(co0, co1, LANES):
            for j in range(alpha):      # down column j: tmp[i, j] = (Aᵀ M)[i, j]
                if alpha == 4:
                    _at(mt, j * pstride + row + c, alpha * pstride, tmp, j * LANES, alpha * LANES)
                else:
                    _at5(mt, j * pstride + row + c, alpha * pstride, tmp, j * LANES, alpha * LANES)
            for i in range(M):          # along row i: out[i, j] = (tmp A)[i, j]
                if alpha == 4:
                    _at(tmp, i * alpha * LANES, LANES, out, i * M * LANES, LANES)
                else:
                    _at5(tmp, i * alpha * LANES, LANES, out, i * M * LANES, LANES)
            for lane in range(min(LANES, co1 - c)):
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
def _winograd(xc, hp, wp, cp, n, th_n, tw_n, u, ldu, cop, y, b, has_bias, relu, bt, at, tile_block, cout_block,
              nthreads, counter):
    # xc: flat (N, hp, wp, cp) ; u: flat (alpha², cp, ldu) ; y: (N, Cout, H, W) ; counter: (1,) zero
    alpha = bt.shape[0]
    points = alpha * alpha
    cout = y.shape[1]
    ntile = n * th_n * tw_n
    nblocks = (ntile + tile_block - 1) // tile_block
    ldv = _ld(cp)
    vst = tile_block * ldv + LANES   # point strides off a multiple of 4 KiB: the transforms read
    mst = tile_block * cop + LANES   # one vector per point, and those must not share L1 sets
    upoint = cp * ldu
    for _ in prange(nthreads):
        v = aligned_f32(points * vst)
        mt = aligned_f32(points * mst)
        tin = np.empty(points * LANES, dtype=np.float32)
        tout = np.empty(M * alpha * LANES, dtype=np.float32)
        out = np.empty(M * M * LANES, dtype=np.float32)
        while True:
            blk = take(counter)
            if blk >= nblocks:
                break
            t0 = blk * tile_block
            t1 = min(ntile, t0 + tile_block)
            _input_tiles(xc, hp, wp, cp, th_n, tw_n, t0, t1, v, ldv, vst, bt, tin)
            for co0 in range(0, cop, cout_block):   # the products of a block of Cout stay in L2
                co1 = min(cop, co0 + cout_block)
                for p in range(points):     # (tiles x Cin) @ (Cin x Cout block), U read in place
                    gemm32_slab(v[p * vst:(p + 1) * vst], ldv, False, u[p * upoint:(p + 1) * upoint], ldu, False,
                                mt[p * mst:(p + 1) * mst], cop, 0, t1 - t0, co0, co1, cp, False, True, _NONE, 0)
                _output_tiles(mt, cop, mst, th_n, tw_n, t0, t1, co0, min(co1, cout), y, b, has_bias, relu, at,
                              tout, out)


def _conv(x, mask, u, r, cout, b, relu, nthreads, tile_block=TILE_BLOCK, cout_block=0):
    # x (N, C, H, W) -> (N, cout, H, W) through U (alpha², C padded, ld) of r x r weights, padding
    # (r - 1) / 2; x masked by `mask` > 0
    n, c, h, w = x.shape
    bt, _, at = _MATRICES32[r]
    y = np.empty((n, cout, h, w), dtype=np.float32)
    th_n, tw_n = (h + M - 1) // M, (w + M - 1) // M
    cp = _pad16(c)
    hp, wp = th_n * M + r - 1, tw_n * M + r - 1
    xc = np.zeros(n * hp * wp * cp, dtype=np.float32)
    _to_channels_last(x, x if mask is None else mask, mask is not None, xc, hp, wp, cp, (r - 1) // 2)
    bias = np.zeros(1, dtype=np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    _winograd(xc, hp, wp, cp, n, th_n, tw_n, u.reshape(-1), u.shape[2], _pad16(cout), y, bias, b is not None,
              relu, bt, at, tile_block, cout_block or _pad16(cout), nthreads, np.zeros(1, dtype=np.int64))
    return y


def forward(x, w, b, g, relu, nthreads):
    """The package's forward (x: (N, Cin, H, W) float32, g: layout.Geometry), by F(2x2, r x r)."""
    return _conv(x, None, transform_weights(w), g.kh, g.cout, b, relu, nthreads)


def input_grad(dy, w, g, relu_out, nthreads):
    """dx (N, Cin, H, W) of the forward: dy (masked where relu_out <= 0 when given) convolved with
    the flipped weights, by F(2x2, r x r)."""
    mask = None if relu_out is None else np.ascontiguousarray(relu_out)
    return _conv(dy, mask, transform_weights(w, flipped=True), g.kh, g.cin, None, False, nthreads)


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
