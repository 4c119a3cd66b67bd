"""float32 stride-1 convolution computed directly on padded copies of its inputs, no im2col.

For a stride-1 convolution the columns im2col would build are rows of the input itself: in a
zero-padded channels-last copy xp (N, Hp, Wp, Cin), output pixel (n, oh, ow) and tap (i, j)
read the Cin contiguous values at xp[n, oh + i, ow + j, :]. So the GEMM

    out[p, co] = sum over taps t, channels ci of xp[base(p) + off(t) + ci] * w[co, ci, t]

runs with its "A" operand read in place: the 8x32 micro-kernel below broadcasts one input
value for each of 8 output pixels (any 8, even across rows and images) and multiplies it into
two 16-lane vectors of 32 output channels' weights, packed once per call as
[channel panel of 32][tap][Cin][32]. Nothing is unfolded, nothing is packed per block, and the
accumulators stay in registers for the whole reduction (K = taps x Cin), so the C tile is
written once. On AlexNet's conv2-conv5 at batch 8 the kernel runs at 111-113 GFLOP/s on one
core and 206-227 on two (90-97% of the FMA peak) where im2col + GEMM reached 150-170.

Backward, with dy masked by the ReLU when the layer was fused with one:
- input gradient: the same kernel on dy padded by k - 1 - padding, with the weights flipped
  and their channel axes swapped (so the panels are input channels);
- weight gradient: the same micro-kernel shape with the pixels as the reduction: 8 input
  channels broadcast along rows of a padded NCHW copy of x, against dy packed
  [output-channel panel][pixel][32]; each panel has one writer, so the result does not depend
  on the thread count;
- bias gradient: column sums of the channels-last dy (linear.column_sums).

The weight gradient takes any stride: x is copied zero-padded with its columns split by phase
(column m*s + ph at [ph][m]), so a stride-s window's tap j walks xq[j % s][ow + j // s], one
element per output pixel as at stride 1, and each block of 8 weight rows is given by a table of
offsets (8 channels at one tap for conv2-conv5, 8 consecutive (c, i, j) for conv1's 3
channels). A first layer, whose input gradient nobody needs, gets its weight and bias
gradients here (weight_grad) with dy packed straight from NCHW: conv1 backward at batch 8
8.4 -> 7.2 ms, at batch 64 67 -> 60 ms (im2col + GEMM before).

Strided forward (conv1, forward_split): the same phase-split copy serves the forward. A tile of
8 consecutive output pixels of one image reads, for each weight column (c, i, j), 8 adjacent
elements xq[c, oh*s + i, j % s, ow + j // s ...], so the micro-kernel runs unchanged on a
table of column offsets, and its 8 x 32 tile, bias added and rectified, is transposed in
registers into the NCHW output: no column matrix and no channels-last copies. conv1 forward
at batch 8: 7.4 -> 6.3 ms (im2col + GEMM before; the NHWC direct kernel took 9.3). conv2's
forward takes it too (SPLIT_MIN_PLANE).

conv.py sends here float32 convolutions with groups 1 and output channels in multiples of 32:
AlexNet's conv2-conv5 (stride 1, input channels in 32s for the backward) and conv1. NCHW
arrays come in and go out; each channels-last copy costs one pass, which also adds the bias
and rectifies (forward) or applies the ReLU mask (backward).
"""
import functools

import numpy as np
from numba import njit, prange

from minialex.kernels.conv_blocked import _mask_copy_sum, _take
from minialex.kernels.gemm import store_tile_8x32
from minialex.kernels.linear import column_sums
from minialex.kernels.simd import vadd, vbroadcast, vfma, vload, vrelu, vstore, vtranspose_8x16, vzero

PANEL = 32        # output channels per micro-tile (two 16-lane vectors)
PIXELS = 8        # output pixels per micro-tile
DW_PIXEL_BLOCK = 1024  # pixels per step of the weight gradient (packed dy: 128 KB, in L2; 512 was
# 1-7% slower on conv1-conv5 at batch 8 and 64, 192 (dy in L1) 2-6% slower still)
CHUNK_TILES = 8  # micro-tiles of pixels a thread takes at once (it loops over every panel)
PACK_RUN = 4096  # pixels per step of _pack_dy_nchw: a whole conv1 plane, 32 channels in a 512 KB
# scratch (two read streams at a time; 128-pixel runs, 64 streams, took twice as long at batch 64)
# Stride-1 forwards with at least this many output pixels per image take forward_split (NCHW
# tiles) instead of forward (channels-last): conv2's 729 ran 1.03-1.07x faster that way at
# batch 1, 8 and 64, conv3-conv5's 169 0.91-0.97x (their last tile of 8 is mostly empty, and
# the NHWC path's tiles run across images).
SPLIT_MIN_PLANE = 400


def supported(x, w, stride, groups, padding):
    """Whether conv.py sends this forward here: float32, stride 1, groups 1, Cout a multiple of
    32, padding below the kernel size. (forward() itself takes any stride.)"""
    kh, kw = w.shape[2], w.shape[3]
    return (x.dtype == np.float32 and w.dtype == np.float32 and tuple(stride) == (1, 1) and groups == 1
            and w.shape[0] % PANEL == 0 and padding[0] < kh and padding[1] < kw)


def supported_backward(x, w, stride, groups, padding):
    """Whether the direct backward serves it: as the forward, and Cin a multiple of 32 too (the
    input gradient's panels; the weight gradient's panels are output channels)."""
    kh, kw = w.shape[2], w.shape[3]
    return (x.dtype == np.float32 and w.dtype == np.float32 and tuple(stride) == (1, 1) and groups == 1
            and w.shape[1] % PANEL == 0 and w.shape[0] % PANEL == 0 and padding[0] < kh and padding[1] < kw)


@njit(parallel=True, cache=True)
def _direct_kernel(xp, hp, wpd, cin, wpk, koff, out, oh_n, ow_n, sh, sw, npix, nthreads, counter):
    # xp: (N*Hp*Wp*Cin,) padded NHWC input ; wpk: (Cout/32 * taps*Cin * 32,) packed weights
    # koff: (taps*Cin,) offset in xp of each weight column (tap, ci) from a pixel's window corner
    # out: (npix8 * Cout,) NHWC result, npix8 = npix
    # rounded up to 8 (the extra rows repeat the last pixel and are not used)
    # counter: (1,) zero ; threads take chunks of CHUNK_TILES micro-tiles from it, and for each
    # chunk sweep every channel panel while the chunk's input rows are in cache
    cout = out.size // ((npix + PIXELS - 1) // PIXELS * PIXELS)
    kk = koff.size
    ntiles = (npix + PIXELS - 1) // PIXELS
    nchunks = (ntiles + CHUNK_TILES - 1) // CHUNK_TILES
    plane = oh_n * ow_n
    for _ in prange(nthreads):
        b = np.empty(PIXELS, dtype=np.int64)
        while True:
            ch = _take(counter)
            if ch >= nchunks:
                break
            t0 = ch * CHUNK_TILES
            t1 = min(ntiles, t0 + CHUNK_TILES)
            for pan in range(cout // PANEL):
                for tile in range(t0, t1):
                    p = tile * PIXELS
                    for r in range(PIXELS):
                        pp = min(p + r, npix - 1)
                        n = pp // plane
                        rem = pp - n * plane
                        oh = rem // ow_n
                        ow = rem - oh * ow_n
                        b[r] = ((n * hp + oh * sh) * wpd + ow * sw) * cin
                    _micro_8x32_table(xp, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], koff, 0, kk,
                                      wpk, pan * kk * PANEL, out, p * cout + pan * PANEL, cout, False)


@njit(cache=True)
def _micro_8x32_table(xp, b0, b1, b2, b3, b4, b5, b6, b7, table, k0, k1, vp, v_off, out, o_off, ldo, add):
    # out[r, 32 lanes] (+)= sum over k in k0..k1 of xp[b_r + table[k]] * vp[v_off + (k - k0)*32 + lane]
    # (out rows at o_off + r*ldo). The one micro-kernel of this file: the channels-last and
    # the phase-split forwards (b_r: 8 pixels, table: weight columns, vp: packed weights) and
    # the weight gradient (b_r: 8 weight rows, table: pixels, vp: packed dy). One table load
    # per step costs nothing measurable against walking runs of Cin (0.99-1.03x, conv2-conv5).
    c00 = vzero(); c01 = vzero(); c10 = vzero(); c11 = vzero()
    c20 = vzero(); c21 = vzero(); c30 = vzero(); c31 = vzero()
    c40 = vzero(); c41 = vzero(); c50 = vzero(); c51 = vzero()
    c60 = vzero(); c61 = vzero(); c70 = vzero(); c71 = vzero()
    pv = v_off
    for k in range(k0, k1):
        o = table[k]
        w0 = vload(vp, pv)
        w1 = vload(vp, pv + 16)
        a = vbroadcast(xp, b0 + o)
        c00 = vfma(a, w0, c00); c01 = vfma(a, w1, c01)
        a = vbroadcast(xp, b1 + o)
        c10 = vfma(a, w0, c10); c11 = vfma(a, w1, c11)
        a = vbroadcast(xp, b2 + o)
        c20 = vfma(a, w0, c20); c21 = vfma(a, w1, c21)
        a = vbroadcast(xp, b3 + o)
        c30 = vfma(a, w0, c30); c31 = vfma(a, w1, c31)
        a = vbroadcast(xp, b4 + o)
        c40 = vfma(a, w0, c40); c41 = vfma(a, w1, c41)
        a = vbroadcast(xp, b5 + o)
        c50 = vfma(a, w0, c50); c51 = vfma(a, w1, c51)
        a = vbroadcast(xp, b6 + o)
        c60 = vfma(a, w0, c60); c61 = vfma(a, w1, c61)
        a = vbroadcast(xp, b7 + o)
        c70 = vfma(a, w0, c70); c71 = vfma(a, w1, c71)
        pv += PANEL
    store_tile_8x32(out, o_off, ldo, add, c00, c01, c10, c11, c20, c21, c30, c31,
                    c40, c41, c50, c51, c60, c61, c70, c71)


@njit(cache=True)
def _store_tile_nchw(tile, bias, relu, y, y_off, plane, valid):
    # tile: (8 pixels x 32 channels) as _micro_8x32_table left it (ldo 32) ; adds bias[32 lanes],
    # rectifies, and writes it transposed: channel c's 8 pixels at y[y_off + c*plane ..+ 8]
    # (the first `valid` of them when the tile runs past the end of its image's plane)
    for h in range(2):
        bv = vload(bias, h * 16)
        for r in range(PIXELS):
            v = vadd(vload(tile, r * PANEL + h * 16), bv)
            if relu:
                v = vrelu(v)
            vstore(tile, r * PANEL + h * 16, v)
    if valid == PIXELS:
        vtranspose_8x16(tile, 0, PANEL, y, y_off, plane)
        vtranspose_8x16(tile, 16, PANEL, y, y_off + 16 * plane, plane)
    else:
        for c in range(PANEL):
            for r in range(valid):
                y[y_off + c * plane + r] = tile[r * PANEL + c]


@njit(parallel=True, cache=True)
def _split_kernel(xq, step_n, step_oh, koff, wpk, bias, relu, y, n_img, oh_n, ow_n, nthreads, counter):
    # xq: phase-split padded x (flat, see _pad_split) ; koff: (K,) offset of each weight column
    # from an output pixel's base n*step_n + oh*step_oh + ow ; wpk: (Cout/32 * K * 32,) weights
    # packed [panel][column][32] ; bias: (Cout,) ; y: (N*Cout*OH*OW,) NCHW output.
    # Tiles of 8 consecutive pixels of one image are taken in chunks of CHUNK_TILES from
    # counter, and each panel's weights serve the chunk's tiles back to back. (Slicing the
    # reduction so that a slice's weights stay in L1 measured the same on conv1.)
    plane = oh_n * ow_n
    cout = bias.size
    kk = koff.size
    tpi = (plane + PIXELS - 1) // PIXELS
    ntiles = n_img * tpi
    nchunks = (ntiles + CHUNK_TILES - 1) // CHUNK_TILES
    for _ in prange(nthreads):
        b = np.empty(CHUNK_TILES * PIXELS, dtype=np.int64)
        tile = np.empty(PIXELS * PANEL + 16, dtype=np.float32)
        while True:
            ch = _take(counter)
            if ch >= nchunks:
                break
            t0 = ch * CHUNK_TILES
            t1 = min(ntiles, t0 + CHUNK_TILES)
            for t in range(t0, t1):
                n = t // tpi
                p = (t - n * tpi) * PIXELS
                for r in range(PIXELS):
                    pp = min(p + r, plane - 1)  # past the plane's end: repeat its last pixel
                    oh = pp // ow_n
                    b[(t - t0) * PIXELS + r] = n * step_n + oh * step_oh + pp - oh * ow_n
            for pan in range(cout // PANEL):
                for t in range(t0, t1):
                    n = t // tpi
                    p = (t - n * tpi) * PIXELS
                    q = (t - t0) * PIXELS
                    _micro_8x32_table(xq, b[q], b[q + 1], b[q + 2], b[q + 3], b[q + 4], b[q + 5], b[q + 6],
                                      b[q + 7], koff, 0, kk, wpk, pan * kk * PANEL, tile, 0, PANEL, False)
                    _store_tile_nchw(tile, bias[pan * PANEL:], relu, y, (n * cout + pan * PANEL) * plane + p,
                                     plane, min(PIXELS, plane - p))


@njit(parallel=True, cache=True)
def _pack_weights(w, flip, dst):
    # w: (Cout, Cin, kh, kw) ; dst: (P/32, kh*kw, Q, 32) with, for the forward (flip False),
    # P = Cout, Q = Cin: dst[pp, i*kw + j, q, l] = w[pp*32 + l, q, i, j] ; for the input gradient
    # (flip True), P = Cin, Q = Cout and the taps reversed: w[q, pp*32 + l, kh-1-i, kw-1-j]
    cout, cin, kh, kw = w.shape
    npan, taps, nq = dst.shape[0], dst.shape[1], dst.shape[2]
    for task in prange(npan * taps):
        pp = task // taps
        t = task - pp * taps
        i = t // kw
        j = t - i * kw
        for q in range(nq):
            for lane in range(PANEL):
                if flip:
                    dst[pp, t, q, lane] = w[q, pp * PANEL + lane, kh - 1 - i, kw - 1 - j]
                else:
                    dst[pp, t, q, lane] = w[pp * PANEL + lane, q, i, j]


@njit(parallel=True, cache=True)
def _to_padded_nhwc(x, yr, relu, top, left, xp):
    # x: (N, C, H, W) -> xp: (N, H + 2*top, W + 2*left, C), zero outside ; relu: keep x only
    # where yr (the forward's rectified output, x's shape) is > 0 (a ReLU's backward)
    # One task per padded row; pixel by pixel, the channels are gathered from x's planes and
    # written contiguously (writing channel by channel instead, strided, was 5-7x slower).
    n, c, h, w = x.shape
    hp, wp = xp.shape[1], xp.shape[2]
    for task in prange(n * hp):
        b = task // hp
        r = task - b * hp
        ih = r - top
        row = xp[b, r]
        if ih < 0 or ih >= h:
            row[:, :] = 0.0
            continue
        for col in range(left):
            row[col, :] = 0.0
        for col in range(left + w, wp):
            row[col, :] = 0.0
        for iw in range(w):
            d = row[left + iw]
            if relu:
                for ch in range(c):
                    d[ch] = 0.0 if yr[b, ch, ih, iw] <= 0.0 else x[b, ch, ih, iw]
            else:
                for ch in range(c):
                    d[ch] = x[b, ch, ih, iw]


@njit(parallel=True, cache=True)
def _from_nhwc(out, bias, has_bias, relu, y):
    # out: (>= N*OH*OW, C) NHWC rows ; y: (N, C, OH*OW) = out transposed (+ bias, rectified)
    # One task per run of 16 pixels of an image: rows of out read contiguously, and the 16
    # pixels of each channel land in one or two cache lines of y.
    n, c, plane = y.shape
    runs = (plane + 15) // 16
    for task in prange(n * runs):
        b = task // runs
        p0 = (task - b * runs) * 16
        p1 = min(plane, p0 + 16)
        for p in range(p0, p1):
            src = out[b * plane + p]
            for ch in range(c):
                v = src[ch] + (bias[ch] if has_bias else 0.0)
                if relu:
                    v = 0.0 if v <= 0.0 else v  # as relu_forward: NaN passes
                y[b, ch, p] = v


@njit(parallel=True, cache=True)
def _weight_grad_kernel(xq, dyk, xo, poff, dwt, nthreads, counter):
    # xq: padded, phase-split x (flat) ; dyk: (Cout/32, N*OH*OW, 32) packed dy
    # xo: (N*OH*OW,) each output pixel's base offset in xq
    # poff: (R,) offset in xq of each weight row (R a multiple of 8, see _weight_rows)
    # dwt: (R, Cout), row r the gradient of weight row r, overwritten
    # Work units are the 32-wide output-channel panels: each element of dwt has one writer and
    # one summation order whatever the thread count. A unit walks the pixels in blocks of
    # DW_PIXEL_BLOCK, whose packed dy stays in cache while every weight row reuses it. The
    # micro-kernel is the forward's with the pixels as the reduction: 8 weight rows broadcast
    # from x (row r at xq[xo[p] + poff[r]]), the panel's dy loaded as the vectors; one flat
    # loop over a block's pixels through xo (a loop per output row cost 10-20% on 13-pixel rows).
    npan, npix = dyk.shape[0], dyk.shape[1]
    cout = npan * PANEL
    dkf = dyk.reshape(-1)
    cf = dwt.reshape(-1)
    for _ in prange(nthreads):
        while True:
            pan = _take(counter)
            if pan >= npan:
                break
            for p_lo in range(0, npix, DW_PIXEL_BLOCK):
                p_hi = min(npix, p_lo + DW_PIXEL_BLOCK)
                for p0 in range(0, poff.size, PIXELS):
                    _micro_8x32_table(xq, poff[p0], poff[p0 + 1], poff[p0 + 2], poff[p0 + 3], poff[p0 + 4],
                                      poff[p0 + 5], poff[p0 + 6], poff[p0 + 7], xo, p_lo, p_hi,
                                      dkf, (pan * npix + p_lo) * PANEL, cf, p0 * cout + pan * PANEL, cout, p_lo > 0)


@functools.lru_cache(maxsize=16)
def _pixel_offsets(n, oh, ow, step_n, step_oh):
    """(N*OH*OW,) base offset n*step_n + oh*step_oh + ow of each output pixel in a phase-split
    padded x. Cached: one per layer shape and batch size."""
    nn, hh, ww = np.meshgrid(np.arange(n), np.arange(oh), np.arange(ow), indexing="ij")
    return (nn * step_n + hh * step_oh + ww).astype(np.int64).ravel()


@functools.lru_cache(maxsize=32)
def _weight_rows(cin, kh, kw, hp, s, wq):
    """(poff, rowof): the weight rows of the weight gradient in the order the kernel takes
    them, 8 at a time. poff[r]: offset of row r's first input value in a phase-split padded
    image (relative to the output pixel's; R = poff.size, a multiple of 8, the rows past K
    repeating offset 0); rowof[k]: the row holding column k = c*kh*kw + i*kw + j of the
    (Cout, K) weight. With Cin a multiple of 8 a block of 8 rows is 8 channels at one tap (8
    planes, as conv2-conv5 were first written), else 8 consecutive (c, i, j) (conv1's 3
    channels). Cached: one set per layer shape."""
    poff_k = _column_offsets(cin, kh, kw, hp, s, wq)  # in column order k
    k = poff_k.size
    if cin % PIXELS == 0:
        c, tap = np.divmod(np.arange(k), kh * kw)
        rows = np.argsort(tap * cin + c)                # tap-major: row r = tap * Cin + c
    else:
        rows = np.arange(k)
    poff = np.zeros(-(-k // PIXELS) * PIXELS, dtype=np.int64)
    poff[:k] = poff_k[rows]
    rowof = np.empty(k, dtype=np.int64)
    rowof[rows] = np.arange(k)
    return poff, rowof


@njit(parallel=True, cache=True)
def _pack_dy(dyp, qh, qw, oh_n, ow_n, dyk):
    # dyp: (N, Hq, Wq, Cout) dy as padded NHWC (already masked), data from (qh, qw)
    # -> dyk: (Cout/32, N*OH*OW, 32): each pixel's 32 channels of a panel, one contiguous copy
    n = dyp.shape[0]
    npan = dyk.shape[0]
    for task in prange(npan * n):
        pan = task // n
        b = task - pan * n
        dst = dyk[pan]
        c0 = pan * PANEL
        for oh in range(oh_n):
            for ow in range(ow_n):
                src = dyp[b, oh + qh, ow + qw]
                d = dst[(b * oh_n + oh) * ow_n + ow]
                for lane in range(PANEL):
                    d[lane] = src[c0 + lane]


@njit(parallel=True, cache=True)
def _pack_dy_nchw(dy3, yr3, relu, dyk, dbp):
    # dy3, yr3: (N, Cout, P) ; dyk: (Cout/32, N*P, 32) as _pack_dy writes it, masked where
    # yr3 <= 0 when relu ; dbp: (N, Cout) float64, each image's bias gradient, overwritten
    # One task per (panel, image), in runs of PACK_RUN pixels: the run of each of the 32
    # channels is masked (and summed) into a scratch block in L1, which register transposes
    # turn into the run's 32-channel pixel rows.
    n, cout, plane = dy3.shape
    npan = dyk.shape[0]
    dkf = dyk.reshape(-1)
    npix = dyk.shape[1]
    for task in prange(npan * n):
        pan = task // n
        b = task - pan * n
        scratch = np.empty(PANEL * PACK_RUN, dtype=np.float32)
        for lane in range(PANEL):
            dbp[b, pan * PANEL + lane] = 0.0
        for p0 in range(0, plane, PACK_RUN):
            run = min(PACK_RUN, plane - p0)
            for lane in range(PANEL):
                co = pan * PANEL + lane
                dbp[b, co] += _mask_copy_sum(dy3[b, co, p0:p0 + run], yr3[b, co, p0:p0 + run],
                                             scratch[lane * PACK_RUN:lane * PACK_RUN + run], relu)
            d0 = (pan * npix + b * plane + p0) * PANEL
            full = run - run % 16
            for pc in range(0, full, 16):
                for g in range(PANEL // 8):
                    vtranspose_8x16(scratch, g * 8 * PACK_RUN + pc, PACK_RUN, dkf, d0 + pc * PANEL + g * 8, PANEL)
            for p in range(full, run):
                for lane in range(PANEL):
                    dkf[d0 + p * PANEL + lane] = scratch[lane * PACK_RUN + p]


@njit(parallel=True, cache=True)
def _pad_split(x, top, left, s, xq):
    # x: (N, C, H, W) -> xq: (N, C, H + 2*top, s, Wq): padded row r, column m*s + ph of x
    # zero-padded (rows top.., columns left..) at xq[n, c, r, ph, m], zero outside. Splitting
    # the columns by phase makes a stride-s window's taps j walk xq[..., j % s, ow + j // s]
    # one element per output pixel; for s = 1 it is the plain padded NCHW copy.
    n, c, h, w = x.shape
    hp, wq = xq.shape[2], xq.shape[4]
    for task in prange(n * c):
        b = task // c
        ch = task - b * c
        dst = xq[b, ch]
        src = x[b, ch]
        for r in range(hp):
            ih = r - top
            if ih < 0 or ih >= h:
                dst[r, :, :] = 0.0
                continue
            row = src[ih]
            if s == 1:  # the plain padded copy: contiguous, vectorised
                d = dst[r, 0]
                for m in range(left):
                    d[m] = 0.0
                for m in range(w):
                    d[left + m] = row[m]
                for m in range(left + w, wq):
                    d[m] = 0.0
                continue
            for ph in range(s):
                d = dst[r, ph]
                for m in range(wq):
                    iw = m * s + ph - left
                    d[m] = row[iw] if 0 <= iw < w else 0.0


@njit(parallel=True, cache=True)
def _store_weight_grad(dwt, rowof, dw2, accumulate):
    # dwt: (R, Cout), rows in _weight_rows' order -> dw2: (Cout, K), overwritten or added to;
    # rowof[k]: the row of dwt holding weight column k (so dw2's rows are written in order)
    cout, k_n = dw2.shape
    for co in prange(cout):
        d = dw2[co]
        for k in range(k_n):
            v = dwt[rowof[k], co]
            if accumulate:
                d[k] += v
            else:
                d[k] = v


def _weight_grad(x, dyk, dw, kh, kw, stride, padding, oh, ow, accumulate, nthreads):
    """dW (+)= into dw (Cout, Cin, kh, kw) from dy packed as dyk (_pack_dy's layout)."""
    n, cin, h, wd = x.shape
    cout = dw.shape[0]
    (sh, sw), (ph, pw) = stride, padding
    hp = max(h + 2 * ph, (oh - 1) * sh + kh)
    wq = -(-max(wd + 2 * pw, (ow - 1) * sw + kw) // sw)
    xq = np.empty((n, cin, hp, sw, wq), dtype=np.float32)
    _pad_split(x, ph, pw, sw, xq)
    poff, rowof = _weight_rows(cin, kh, kw, hp, sw, wq)
    dwt = np.empty((poff.size, cout), dtype=np.float32)
    _weight_grad_kernel(xq.reshape(-1), dyk, _pixel_offsets(n, oh, ow, cin * hp * sw * wq, sh * sw * wq), poff, dwt,
                        nthreads, np.zeros(1, np.int64))
    _store_weight_grad(dwt, rowof, dw.reshape(cout, -1), accumulate)


def _run(xp, wpk, kh, kw, npix, oh, ow, sh, sw, cout, nthreads):
    n, hp, wp, cin = xp.shape
    # weight column (tap i*kw + j, ci) of a pixel's window lies at (i*Wp + j)*Cin + ci in xp:
    # the packed weights' [tap][Cin] order
    i, j, ci = np.meshgrid(np.arange(kh), np.arange(kw), np.arange(cin), indexing="ij")
    koff = ((i * wp + j) * cin + ci).astype(np.int64).ravel()
    npix8 = (npix + PIXELS - 1) // PIXELS * PIXELS
    out = np.empty((npix8, cout), dtype=np.float32)
    _direct_kernel(xp.reshape(-1), hp, wp, cin, wpk.reshape(-1), koff, out.reshape(-1), oh, ow, sh, sw,
                   npix, nthreads, np.zeros(1, np.int64))
    return out


def forward(x, w, b, stride, padding, relu, nthreads):
    """conv2d_forward for float32, groups 1, Cout a multiple of 32 (see supported)."""
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    y = np.empty((n, cout, oh, ow), dtype=np.float32)
    if n == 0 or oh <= 0 or ow <= 0:
        return y
    xp = np.empty((n, h + 2 * ph, wd + 2 * pw, cin), dtype=np.float32)
    _to_padded_nhwc(x, x, False, ph, pw, xp)
    wpk = np.empty((cout // PANEL, kh * kw, cin, PANEL), dtype=np.float32)
    _pack_weights(np.ascontiguousarray(w), False, wpk)
    out = _run(xp, wpk, kh, kw, n * oh * ow, oh, ow, sh, sw, cout, nthreads)
    bias = np.zeros(1, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    _from_nhwc(out, bias, b is not None, relu, y.reshape(n, cout, oh * ow))
    return y


@functools.lru_cache(maxsize=32)
def _column_offsets(cin, kh, kw, hp, s, wq):
    """(K,) offset of weight column k = (c*kh + i)*kw + j (the weight's own order) in a
    phase-split padded image, from an output pixel's base."""
    c, i, j = np.meshgrid(np.arange(cin), np.arange(kh), np.arange(kw), indexing="ij")
    c, i, j = c.ravel(), i.ravel(), j.ravel()
    return (c * (hp * s * wq) + i * (s * wq) + (j % s) * wq + j // s).astype(np.int64)


def supported_split(x, w, stride, groups, padding):
    """Whether conv.py sends this forward to forward_split: float32, groups 1, Cout a multiple of
    32, padding below the kernel size, any stride (conv1)."""
    kh, kw = w.shape[2], w.shape[3]
    return (x.dtype == np.float32 and w.dtype == np.float32 and groups == 1 and w.shape[0] % PANEL == 0
            and padding[0] < kh and padding[1] < kw)


def forward_split(x, w, b, stride, padding, relu, nthreads):
    """conv2d_forward for float32, groups 1, Cout a multiple of 32, any stride, NCHW in and out:
    the micro-kernel broadcasts 8 consecutive output pixels' inputs from a phase-split padded
    copy of x (8 adjacent elements, whatever the stride) and its 8 x 32 tile, bias added and
    rectified, is transposed into y in registers: no channels-last copies, no column matrix."""
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    y = np.empty((n, cout, oh, ow), dtype=np.float32)
    if n == 0 or oh <= 0 or ow <= 0:
        return y
    hp = max(h + 2 * ph, (oh - 1) * sh + kh)
    wq = -(-max(wd + 2 * pw, (ow - 1) * sw + kw) // sw)
    xq = np.empty((n, cin, hp, sw, wq), dtype=np.float32)
    _pad_split(x, ph, pw, sw, xq)
    k = cin * kh * kw
    # [panel][column][32]: a copy, no arithmetic
    wpk = np.ascontiguousarray(w.reshape(cout // PANEL, PANEL, k).transpose(0, 2, 1))
    bias = np.zeros(cout, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    _split_kernel(xq.reshape(-1), cin * hp * sw * wq, sh * sw * wq, _column_offsets(cin, kh, kw, hp, sw, wq),
                  wpk.reshape(-1), bias, relu, y.reshape(-1), n, oh, ow, nthreads, np.zeros(1, np.int64))
    return y


def backward(dy, x, w, dw, db, padding, accumulate, need_dx, relu_out, nthreads):
    """conv2d_backward for float32, stride 1, groups 1, Cin and Cout multiples of 32 (see
    supported_backward): dW (+)= into dw (Cout, Cin, kh, kw), db (+)= into db (or None);
    returns dx, or None when not need_dx.

    dy (masked by relu_out > 0 when given) is laid out once as a padded NHWC array: the input
    gradient convolves it with the flipped, transposed weights, the bias gradient sums its
    columns, and its panels of 32 channels, copied pixel by pixel, feed the weight gradient.
    """
    n, cout, oh, ow = dy.shape
    _, cin, kh, kw = w.shape
    h, wd = x.shape[2], x.shape[3]
    if dy.size == 0:  # an empty batch: zero gradients (or nothing to add)
        if not accumulate:
            dw[...] = 0
            if db is not None:
                db[...] = 0
        return np.zeros(x.shape, dtype=np.float32) if need_dx else None
    ph, pw = padding
    qh, qw = kh - 1 - ph, kw - 1 - pw
    dyp = np.empty((n, oh + 2 * qh, ow + 2 * qw, cout), dtype=np.float32)
    yr = dy if relu_out is None else np.ascontiguousarray(relu_out)
    _to_padded_nhwc(dy, yr, relu_out is not None, qh, qw, dyp)
    dx = None
    if need_dx:
        dx = np.empty((n, cin, h, wd), dtype=np.float32)
        wpk = np.empty((cin // PANEL, kh * kw, cout, PANEL), dtype=np.float32)
        _pack_weights(np.ascontiguousarray(w), True, wpk)
        out = _run(dyp, wpk, kh, kw, n * h * wd, h, wd, 1, 1, cin, nthreads)
        _from_nhwc(out, np.zeros(1, np.float32), False, False, dx.reshape(n, cin, h * wd))
    dyk = np.empty((cout // PANEL, n * oh * ow, PANEL), dtype=np.float32)
    _pack_dy(dyp, qh, qw, oh, ow, dyk)
    _weight_grad(x, dyk, dw, kh, kw, (1, 1), padding, oh, ow, accumulate, nthreads)
    if db is not None:
        column_sums(dyp.reshape(-1, cout), db, accumulate)  # its zero padding adds nothing
    return dx


def supported_weight_grad(x, w, groups, dw, db):
    """Whether weight_grad serves a backward that needs no input gradient: float32, groups 1,
    Cout a multiple of 32, any stride and Cin (AlexNet's conv1), contiguous float32 dw."""
    return (x.dtype == np.float32 and w.dtype == np.float32 and groups == 1 and w.shape[0] % PANEL == 0
            and dw.flags.c_contiguous and dw.dtype == np.float32 and (db is None or db.dtype == np.float32))


def weight_grad(dy, x, w, dw, db, stride, padding, accumulate, relu_out, nthreads):
    """dW (+)= into dw and db (+)= into db (or None) of a convolution whose input gradient is
    not wanted (the first layer), any stride: dy, masked by relu_out > 0 when given, is packed
    straight from NCHW (its bias gradient summed in the same pass) and the weight-gradient
    kernel reads x through a phase-split padded copy, so no column matrix is built."""
    n, cout, oh, ow = dy.shape
    kh, kw = w.shape[2], w.shape[3]
    if dy.size == 0:
        if not accumulate:
            dw[...] = 0
            if db is not None:
                db[...] = 0
        return None
    dy3 = np.ascontiguousarray(dy).reshape(n, cout, oh * ow)
    yr3 = dy3 if relu_out is None else np.ascontiguousarray(relu_out).reshape(n, cout, oh * ow)
    dyk = np.empty((cout // PANEL, n * oh * ow, PANEL), dtype=np.float32)
    dbp = np.empty((n, cout), dtype=np.float64)
    _pack_dy_nchw(dy3, yr3, relu_out is not None, dyk, dbp)
    _weight_grad(x, dyk, dw, kh, kw, stride, padding, oh, ow, accumulate, nthreads)
    if db is not None:
        total = dbp.sum(axis=0)
        db[...] = (db + total) if accumulate else total
    return None


def conv2d_direct_ref(x, w, padding):
    """NumPy reference twin of the direct computation (stride 1): the same NHWC sums, plainly."""
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    ph, pw = padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))).transpose(0, 2, 3, 1)
    oh, ow = h + 2 * ph - kh + 1, wd + 2 * pw - kw + 1
    out = np.zeros((n, oh, ow, cout), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,oc->nhwo", xp[:, i:i + oh, j:j + ow, :], w[:, :, i, j])
    return out.transpose(0, 3, 1, 2)
