"""im2col / col2im: unfold image patches into GEMM columns and scatter them back (the
blocked and batched convolution paths).

Layout:
    cols[c*kh*kw + i*kw + j, n*OH*OW + oh*OW + ow] = x[n, c, oh*sh - ph + i, ow*sw - pw + j]
with zeros where the tap falls into the padding. Rows are ordered channel-major, so the rows of
one convolution group are a contiguous row block.

Inputs are read through a phase-split padded copy (conv/layout.py), so every (tap, output row)
pair is one contiguous run with no padding tests, whatever the stride. Inner loops run over
0-based counters into 1-D views whose offset is already applied: Numba's wrap-around select on
signed indices would otherwise stop them vectorising.

im2col_rows / col2im_rows are the serial float32 block versions the blocked path calls from
inside its own parallel loop: flat indices (per-row views cost more in reference counting than
the copies on small planes) and whole 16-lane vectors.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from minialex.kernels.simd import LANES, f32x16, vadd, vload, vstore, vzero
from minialex.kernels.conv.layout import padded_to_image, split_copy, split_width
from minialex.shapes import conv_output_size

_lane_ty = ir.VectorType(ir.IntType(32), LANES)
_vec_ty = ir.VectorType(ir.FloatType(), LANES)


@intrinsic
def _vload_head(typingctx, arr, idx, n):
    """arr[idx : idx + n] in the first n lanes (0 <= n <= 16) and zeros in the rest; the
    lanes past n are not read (llvm.masked.load), so the run may end at the buffer's end."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32
            and isinstance(idx, types.Integer) and isinstance(n, types.Integer)):
        return None
    sig = f32x16(arr, idx, n)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [context.cast(builder, args[1], signature.args[1], types.intp)])
        count = context.cast(builder, args[2], signature.args[2], types.int32)
        i32 = ir.IntType(32)
        undef = ir.Constant(_lane_ty, ir.Undefined)
        splat = builder.shuffle_vector(builder.insert_element(undef, count, ir.Constant(i32, 0)),
                                       undef, ir.Constant(_lane_ty, [0] * LANES))
        mask = builder.icmp_signed("<", ir.Constant(_lane_ty, list(range(LANES))), splat)
        vptr = builder.bitcast(ptr, _vec_ty.as_pointer())
        fnty = ir.FunctionType(_vec_ty, [_vec_ty.as_pointer(), i32, mask.type, _vec_ty])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.load.v16f32.p0")
        return builder.call(fn, [vptr, ir.Constant(i32, 4), mask, ir.Constant(_vec_ty, [0.0] * LANES)])

    return sig, codegen


@njit(cache=True)
def _plane_taps(cols, buf, c, n, kh, kw, sh, sw, oh_n, ow_n, gather):
    # the runs of one (c, n) plane: cols[(c*kh + i)*kw + j, n*plane + oh*OW + t] and the
    # phase-split padded plane buf[oh*sh + i, j % sw, j // sw + t] ; gather: cols = buf (im2col),
    # else buf += cols (col2im, taps added in (i, j) order)
    plane = oh_n * ow_n
    for i in range(kh):
        for j in range(kw):
            r = j % sw
            q0 = j // sw
            row = cols[(c * kh + i) * kw + j, n * plane:(n + 1) * plane]
            for oh in range(oh_n):
                run = row[oh * ow_n:(oh + 1) * ow_n]
                b = buf[oh * sh + i, r, q0:q0 + ow_n]
                if gather:
                    for t in range(ow_n):
                        run[t] = b[t]
                else:
                    for t in range(ow_n):
                        b[t] += run[t]


@njit(parallel=True, cache=True)
def _im2col_kernel(xq, cols, kh, kw, sh, sw, oh_n, ow_n):
    # xq: (N, C, Hp, sw, Wq) phase-split padded x (layout.pad_split) ; cols: (C*kh*kw, N*OH*OW)
    # one (c, n) pair owns rows c*kh*kw.. and columns n*plane..: writes never overlap
    n_img, n_ch = xq.shape[0], xq.shape[1]
    for task in prange(n_ch * n_img):
        c = task // n_img
        n = task - c * n_img
        _plane_taps(cols, xq[n, c], c, n, kh, kw, sh, sw, oh_n, ow_n, True)


@njit(parallel=True, cache=True)
def _col2im_kernel(cols, dx, kh, kw, sh, sw, ph, pw, oh_n, ow_n):
    # cols: (C*kh*kw, N*OH*OW) ; dx: (N, C, H, W), overwritten
    # scatter-add partitioned by (n, c) planes: each task owns one dx plane and accumulates
    # into a private padded, phase-split buffer (the transpose of the im2col gather)
    n_img, n_ch, h, w = dx.shape
    wq = split_width(w, pw, sw, kw)
    for task in prange(n_ch * n_img):
        c = task // n_img
        n = task - c * n_img
        buf = np.zeros((h + 2 * ph, sw, wq), dtype=dx.dtype)
        _plane_taps(cols, buf, c, n, kh, kw, sh, sw, oh_n, ow_n, False)
        padded_to_image(buf.reshape(-1), dx[n, c:c + 1], ph, pw, sw, wq)


@njit(cache=True)
def _fill_padded_rows(xf, x0, h, w, buf, top, nrows, sw, pw, wq):
    # xf: flat input, plane (H, W) from x0 ; buf: flat (nrows, sw, wq) zero-padded, phase-split
    # rows top..top+nrows: padded column q = m*sw + r lands at buf[row, r, m].
    # Flat indices only: taking numpy views per row costs reference-count updates that took
    # longer than the copies themselves on conv4's 384 small planes.
    run = sw * wq
    for rr in range(nrows):
        d_row = rr * run
        ih = top + rr
        if ih < 0 or ih >= h:
            for k in range(run):
                buf[d_row + k] = 0.0
            continue
        s_row = x0 + ih * w
        for r in range(sw):
            d = d_row + r * wq
            m_lo = (pw - r + sw - 1) // sw if pw > r else 0
            m_hi = min(wq, (w - 1 + pw - r) // sw + 1)
            for m in range(m_lo):
                buf[d + m] = 0.0
            if m_hi > m_lo:
                s = s_row + m_lo * sw + r - pw
                cnt = m_hi - m_lo
                if sw == 1:
                    # whole vectors, the last one masked at the row's end; lanes written past
                    # the run are zeroed below or belong to rows written later
                    for v in range(0, cnt, LANES):
                        vstore(buf, d + m_lo + v, _vload_head(xf, s + v, min(LANES, cnt - v)))
                else:
                    for m in range(cnt):
                        buf[d + m_lo + m] = xf[s + m * sw]
            for m in range(max(m_lo, m_hi), wq):
                buf[d + m] = 0.0


@njit(cache=True)
def im2col_rows(xn, buf, cols, ld, off, oh0, oh1, kh, kw, sh, sw, ph, pw, ow_n):
    """Serial float32 im2col of output rows oh0..oh1 of one image into a column block.

    xn: (C, H, W) C-contiguous ; buf: scratch of ((oh1-oh0-1)*sh + kh) * sw * wq + 16 elements, with
    wq = (W + 2*pw + sw - 1)//sw + kw ; cols: flat block, row k = c*kh*kw + i*kw + j at k*ld,
    columns off .. off + (oh1-oh0)*OW.
    Each run of OW columns is copied as whole 16-lane vectors, so up to 15 elements past the
    run are written too: they land on the next run or the next image's columns (written after
    this one) or on the row's tail, which is why ld must be at least the block width + 15 and
    cols needs 16 elements of slack at its end.
    """
    cin, h, w = xn.shape
    wq = split_width(w, pw, sw, kw)
    nrows = (oh1 - oh0 - 1) * sh + kh
    run = sw * wq
    nvec = (ow_n + LANES - 1) // LANES
    xf = xn.reshape(-1)
    for c in range(cin):
        _fill_padded_rows(xf, c * h * w, h, w, buf, oh0 * sh - ph, nrows, sw, pw, wq)
        for i in range(kh):
            for j in range(kw):
                d0 = ((c * kh + i) * kw + j) * ld + off
                s0 = i * run + (j % sw) * wq + j // sw
                for o in range(oh1 - oh0):
                    d = d0 + o * ow_n
                    s = s0 + o * sh * run
                    for v in range(nvec):
                        vstore(cols, d + v * LANES, vload(buf, s + v * LANES))


@njit(cache=True)
def col2im_rows(cols, ld, off, acc, oh0, oh1, n_ch, kh, kw, sh, sw, hp, wq, ow_n):
    """Serial float32 adjoint of im2col_rows: add a column block's output rows oh0..oh1 into acc.

    acc: flat (C, Hp, sw, wq) padded, phase-split gradient of one image (see padded_to_image),
    accumulated across the row blocks of that image by the one thread that owns it, with 16
    elements of slack at its end.
    Each padded row sums its kh taps in registers and is read and written once per 16 lanes
    (lanes past the run add zero, so they rewrite acc unchanged). Adding tap by tap instead
    re-reads a vector the previous tap has just stored one element to the left, a
    store-to-load forwarding stall per run.
    """
    run = sw * wq
    r_lo = oh0 * sh
    for c in range(n_ch):
        base = c * hp * run
        for j in range(kw):
            dcol = base + (j % sw) * wq + j // sw
            src = (c * kh * kw + j) * ld + off - oh0 * ow_n
            for pr in range(r_lo, (oh1 - 1) * sh + kh):
                d = dcol + pr * run
                # output rows o reaching padded row pr through tap row i = pr - o*sh < kh
                o_hi = min(oh1 - 1, pr // sh)
                o_lo = max(oh0, (pr - kh + sh) // sh)
                for v in range(0, ow_n, LANES):
                    cnt = min(LANES, ow_n - v)
                    tot = vzero()
                    for o in range(o_lo, o_hi + 1):
                        i = pr - o * sh
                        tot = vadd(tot, _vload_head(cols, src + i * kw * ld + o * ow_n + v, cnt))
                    vstore(acc, d + v, vadd(vload(acc, d + v), tot))


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
    xq = split_copy(np.ascontiguousarray(x), padding[0], padding[1], stride[1], kw)
    _im2col_kernel(xq, out, kh, kw, stride[0], stride[1], oh, ow)
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
