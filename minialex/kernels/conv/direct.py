"""The direct paths: float32, groups 1, output channels in panels of 32, no im2col.

One micro-kernel (_micro_8x32_table) multiplies 8 broadcast input values (any 8 addresses,
given by a table of offsets) into two 16-lane vectors of 32 output channels' weights, its
accumulators kept in registers over the whole reduction. Every path here is that kernel on a
different table:

- path `direct` (stride 1): forward on a zero-padded channels-last copy xp (N, Hp, Wp, Cin),
  where output pixel (n, oh, ow) and tap (i, j) read Cin contiguous values at xp[n, oh + i,
  ow + j]; weights packed [panel of 32][tap][Cin][32]. Backward: the input gradient is the same
  kernel on dy padded by k - 1 - padding with the weights flipped and their channel axes
  swapped; the weight gradient is the kernel with the pixels as the reduction (8 weight rows
  broadcast from a phase-split copy of x, against dy packed [panel][pixel][32], one writer per
  panel so the result does not depend on the thread count); the bias gradient is the column
  sums of the channels-last dy.
- path `direct_split` (any stride): forward from a phase-split padded copy of x (layout.py):
  8 consecutive output pixels read 8 adjacent elements for each weight column whatever the
  stride, and the 8 x 32 tile, bias added and rectified, is transposed into NCHW in registers.
  Backward of a layer whose input gradient nobody needs (conv1): the weight gradient above,
  with dy packed straight from NCHW and its bias gradient summed in the same pass.

Why: no column matrix is built or packed per block, and the C tile is written once; the
measurements are in docs/performance.md.
"""
import functools

import numpy as np
from numba import njit, prange

from minialex.kernels.bf16 import round_bits
from minialex.kernels.conv.layout import (channels_last_offsets, column_offsets, from_nhwc, pixel_offsets,
                                          split_copy, to_padded_nhwc)
from minialex.kernels.gemm import store_tile_8x32
from minialex.kernels.gemm_bf16 import bf16_path, bf16_values
from minialex.kernels.parallel import column_sums, mask_copy_sum, take
from minialex.kernels.simd import vadd, vbroadcast, vfma, vload, vrelu, vstore, vtranspose_8x16, vzero
from minialex.kernels.simd_bf16 import bbroadcast, bload, bpack, bround_load, bstore, vdpbf16

PANEL = 32        # output channels per micro-tile (two 16-lane vectors)
PIXELS = 8        # output pixels per micro-tile
DW_PIXEL_BLOCK = 1024  # pixels per step of the weight gradient (packed dy: 128 KB, in L2)
CHUNK_TILES = 8  # micro-tiles of pixels a thread takes at once (it loops over every panel)
PACK_RUN = 4096  # pixels per step of _pack_dy_nchw: a whole conv1 plane, 32 channels in a 512 KB
# scratch (two read streams at a time)


@njit(inline="always", cache=True)
def _window_bases(p, npix, plane, ow_n, hp, wpd, sh, sw, cin, b):
    # b[r] = offset in a padded NHWC array (Wp = wpd, Cin = cin per pixel) of the window corner of
    # output pixel p + r (the last pixel repeated past npix)
    for r in range(PIXELS):
        pp = min(p + r, npix - 1)
        n = pp // plane
        rem = pp - n * plane
        oh = rem // ow_n
        ow = rem - oh * ow_n
        b[r] = ((n * hp + oh * sh) * wpd + ow * sw) * cin


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
            ch = take(counter)
            if ch >= nchunks:
                break
            t0 = ch * CHUNK_TILES
            t1 = min(ntiles, t0 + CHUNK_TILES)
            for pan in range(cout // PANEL):
                for tile in range(t0, t1):
                    p = tile * PIXELS
                    _window_bases(p, npix, plane, ow_n, hp, wpd, sh, sw, cin, b)
                    _micro_8x32_table(xp, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], koff, 0, kk,
                                      wpk, pan * kk * PANEL, out, p * cout + pan * PANEL, cout, False)


@njit(parallel=True, cache=True)
def _direct_kernel_bf16(xq, hp, wpd, cin2, wq, koff, out, oh_n, ow_n, npix, nthreads, counter):
    # _direct_kernel (stride 1) on bf16 pairs: xq: (N*Hp*Wp*Cin/2,) uint32, each the pair of
    # channels (2c, 2c+1) of a padded NHWC pixel ; wq: uint16 view of (Cout/32, taps*Cin/2, 32)
    # pairs ; koff: (taps*Cin/2,) offset in xq of each pair column from a window corner
    cout = out.size // ((npix + PIXELS - 1) // PIXELS * PIXELS)
    kk = koff.size
    ntiles = (npix + PIXELS - 1) // PIXELS
    nchunks = (ntiles + CHUNK_TILES - 1) // CHUNK_TILES
    plane = oh_n * ow_n
    for _ in prange(nthreads):
        b = np.empty(PIXELS, dtype=np.int64)
        while True:
            ch = take(counter)
            if ch >= nchunks:
                break
            for pan in range(cout // PANEL):
                for tile in range(ch * CHUNK_TILES, min(ntiles, (ch + 1) * CHUNK_TILES)):
                    p = tile * PIXELS
                    _window_bases(p, npix, plane, ow_n, hp, wpd, 1, 1, cin2, b)
                    _micro_8x32_pairs(xq, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], koff, kk,
                                      wq, pan * kk * 2 * PANEL, out, p * cout + pan * PANEL, cout)


@njit(cache=True)
def _micro_8x32_pairs(xq, b0, b1, b2, b3, b4, b5, b6, b7, table, kk, wq, v_off, out, o_off, ldo):
    # _micro_8x32_table on bf16 pairs, one vdpbf16ps per pair instead of an FMA per value:
    # out[r, 32 lanes] = sum over pair columns k of xq[b_r + table[k]] . wq[v_off + k*64 + 2*lane ..+ 2]
    c00 = vzero(); c01 = vzero(); c10 = vzero(); c11 = vzero()
    c20 = vzero(); c21 = vzero(); c30 = vzero(); c31 = vzero()
    c40 = vzero(); c41 = vzero(); c50 = vzero(); c51 = vzero()
    c60 = vzero(); c61 = vzero(); c70 = vzero(); c71 = vzero()
    pv = v_off
    for k in range(kk):
        o = table[k]
        w0 = bload(wq, pv)
        w1 = bload(wq, pv + 32)
        a = bbroadcast(xq, b0 + o)
        c00 = vdpbf16(c00, a, w0); c01 = vdpbf16(c01, a, w1)
        a = bbroadcast(xq, b1 + o)
        c10 = vdpbf16(c10, a, w0); c11 = vdpbf16(c11, a, w1)
        a = bbroadcast(xq, b2 + o)
        c20 = vdpbf16(c20, a, w0); c21 = vdpbf16(c21, a, w1)
        a = bbroadcast(xq, b3 + o)
        c30 = vdpbf16(c30, a, w0); c31 = vdpbf16(c31, a, w1)
        a = bbroadcast(xq, b4 + o)
        c40 = vdpbf16(c40, a, w0); c41 = vdpbf16(c41, a, w1)
        a = bbroadcast(xq, b5 + o)
        c50 = vdpbf16(c50, a, w0); c51 = vdpbf16(c51, a, w1)
        a = bbroadcast(xq, b6 + o)
        c60 = vdpbf16(c60, a, w0); c61 = vdpbf16(c61, a, w1)
        a = bbroadcast(xq, b7 + o)
        c70 = vdpbf16(c70, a, w0); c71 = vdpbf16(c71, a, w1)
        pv += 2 * PANEL
    store_tile_8x32(out, o_off, ldo, False, c00, c01, c10, c11, c20, c21, c30, c31,
                    c40, c41, c50, c51, c60, c61, c70, c71)


@njit(parallel=True, cache=True)
def _round_pairs(src, dst):
    # src: (2m,) float32 -> dst: (m,) uint32 bf16 pairs (src[2i], src[2i+1]), rounded to nearest even
    m = dst.size
    for blk in prange(m // 16):
        bstore(dst, blk * 16, bround_load(src, blk * 32))
    for i in range(m - m % 16, m):
        lo = np.uint32(round_bits(np.uint32(np.float32(src[2 * i]).view(np.uint32))))
        hi = np.uint32(round_bits(np.uint32(np.float32(src[2 * i + 1]).view(np.uint32))))
        dst[i] = lo | (hi << 16)


@njit(parallel=True, cache=True)
def _pair_weights(wpk, wq):
    # wpk: (P/32, taps, Q, 32) float32 packed weights (Q even) -> wq: (P/32, taps, Q/2, 32) uint32,
    # lane l of pair column q2 = (wpk[.., 2*q2, l], wpk[.., 2*q2 + 1, l]) rounded to bf16
    npan, taps, nq = wpk.shape[0], wpk.shape[1], wpk.shape[2]
    wf = wpk.reshape(-1)
    qf = wq.reshape(-1)
    for task in prange(npan * taps):
        src = task * nq * PANEL
        dst = task * (nq // 2) * PANEL
        for q2 in range(nq // 2):
            for h in range(0, PANEL, 16):
                lo = vload(wf, src + 2 * q2 * PANEL + h)
                hi = vload(wf, src + (2 * q2 + 1) * PANEL + h)
                bstore(qf, dst + q2 * PANEL + h, bpack(lo, hi))


@njit(cache=True)
def _micro_8x32_table(xp, b0, b1, b2, b3, b4, b5, b6, b7, table, k0, k1, vp, v_off, out, o_off, ldo, add):
    # out[r, 32 lanes] (+)= sum over k in k0..k1 of xp[b_r + table[k]] * vp[v_off + (k - k0)*32 + lane]
    # (out rows at o_off + r*ldo). The one micro-kernel of this file: the channels-last and
    # the phase-split forwards (b_r: 8 pixels, table: weight columns, vp: packed weights) and
    # the weight gradient (b_r: 8 weight rows, table: pixels, vp: packed dy).
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
    # xq: phase-split padded x (flat, see layout.pad_split) ; koff: (K,) offset of each weight column
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
            ch = take(counter)
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
def _pack_weights_taps(w, flip, dst):
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
    # loop over a block's pixels through xo (short output rows make a loop per row costly).
    npan, npix = dyk.shape[0], dyk.shape[1]
    cout = npan * PANEL
    dkf = dyk.reshape(-1)
    cf = dwt.reshape(-1)
    for _ in prange(nthreads):
        while True:
            pan = take(counter)
            if pan >= npan:
                break
            for p_lo in range(0, npix, DW_PIXEL_BLOCK):
                p_hi = min(npix, p_lo + DW_PIXEL_BLOCK)
                for p0 in range(0, poff.size, PIXELS):
                    _micro_8x32_table(xq, poff[p0], poff[p0 + 1], poff[p0 + 2], poff[p0 + 3], poff[p0 + 4],
                                      poff[p0 + 5], poff[p0 + 6], poff[p0 + 7], xo, p_lo, p_hi,
                                      dkf, (pan * npix + p_lo) * PANEL, cf, p0 * cout + pan * PANEL, cout, p_lo > 0)


@functools.lru_cache(maxsize=32)
def _weight_rows(cin, kh, kw, hp, s, wq):
    """(poff, rowof): the weight rows of the weight gradient in the order the kernel takes
    them, 8 at a time. poff[r]: offset of row r's first input value in a phase-split padded
    image (relative to the output pixel's; R = poff.size, a multiple of 8, the rows past K
    repeating offset 0); rowof[k]: the row holding column k = c*kh*kw + i*kw + j of the
    (Cout, K) weight. With Cin a multiple of 8 a block of 8 rows is 8 channels at one tap (8
    planes, as conv2-conv5 were first written), else 8 consecutive (c, i, j) (conv1's 3
    channels). Cached: one set per layer shape."""
    poff_k = column_offsets(cin, kh, kw, hp, s, wq)  # in column order k
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
                dbp[b, co] += mask_copy_sum(dy3[b, co, p0:p0 + run], yr3[b, co, p0:p0 + run],
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


def _weight_grad(x, dyk, dw, g, accumulate, nthreads):
    """dW (+)= into dw (Cout, Cin, kh, kw) from dy packed as dyk (_pack_dy's layout)."""
    xq = split_copy(x, g.ph, g.pw, g.sw, 0)
    hp, wq = xq.shape[2], xq.shape[4]
    poff, rowof = _weight_rows(g.cin, g.kh, g.kw, hp, g.sw, wq)
    dwt = np.empty((poff.size, g.cout), dtype=np.float32)
    xo = pixel_offsets(g.n, g.oh, g.ow, g.cin * hp * g.sw * wq, g.sh * g.sw * wq)
    _weight_grad_kernel(xq.reshape(-1), dyk, xo, poff, dwt, nthreads, np.zeros(1, np.int64))
    _store_weight_grad(dwt, rowof, dw.reshape(g.cout, -1), accumulate)


def _run(xp, wpk, kh, kw, npix, oh, ow, sh, sw, cout, nthreads):
    n, hp, wp, cin = xp.shape
    koff = channels_last_offsets(kh, kw, wp, cin)
    npix8 = (npix + PIXELS - 1) // PIXELS * PIXELS
    out = np.empty((npix8, cout), dtype=np.float32)
    _direct_kernel(xp.reshape(-1), hp, wp, cin, wpk.reshape(-1), koff, out.reshape(-1), oh, ow, sh, sw,
                   npix, nthreads, np.zeros(1, np.int64))
    return out


def _run_bf16(xp, wpk, kh, kw, npix, oh, ow, cout, nthreads):
    # _run (stride 1) with xp (N, Hp, Wp, Cin) and wpk (Cout/32, taps, Cin, 32) rounded to bf16
    # pairs; emulated (gemm_bf16.bf16_path()): _run on the bf16 values of both, the same exact
    # products summed in float32 in another order
    n, hp, wp, cin = xp.shape
    if bf16_path() == "emulated":
        xr = bf16_values(xp.reshape(-1, cin)).reshape(xp.shape)
        wr = bf16_values(wpk.reshape(-1, PANEL)).reshape(wpk.shape)
        return _run(xr, wr, kh, kw, npix, oh, ow, 1, 1, cout, nthreads)
    cin2 = cin // 2
    xq = np.empty(xp.size // 2, dtype=np.uint32)
    _round_pairs(xp.reshape(-1), xq)
    wq = np.empty((wpk.shape[0], wpk.shape[1], cin2, PANEL), dtype=np.uint32)
    _pair_weights(wpk, wq)
    koff = channels_last_offsets(kh, kw, wp, cin2)
    out = np.empty(((npix + PIXELS - 1) // PIXELS * PIXELS, cout), dtype=np.float32)
    _direct_kernel_bf16(xq, hp, wp, cin2, wq.reshape(-1).view(np.uint16), koff, out.reshape(-1), oh, ow, npix,
                        nthreads, np.zeros(1, np.int64))
    return out


def forward(x, w, b, g, relu, nthreads):
    """Path `direct`, forward: y = conv2d(x, w, b) (rectified when relu) through channels-last
    copies; float32, groups 1, Cout a multiple of 32 (plan.py says when)."""
    n, cin, cout, kh, kw = g.n, g.cin, g.cout, g.kh, g.kw
    y = np.empty((n, cout, g.oh, g.ow), dtype=np.float32)
    xp = np.empty((n, g.h + 2 * g.ph, g.w + 2 * g.pw, cin), dtype=np.float32)
    to_padded_nhwc(x, x, False, g.ph, g.pw, xp)
    wpk = np.empty((cout // PANEL, kh * kw, cin, PANEL), dtype=np.float32)
    _pack_weights_taps(np.ascontiguousarray(w), False, wpk)
    out = _run(xp, wpk, kh, kw, n * g.oh * g.ow, g.oh, g.ow, g.sh, g.sw, cout, nthreads)
    from_nhwc(out.reshape(-1), cout, b, relu, y.reshape(n, cout, g.oh * g.ow))
    return y


def forward_split(x, w, b, g, relu, nthreads):
    """Path `direct_split`, forward: as forward, any stride, NCHW in and out: 8 consecutive
    output pixels' inputs come from a phase-split padded copy of x and the 8 x 32 tile, bias
    added and rectified, is transposed into y in registers."""
    n, cin, cout, kh, kw = g.n, g.cin, g.cout, g.kh, g.kw
    y = np.empty((n, cout, g.oh, g.ow), dtype=np.float32)
    xq = split_copy(x, g.ph, g.pw, g.sw, 0)
    hp, wq = xq.shape[2], xq.shape[4]
    k = cin * kh * kw
    # [panel][column][32]: a copy, no arithmetic
    wpk = np.ascontiguousarray(w.reshape(cout // PANEL, PANEL, k).transpose(0, 2, 1))
    bias = np.zeros(cout, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    _split_kernel(xq.reshape(-1), cin * hp * g.sw * wq, g.sh * g.sw * wq, column_offsets(cin, kh, kw, hp, g.sw, wq),
                  wpk.reshape(-1), bias, relu, y.reshape(-1), n, g.oh, g.ow, nthreads, np.zeros(1, np.int64))
    return y


def backward(dy, x, w, dw, db, g, accumulate, need_dx, relu_out, nthreads):
    """Path `direct`, backward (stride 1, Cin and Cout multiples of 32): dW (+)= into dw,
    db (+)= into db (or None); returns dx, or None when not need_dx.

    dy (masked by relu_out > 0 when given) is laid out once as a padded NHWC array: the input
    gradient convolves it with the flipped, transposed weights, the bias gradient sums its
    columns, and its panels of 32 channels, copied pixel by pixel, feed the weight gradient.
    """
    n, cin, cout, kh, kw = g.n, g.cin, g.cout, g.kh, g.kw
    qh, qw = kh - 1 - g.ph, kw - 1 - g.pw
    dyp = np.empty((n, g.oh + 2 * qh, g.ow + 2 * qw, cout), dtype=np.float32)
    yr = dy if relu_out is None else np.ascontiguousarray(relu_out)
    to_padded_nhwc(dy, yr, relu_out is not None, qh, qw, dyp)
    dx = None
    if need_dx:
        dx = np.empty((n, cin, g.h, g.w), dtype=np.float32)
        wpk = np.empty((cin // PANEL, kh * kw, cout, PANEL), dtype=np.float32)
        _pack_weights_taps(np.ascontiguousarray(w), True, wpk)
        out = _run(dyp, wpk, kh, kw, n * g.h * g.w, g.h, g.w, 1, 1, cin, nthreads)
        from_nhwc(out.reshape(-1), cin, None, False, dx.reshape(n, cin, g.h * g.w))
    dyk = np.empty((cout // PANEL, n * g.oh * g.ow, PANEL), dtype=np.float32)
    _pack_dy(dyp, qh, qw, g.oh, g.ow, dyk)
    _weight_grad(x, dyk, dw, g, accumulate, nthreads)
    if db is not None:
        column_sums(dyp.reshape(-1, cout), db, accumulate)  # its zero padding adds nothing
    return dx


def backward_split(dy, x, w, dw, db, g, accumulate, need_dx, relu_out, nthreads):
    """Path `direct_split`, backward without the input gradient (the first layer), any stride:
    dW (+)= into dw and db (+)= into db (or None). dy, masked by relu_out > 0 when given, is
    packed straight from NCHW with its bias gradient summed in the same pass. Returns None."""
    if need_dx:
        raise ValueError("the direct_split backward computes no input gradient (need_dx=False only)")
    n, cout, plane = g.n, g.cout, g.oh * g.ow
    dy3 = np.ascontiguousarray(dy).reshape(n, cout, plane)
    yr3 = dy3 if relu_out is None else np.ascontiguousarray(relu_out).reshape(n, cout, plane)
    dyk = np.empty((cout // PANEL, n * plane, PANEL), dtype=np.float32)
    dbp = np.empty((n, cout), dtype=np.float64)
    _pack_dy_nchw(dy3, yr3, relu_out is not None, dyk, dbp)
    _weight_grad(x, dyk, dw, g, accumulate, nthreads)
    if db is not None:
        total = dbp.sum(axis=0)
        db[...] = (db + total) if accumulate else total
    return None


def forward_bf16(x, w, b, g, relu, nthreads):
    """Path `direct_bf16`, forward: the `direct` forward with x and w rounded to bfloat16 pairs of
    input channels and one vdpbf16ps (32 products, float32 sums) per pair of 32-lane steps;
    Cin even, Cout a multiple of 32, stride 1. Without AVX512_BF16 (or MINIALEX_BF16=emulate)
    the float32 kernel on the rounded values, slower."""
    n, cin, cout, kh, kw = g.n, g.cin, g.cout, g.kh, g.kw
    y = np.empty((n, cout, g.oh, g.ow), dtype=np.float32)
    xp = np.empty((n, g.h + 2 * g.ph, g.w + 2 * g.pw, cin), dtype=np.float32)
    to_padded_nhwc(x, x, False, g.ph, g.pw, xp)
    wpk = np.empty((cout // PANEL, kh * kw, cin, PANEL), dtype=np.float32)
    _pack_weights_taps(np.ascontiguousarray(w), False, wpk)
    out = _run_bf16(xp, wpk, kh, kw, n * g.oh * g.ow, g.oh, g.ow, cout, nthreads)
    from_nhwc(out.reshape(-1), cout, b, relu, y.reshape(n, cout, g.oh * g.ow))
    return y


def input_grad_bf16(dy, w, g, relu_out, nthreads):
    """Path `direct_bf16`, input gradient: dy (masked where relu_out <= 0) and the flipped
    weights rounded to bf16 pairs of output channels, through the forward's kernel; Cout even,
    Cin a multiple of 32, stride 1."""
    n, cin, cout, kh, kw = g.n, g.cin, g.cout, g.kh, g.kw
    qh, qw = kh - 1 - g.ph, kw - 1 - g.pw
    dyp = np.empty((n, g.oh + 2 * qh, g.ow + 2 * qw, cout), dtype=np.float32)
    yr = dy if relu_out is None else np.ascontiguousarray(relu_out)
    to_padded_nhwc(np.ascontiguousarray(dy), yr, relu_out is not None, qh, qw, dyp)
    wpk = np.empty((cin // PANEL, kh * kw, cout, PANEL), dtype=np.float32)
    _pack_weights_taps(np.ascontiguousarray(w), True, wpk)
    out = _run_bf16(dyp, wpk, kh, kw, n * g.h * g.w, g.h, g.w, cin, nthreads)
    dx = np.empty((n, cin, g.h, g.w), dtype=np.float32)
    from_nhwc(out.reshape(-1), cin, None, False, dx.reshape(n, cin, g.h * g.w))
    return dx
