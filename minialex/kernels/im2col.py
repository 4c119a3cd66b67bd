"""im2col / col2im: unfold image patches into GEMM columns and scatter them back.

Layout (shared with conv.py):
    cols[c*kh*kw + i*kw + j, n*OH*OW + oh*OW + ow] = x[n, c, oh*sh - ph + i, ow*sw - pw + j]
with zeros where the tap falls into the padding. Rows are ordered channel-major, so the rows of
one convolution group are a contiguous row block.

Speed notes. Numba guards every signed index with a wrap-around select (``i < 0 ? i + n : i``)
unless LLVM can prove the index non-negative, and that select stops the inner loop from
vectorising. The inner loops therefore run over 0-based ``range`` counters into 1-D views whose
start offset has already been applied; the valid output range of every tap row is computed once
so the inner loops carry no bounds tests either.
"""
import numpy as np
from numba import njit, prange


def conv_output_size(h, w, kh, kw, stride, padding):
    """Output (oh, ow) of a convolution / im2col with (h, w) stride and padding tuples."""
    sh, sw = stride
    ph, pw = padding
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (w + 2 * pw - kw) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"kernel ({kh}, {kw}) larger than padded input ({h + 2 * ph}, {w + 2 * pw})")
    return oh, ow


@njit(cache=True, inline="always")
def _valid_range(k, s, p, size, osize):
    """Outputs o with 0 <= o*s - p + k < size, as a half-open range [lo, hi)."""
    # o*s >= p - k  ->  o >= ceil((p - k) / s)
    lo = 0
    if p - k > 0:
        lo = (p - k + s - 1) // s
    # o*s <= size - 1 + p - k  ->  o <= floor((size - 1 + p - k) / s)
    top = size - 1 + p - k
    if top < 0:
        hi = 0
    else:
        hi = top // s + 1
    if hi > osize:
        hi = osize
    if lo > hi:
        lo = hi
    return lo, hi


@njit(parallel=True, cache=True)
def _im2col_kernel(x, cols, kh, kw, sh, sw, ph, pw, oh_n, ow_n):
    # x: (N, C, H, W) ; cols: (C*kh*kw, N*OH*OW)
    n_img, n_ch, h, w = x.shape
    plane = oh_n * ow_n
    # one (c, n) pair owns rows c*kh*kw.. and columns n*plane..: writes never overlap
    for task in prange(n_ch * n_img):
        c = task // n_img
        n = task - c * n_img
        xp = x[n, c]
        for i in range(kh):
            oh_lo, oh_hi = _valid_range(i, sh, ph, h, oh_n)
            for j in range(kw):
                ow_lo, ow_hi = _valid_range(j, sw, pw, w, ow_n)
                cnt = ow_hi - ow_lo
                row = cols[(c * kh + i) * kw + j, n * plane:(n + 1) * plane]
                # padding rows above / below
                for t in range(oh_lo * ow_n):
                    row[t] = 0
                for t in range(oh_hi * ow_n, plane):
                    row[t] = 0
                for oh in range(oh_lo, oh_hi):
                    dst = row[oh * ow_n:(oh + 1) * ow_n]
                    for t in range(ow_lo):
                        dst[t] = 0
                    for t in range(ow_hi, ow_n):
                        dst[t] = 0
                    if cnt <= 0:
                        continue
                    d = dst[ow_lo:ow_hi]
                    iw0 = ow_lo * sw - pw + j
                    srow = xp[oh * sh - ph + i]
                    if sw == 1:
                        s = srow[iw0:iw0 + cnt]
                        for t in range(cnt):
                            d[t] = s[t]
                    else:
                        s = srow[iw0:iw0 + (cnt - 1) * sw + 1:sw]
                        for t in range(cnt):
                            d[t] = s[t]


@njit(parallel=True, cache=True)
def _col2im_kernel(cols, dx, kh, kw, sh, sw, ph, pw, oh_n, ow_n):
    # cols: (C*kh*kw, N*OH*OW) ; dx: (N, C, H, W), overwritten
    n_img, n_ch, h, w = dx.shape
    plane = oh_n * ow_n
    # scatter-add partitioned by (n, c) planes: each task owns one dx plane
    for task in prange(n_ch * n_img):
        c = task // n_img
        n = task - c * n_img
        dp = dx[n, c]
        for ih in range(h):
            r = dp[ih]
            for t in range(w):
                r[t] = 0
        for i in range(kh):
            oh_lo, oh_hi = _valid_range(i, sh, ph, h, oh_n)
            for j in range(kw):
                ow_lo, ow_hi = _valid_range(j, sw, pw, w, ow_n)
                cnt = ow_hi - ow_lo
                if cnt <= 0:
                    continue
                row = cols[(c * kh + i) * kw + j, n * plane:(n + 1) * plane]
                iw0 = ow_lo * sw - pw + j
                for oh in range(oh_lo, oh_hi):
                    s = row[oh * ow_n + ow_lo:oh * ow_n + ow_hi]
                    drow = dp[oh * sh - ph + i]
                    if sw == 1:
                        d = drow[iw0:iw0 + cnt]
                        for t in range(cnt):
                            d[t] += s[t]
                    else:
                        d = drow[iw0:iw0 + (cnt - 1) * sw + 1:sw]
                        for t in range(cnt):
                            d[t] += s[t]


def im2col(x, kh, kw, stride, padding, out=None):
    """Unfold patches of x into columns.

    x: (N, C, H, W) float32/float64. stride, padding: (h, w) tuples.
    out: optional C-contiguous (C*kh*kw, N*OH*OW) buffer of x's dtype.
    Returns cols: (C*kh*kw, N*OH*OW).
    """
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, w, kh, kw, stride, padding)
    shape = (c * kh * kw, n * oh * ow)
    if out is None:
        out = np.empty(shape, dtype=x.dtype)
    elif out.shape != shape or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {shape} {x.dtype}, got {out.shape} {out.dtype}")
    _im2col_kernel(np.ascontiguousarray(x), out, kh, kw, stride[0], stride[1],
                   padding[0], padding[1], oh, ow)
    return out


def col2im(cols, x_shape, kh, kw, stride, padding):
    """Scatter-add columns back into an image (the adjoint of im2col).

    cols: (C*kh*kw, N*OH*OW). x_shape: (N, C, H, W). Returns dx: (N, C, H, W) of cols' dtype.
    """
    n, c, h, w = x_shape
    oh, ow = conv_output_size(h, w, kh, kw, stride, padding)
    if cols.shape != (c * kh * kw, n * oh * ow):
        raise ValueError(f"cols shape {cols.shape} does not match x_shape {tuple(x_shape)}")
    dx = np.empty((n, c, h, w), dtype=cols.dtype)
    _col2im_kernel(np.ascontiguousarray(cols), dx, kh, kw, stride[0], stride[1],
                   padding[0], padding[1], oh, ow)
    return dx


def im2col_ref(x, kh, kw, stride, padding):
    """NumPy reference twin of im2col. x: (N, C, H, W) -> (C*kh*kw, N*OH*OW)."""
    n, c, h, w = x.shape
    sh, sw = stride
    ph, pw = padding
    oh, ow = conv_output_size(h, w, kh, kw, stride, padding)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = np.empty((c, kh, kw, n, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            cols[:, i, j] = patch.transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * oh * ow)


def col2im_ref(cols, x_shape, kh, kw, stride, padding):
    """NumPy reference twin of col2im. cols: (C*kh*kw, N*OH*OW) -> dx: (N, C, H, W)."""
    n, c, h, w = x_shape
    sh, sw = stride
    ph, pw = padding
    oh, ow = conv_output_size(h, w, kh, kw, stride, padding)
    c6 = cols.reshape(c, kh, kw, n, oh, ow)
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += \
                c6[:, i, j].transpose(1, 0, 2, 3)
    return dxp[:, :, ph:ph + h, pw:pw + w].copy()
