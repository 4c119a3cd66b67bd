"""Geometry of a convolution and the layouts its paths share, written once: the output size,
the phase-split padded copy of an input and the offset tables that walk it.

Phase split: a zero-padded row whose column m*s + r (r < s, the phase) is stored at [r][m].
A stride-s window's tap j then walks [j % s][ow + j // s], one element per output pixel
whatever the stride, so every path reads strided windows as contiguous runs; for s = 1 it is
the plain padded copy.
"""
import functools
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from minialex.kernels.simd import LANES, vadd, vkeep, vload, vrelu, vstore, vtranspose_8x16
from minialex.shapes import conv_output_size, pair


class Geometry(NamedTuple):
    """Sizes of one convolution call (all ints, so kernels take it as one argument)."""
    n: int
    cin: int
    h: int
    w: int
    cout: int
    cin_g: int   # input channels per group
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    oh: int
    ow: int
    groups: int


def geometry(x_shape, w_shape, stride, padding, groups):
    """The Geometry of a convolution of an (N, Cin, H, W) input with (Cout, Cin/g, kh, kw) weights."""
    n, cin, h, wd = x_shape
    cout, cin_g, kh, kw = w_shape
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    oh, ow = conv_output_size(h, wd, kh, kw, (sh, sw), (ph, pw))
    return Geometry(int(n), int(cin), int(h), int(wd), int(cout), int(cin_g), int(kh), int(kw),
                    sh, sw, ph, pw, oh, ow, int(groups))


@njit(cache=True)
def split_width(w, pw, sw, slack):
    """Columns per phase of a row of width w padded by pw on each side and split by phase sw,
    plus `slack` spare zero columns (the unfolding reads whole 16-lane vectors from these rows
    and takes kw spare columns; the direct paths read single elements and take none)."""
    return (w + 2 * pw + sw - 1) // sw + slack


@njit(parallel=True, cache=True)
def pad_split(x, top, left, s, xq):
    # x: (N, C, H, W) -> xq: (N, C, H + 2*top, s, Wq): padded row r, column m*s + ph of x
    # zero-padded (rows top.., columns left..) at xq[n, c, r, ph, m], zero outside.
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


@njit(cache=True)
def padded_to_image(acc, dxn, ph, pw, sw, wq):
    """dxn (C, H, W) = the interior of acc, a flat (C, Hp, sw, wq) padded, phase-split image
    (the inverse of pad_split for one image)."""
    n_ch, h, w = dxn.shape
    hp = h + 2 * ph
    run = sw * wq
    df = dxn.reshape(-1)
    for c in range(n_ch):
        for ih in range(h):
            s_row = (c * hp + ih + ph) * run
            d_row = (c * h + ih) * w
            for r in range(sw):
                m_lo = (pw - r + sw - 1) // sw if pw > r else 0
                m_hi = min(wq, (w - 1 + pw - r) // sw + 1)
                s = s_row + r * wq + m_lo
                d = d_row + m_lo * sw + r - pw
                for m in range(m_hi - m_lo):
                    df[d + m * sw] = acc[s + m]


@njit(parallel=True, cache=True)
def to_padded_nhwc(x, yr, relu, top, left, xp):
    # x: (N, C, H, W) -> xp: (N, hp, wp, cp), xp[n, top + h, left + w, c] = x[n, c, h, w] and zero
    # elsewhere (borders of any size, channels c >= C) ; relu: keep x only where yr (the forward's
    # rectified output, x's shape) is not <= 0 (a ReLU's backward, as torch's threshold_backward)
    # One task per padded row. Its pixels go 16 at a time through a small channels-last buffer
    # (8 channels x 16 pixels a register transpose; the channels past the last 8, and a block
    # whose 16-wide reads would run past x, one element at a time), copied out as one stream.
    n, c, h, w = x.shape
    hp, wp, cp = xp.shape[1], xp.shape[2], xp.shape[3]
    plane = h * w
    xf = x.reshape(-1)
    yf = yr.reshape(-1)
    c8 = c - c % 8
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
        rf = row.reshape(-1)
        tmp = np.empty(8 * LANES, dtype=np.float32)
        tt = np.zeros(LANES * cp, dtype=np.float32)   # a chunk's pixels, channels-last; padding zero
        for col0 in range(0, w, LANES):
            cols = min(LANES, w - col0)
            for cb in range(0, c, 8):
                src = ((b * c + cb) * h + ih) * w + col0
                if cb < c8 and src + 7 * plane + LANES <= xf.size:
                    if relu:
                        for k in range(8):
                            vstore(tmp, k * LANES, vkeep(vload(yf, src + k * plane), vload(xf, src + k * plane)))
                        vtranspose_8x16(tmp, 0, LANES, tt, cb, cp)
                    else:
                        vtranspose_8x16(xf, src, plane, tt, cb, cp)
                    continue
                for k in range(min(8, c - cb)):
                    s0 = src + k * plane
                    for j in range(cols):
                        tt[j * cp + cb + k] = 0.0 if relu and yf[s0 + j] <= 0.0 else xf[s0 + j]
            dst = (left + col0) * cp
            rf[dst:dst + cols * cp] = tt[:cols * cp]   # one contiguous stream of whole pixels


def from_nhwc(src, lds, b, relu, y):
    """src: flat (N*P, lds) float32 channels-last rows, lds >= C -> y: (N, C, P) = src transposed,
    + b[c] unless b is None, rectified when relu (as relu_forward: a NaN passes)."""
    bias = np.zeros(1, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    _from_nhwc(src, lds, bias, b is not None, relu, y)


@njit(parallel=True, cache=True)
def _from_nhwc(src, lds, bias, has_bias, relu, y):
    # from_nhwc with bias: (C,) float32, read only when has_bias. One task per image's 16
    # channels: 8 pixels x 16 channels a register transpose (bias and ReLU applied to the rows as
    # vectors first), the ragged pixel and channel edges one element at a time.
    n, c, plane = y.shape
    yf = y.reshape(-1)
    cb = (c + LANES - 1) // LANES
    for task in prange(n * cb):
        img, c0 = task // cb, task % cb * LANES
        s0 = img * plane * lds + c0
        d0 = (img * c + c0) * plane
        p8 = plane - plane % 8 if c0 + LANES <= c else 0
        tmp = np.empty(8 * LANES, dtype=np.float32)
        for p in range(0, p8, 8):
            if has_bias or relu:
                for k in range(8):
                    v = vload(src, s0 + (p + k) * lds)
                    if has_bias:
                        v = vadd(v, vload(bias, c0))
                    vstore(tmp, k * LANES, vrelu(v) if relu else v)
                vtranspose_8x16(tmp, 0, LANES, yf, d0 + p, plane)
            else:
                vtranspose_8x16(src, s0 + p * lds, lds, yf, d0 + p, plane)
        for ch in range(min(LANES, c - c0)):
            for p in range(p8, plane):
                v = src[s0 + p * lds + ch]
                if has_bias:
                    v += bias[c0 + ch]
                if relu and v <= 0.0:
                    v = np.float32(0.0)
                yf[d0 + ch * plane + p] = v


def split_copy(x, ph, pw, sw, slack):
    """x (N, C, H, W) as a new phase-split padded array (N, C, H + 2*ph, sw, Wq)."""
    n, c, h, w = x.shape
    xq = np.empty((n, c, h + 2 * ph, sw, split_width(w, pw, sw, slack)), dtype=x.dtype)
    pad_split(x, ph, pw, sw, xq)
    return xq


@functools.lru_cache(maxsize=32)
def column_offsets(cin, kh, kw, hp, s, wq):
    """(K,) offset of weight column k = (c*kh + i)*kw + j (the weight's own order) in a
    phase-split padded image (C, hp, s, wq), from an output pixel's base. Cached per layer."""
    c, i, j = np.meshgrid(np.arange(cin), np.arange(kh), np.arange(kw), indexing="ij")
    c, i, j = c.ravel(), i.ravel(), j.ravel()
    return (c * (hp * s * wq) + i * (s * wq) + (j % s) * wq + j // s).astype(np.int64)


@functools.lru_cache(maxsize=16)
def channels_last_offsets(kh, kw, wp, c):
    """(kh*kw*c,) offset of weight column (tap i*kw + j, channel ci) in a padded channels-last
    image (Hp, wp, c) from a pixel's window corner, (i*wp + j)*c + ci: the packed weights'
    [tap][channel] order (c counts pairs of channels for bf16 pairs)."""
    i, j, ci = np.meshgrid(np.arange(kh), np.arange(kw), np.arange(c), indexing="ij")
    return ((i * wp + j) * c + ci).astype(np.int64).ravel()


def pixel_offsets(n, oh, ow, step_n, step_oh):
    """(N*OH*OW,) base offset n*step_n + oh*step_oh + ow of each output pixel in a phase-split
    padded x. Cached: one per layer shape and batch size."""
    nn, hh, ww = np.meshgrid(np.arange(n), np.arange(oh), np.arange(ow), indexing="ij")
    return (nn * step_n + hh * step_oh + ww).astype(np.int64).ravel()
