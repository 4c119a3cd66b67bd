"""MaxPool2d (PyTorch semantics): -inf padding, ceil_mode, first-maximum argmax, NaN propagation.

argmax holds, per output, the flat index ih*W + iw of the chosen input inside its (n, c) plane,
as torch's return_indices does. Like torch's CPU kernel a NaN always wins (the last NaN of a
window is taken), otherwise the first maximum in row-major window order.
"""
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from minialex.kernels.simd import LANES, vadd, veven, vload, vmax_index, vodd, vsplat, vstore, vstore_int64
from minialex.shapes import pair, pool2d_output_size

EXACT = 1 << 24   # flat indices below this are exact in float32
_STEP2 = np.arange(0, 2 * LANES, 2, dtype=np.float32)   # window columns of 16 outputs: 0, 2, ..., 30


@njit(cache=True)
def _window_max(xp, w, h0, h1, w0, w1):
    # (max, flat index) over rows h0..h1, columns w0..w1 of the plane xp: first maximum in
    # row-major order, except that a NaN always wins (the last NaN seen)
    best = -np.inf
    idx = h0 * w + w0
    for ih in range(h0, h1):
        row = xp[ih]
        for iw in range(w0, w1):
            v = row[iw]
            if v > best or np.isnan(v):
                best = v
                idx = ih * w + iw
    return best, idx


@njit(cache=True)
def _tap(row, c, i, best, idx):
    # one window tap without a branch: take row[c] when it is larger or NaN
    v = row[c]
    take = (v > best) | (v != v)
    return (v if take else best), (i if take else idx)


@njit(cache=True)
def _row_3x3_s2(r0, r1, r2, i0, w, yo, ao, n):
    # n outputs of a row of 3x3 stride-2 windows lying inside the plane ; r0, r1, r2: the three
    # input rows from the first window's left column ; i0: flat index of that column in row r0
    # yo, ao: the outputs from the first such window. Stride and offsets are constants and every
    # index starts at 0, so the compiler vectorises the loop (strided loads, selects).
    for q in range(n):
        c = 2 * q
        i = i0 + c
        best, idx = r0[c], i
        best, idx = _tap(r0, c + 1, i + 1, best, idx)
        best, idx = _tap(r0, c + 2, i + 2, best, idx)
        best, idx = _tap(r1, c, i + w, best, idx)
        best, idx = _tap(r1, c + 1, i + w + 1, best, idx)
        best, idx = _tap(r1, c + 2, i + w + 2, best, idx)
        best, idx = _tap(r2, c, i + 2 * w, best, idx)
        best, idx = _tap(r2, c + 1, i + 2 * w + 1, best, idx)
        best, idx = _tap(r2, c + 2, i + 2 * w + 2, best, idx)
        yo[q] = best
        ao[q] = idx


def _row_3x3_s2_any(xf, off, i0, w, yr, ar, a, n, room):
    """n outputs yr[a:a+n], ar[a:a+n] of a row of 3x3 stride-2 windows inside the plane, the
    first window's top-left input at xf[off] (flat index i0 in its plane); room: outputs of
    the plane from yr[a] on, which this task writes later (overload below, per dtype)."""


@overload(_row_3x3_s2_any)
def _row_3x3_s2_dispatch(xf, off, i0, w, yr, ar, a, n, room):
    if xf.dtype != types.float32:
        def scalar(xf, off, i0, w, yr, ar, a, n, room):
            _row_3x3_s2(xf[off:], xf[off + w:], xf[off + 2 * w:], i0, w, yr[a:], ar[a:], n)
        return scalar

    def simd(xf, off, i0, w, yr, ar, a, n, room):
        _row_3x3_s2_f32(xf, off, i0, w, yr, ar, a, n, room)
    return simd


@njit(cache=True)
def _row_3x3_s2_f32(xf, off, i0, w, yr, ar, a, n, room):
    # float32: 16 outputs at a time. Per input row, the 32 floats from a window's left column
    # split into even columns (each window's left tap), odd ones (its middle tap) and the even
    # ones two further on (its right tap); the nine taps in row-major order through vmax_index,
    # flat indices as exact float32. A vector may read up to 34 floats past its first window
    # and write 16 outputs: near the end of x or of the plane's outputs the scalar rows finish.
    step2 = vload(_STEP2, 0)
    one, two = vsplat(np.float32(1.0)), vsplat(np.float32(2.0))
    exact = i0 + 2 * w + 2 * n < EXACT
    for q0 in range(0, n, LANES):
        base = off + 2 * q0
        if not exact or base + 2 * w + 2 * LANES + 2 > xf.size or q0 + LANES > room:
            _row_3x3_s2(xf[base:], xf[base + w:], xf[base + 2 * w:], i0 + 2 * q0, w, yr[a + q0:], ar[a + q0:],
                        n - q0)
            return
        at = vadd(vsplat(np.float32(i0 + 2 * q0)), step2)
        best, bat = veven(vload(xf, base), vload(xf, base + LANES)), at    # the first tap
        for r in range(3):
            src = base + r * w
            lo, hi = vload(xf, src), vload(xf, src + LANES)
            if r > 0:
                best, bat = vmax_index(best, bat, veven(lo, hi), at)
            best, bat = vmax_index(best, bat, vodd(lo, hi), vadd(at, one))
            best, bat = vmax_index(best, bat, veven(vload(xf, src + 2), vload(xf, src + 2 + LANES)), vadd(at, two))
            at = vadd(at, vsplat(np.float32(w)))
        vstore(yr, a + q0, best)
        vstore_int64(ar, a + q0, bat)


@njit(parallel=True, cache=True)
def _maxpool_fwd(x, y, arg, kh, kw, sh, sw, ph, pw):
    # x: (N*C, H, W) ; y: (N*C, OH, OW) ; arg: (N*C, OH, OW) int64
    # 3x3 stride-2 windows inside the plane (all of AlexNet's) go through _row_3x3_s2_any: the
    # nine taps as selects instead of branches (with a branch per new maximum, random data
    # mispredicted about twice a window), across the row, in explicit 16-lane vectors for
    # float32. Same row-major tap order, so the same first maximum or last NaN is chosen as by
    # _window_max, which does the rest.
    planes, h, w = x.shape
    oh_n, ow_n = y.shape[1], y.shape[2]
    fast = kh == 3 and kw == 3 and sw == 2
    xf = x.reshape(-1)
    lo = min(ow_n, (pw + sw - 1) // sw)
    hi = max(lo, min(ow_n, (w + pw - kw) // sw + 1))
    for pl in prange(planes):
        xp = x[pl]
        for oh in range(oh_n):
            h0 = oh * sh - ph
            h1 = min(h0 + kh, h)
            h0 = max(h0, 0)
            yr = y[pl, oh]
            ar = arg[pl, oh]
            a, b = 0, 0
            if fast and h1 - h0 == 3:
                a, b = lo, hi
                c0 = a * sw - pw
                _row_3x3_s2_any(xf, (pl * h + h0) * w + c0, h0 * w + c0, w, yr, ar, a, b - a,
                                (oh_n - oh) * ow_n - a)
            for ow in range(ow_n):
                if a <= ow < b:
                    continue
                w0 = ow * sw - pw
                yr[ow], ar[ow] = _window_max(xp, w, h0, h1, max(w0, 0), min(w0 + kw, w))


@njit(parallel=True, cache=True)
def _maxpool_bwd(dy, arg, dx):
    # dy, arg: (N*C, OH*OW) ; dx: (N*C, H*W), overwritten; one task per plane, so no races
    planes, m = dy.shape
    hw = dx.shape[1]
    for pl in prange(planes):
        d = dx[pl]
        for t in range(hw):
            d[t] = 0
        g = dy[pl]
        a = arg[pl]
        for t in range(m):
            d[a[t]] += g[t]


def maxpool2d_forward(x, kernel, stride, padding, ceil_mode):
    """x: (N, C, H, W). kernel, stride, padding: int or (h, w).

    Returns (y, argmax): y (N, C, OH, OW) of x's dtype, argmax (N, C, OH, OW) int64.
    """
    kh, kw = pair(kernel)
    sh, sw = pair(stride)
    ph, pw = pair(padding)
    if ph * 2 > kh or pw * 2 > kw:
        raise ValueError(f"padding {padding} must be at most half of kernel {kernel}")
    n, c, h, w = x.shape
    oh, ow = pool2d_output_size(h, w, (kh, kw), (sh, sw), (ph, pw), ceil_mode)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input {x.shape} too small for max pool kernel {kernel}")
    xc = np.ascontiguousarray(x)
    y = np.empty((n, c, oh, ow), dtype=x.dtype)
    arg = np.empty((n, c, oh, ow), dtype=np.int64)
    _maxpool_fwd(xc.reshape(n * c, h, w), y.reshape(n * c, oh, ow), arg.reshape(n * c, oh, ow),
                 kh, kw, sh, sw, ph, pw)
    return y, arg


def maxpool2d_backward(dy, argmax, x_shape):
    """dy, argmax: (N, C, OH, OW) ; x_shape: (N, C, H, W). Returns dx: (N, C, H, W)."""
    n, c, h, w = x_shape
    dyc = np.ascontiguousarray(dy)
    a = np.ascontiguousarray(argmax)
    dx = np.empty((n, c, h, w), dtype=dyc.dtype)
    m = dyc.shape[2] * dyc.shape[3]
    _maxpool_bwd(dyc.reshape(n * c, m), a.reshape(n * c, m), dx.reshape(n * c, h * w))
    return dx


def maxpool2d_forward_ref(x, kernel, stride, padding, ceil_mode):
    """NumPy reference twin: pad with -inf, then take each window's first maximum (NaN wins)."""
    kh, kw = pair(kernel)
    sh, sw = pair(stride)
    ph, pw = pair(padding)
    n, c, h, w = x.shape
    oh, ow = pool2d_output_size(h, w, (kh, kw), (sh, sw), (ph, pw), ceil_mode)
    y = np.empty((n, c, oh, ow), dtype=x.dtype)
    arg = np.empty((n, c, oh, ow), dtype=np.int64)
    for i in range(oh):
        h0, h1 = max(i * sh - ph, 0), min(i * sh - ph + kh, h)
        for j in range(ow):
            w0, w1 = max(j * sw - pw, 0), min(j * sw - pw + kw, w)
            win = x[:, :, h0:h1, w0:w1].reshape(n, c, -1)
            first = np.argmax(win, axis=2)  # numpy's argmax returns the first NaN if any
            nan = np.isnan(win)
            # torch keeps the last NaN of the window
            last_nan = nan.shape[2] - 1 - np.argmax(nan[:, :, ::-1], axis=2)
            k = np.where(nan.any(axis=2), last_nan, first)
            y[:, :, i, j] = np.take_along_axis(win, k[:, :, None], axis=2)[:, :, 0]
            ww = w1 - w0
            arg[:, :, i, j] = (h0 + k // ww) * w + (w0 + k % ww)
    return y, arg


def maxpool2d_backward_ref(dy, argmax, x_shape):
    """NumPy reference twin: scatter-add dy to the argmax positions."""
    n, c, h, w = x_shape
    dx = np.zeros((n * c, h * w), dtype=dy.dtype)
    rows = np.repeat(np.arange(n * c), dy.shape[2] * dy.shape[3])
    np.add.at(dx, (rows, argmax.reshape(-1)), dy.reshape(-1))
    return dx.reshape(n, c, h, w)
