"""2-D convolution (PyTorch Conv2d semantics, groups included): picks the path for each call.

float32 with output channels in panels of 32 goes to conv_direct.py: stride 1 (conv2-conv5)
forward and backward, other strides (conv1) forward, and the backward of a layer whose input
gradient is not wanted (conv1: weight and bias gradients only). The rest of float32 goes
through conv_blocked.py: per thread, blocks of ~1024 columns are unfolded, multiplied and
rectified while in cache, in one parallel region per call (backward too, when there is at
least one image per thread). The batched im2col + GEMM path below serves float64 (gradient
checks) and float32 backward with fewer images than threads.

Batched path, per batch chunk of Nc images:
    cols (K, Nc*P) = im2col(x chunk)          K = Cin*kh*kw, P = OH*OW
    Y_g (Cout/g, Nc*P) = W_g (Cout/g, K/g) @ cols[rows of group g]
    y[n, co, p] = Y[co, n*P + p] + b[co]      (reorder fused with the bias add)
Backward reorders dy the same way (fused with the bias-gradient sum), then
    dW_g += dY_g @ cols_g.T                   dcols_g = W_g.T @ dY_g ;  dx = col2im(dcols)
The batch is processed in chunks so the column buffer stays under _COLS_BYTES.
"""
import numba
import numpy as np
from numba import njit, prange

from minialex.kernels import conv_blocked, conv_direct
from minialex.kernels.gemm import gemm
from minialex.kernels.im2col import col2im, im2col
from minialex.shapes import conv_output_size, pair

# Upper bound for one column buffer; AlexNet conv1 at batch 8 needs ~35 MB in float32.
_COLS_BYTES = 64 * 1024 * 1024


def _chunk_size(n, k_rows, plane, itemsize):
    per_image = max(1, k_rows * plane * itemsize)
    return int(max(1, min(n, _COLS_BYTES // per_image)))


def _check(x, w, groups):
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d expects x (N,C,H,W) and w (Cout,Cin/g,kh,kw), got {x.shape}, {w.shape}")
    cin = x.shape[1]
    cout, cin_g = w.shape[0], w.shape[1]
    if cin % groups or cout % groups or cin // groups != cin_g:
        raise ValueError(f"groups={groups} does not split x channels {cin} / weight {w.shape}")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w dtypes differ: {x.dtype} vs {w.dtype}")


@njit(parallel=True, cache=True)
def _scatter_bias(yc, y, b, has_bias, relu):
    # yc: (Cout, Nc*P) GEMM output ; y: (Nc, Cout, P) view of the output chunk ; b: (Cout,)
    # relu: apply max(., 0) in the same pass (Conv2d followed by ReLU)
    nc, cout, plane = y.shape
    for task in prange(nc * cout):
        n = task // cout
        co = task - n * cout
        src = yc[co, n * plane:(n + 1) * plane]
        dst = y[n, co]
        bv = b[co] if has_bias else 0.0
        if relu:
            for p in range(plane):
                v = src[p] + bv
                # as relu_forward: "<= 0" so a NaN passes through, as in torch.relu
                dst[p] = 0.0 if v <= 0.0 else v
        else:
            for p in range(plane):
                dst[p] = src[p] + bv


@njit(parallel=True, cache=True)
def _gather_dy(dy, dyc, db, want_db, y, relu):
    # dy: (Nc, Cout, P) chunk of the output grad ; dyc: (Cout, Nc*P) ; db: (Cout,) accumulated
    # relu: y (Nc, Cout, P) is the rectified output; dy passes only where y > 0 (fused ReLU backward)
    nc, cout, plane = dy.shape
    for co in prange(cout):
        acc = 0.0
        for n in range(nc):
            src = dy[n, co]
            dst = dyc[co, n * plane:(n + 1) * plane]
            if relu:
                yr = y[n, co]
                for p in range(plane):
                    v = 0.0 if yr[p] <= 0.0 else src[p]  # as relu_backward
                    dst[p] = v
                    acc += v
            else:
                for p in range(plane):
                    v = src[p]
                    dst[p] = v
                    acc += v
        if want_db:
            db[co] += acc


def conv2d_forward(x, w, b, stride, padding, groups, relu=False):
    """y = conv2d(x, w, b) like torch.nn.functional.conv2d (no dilation); relu(conv2d(...))
    in the same pass when relu=True.

    x: (N, Cin, H, W) ; w: (Cout, Cin/groups, kh, kw) ; b: (Cout,) or None
    stride, padding: int or (h, w). Returns y: (N, Cout, OH, OW) of x's dtype.
    """
    stride, padding = pair(stride), pair(padding)
    _check(x, w, groups)
    x = np.ascontiguousarray(x)
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    oh, ow = conv_output_size(h, wd, kh, kw, stride, padding)
    if x.dtype == np.float32:
        if n == 0:  # an empty batch (the blocked path would split nothing between threads)
            return np.empty((0, cout, oh, ow), dtype=np.float32)
        if (conv_direct.supported(x, w, stride, groups, padding)
                and oh * ow < conv_direct.SPLIT_MIN_PLANE):
            return conv_direct.forward(x, w, b, stride, padding, relu, numba.get_num_threads())
        if conv_direct.supported_split(x, w, stride, groups, padding):
            # strided (conv1) or large planes (conv2): direct on a phase-split copy, NCHW out
            return conv_direct.forward_split(x, w, b, stride, padding, relu, numba.get_num_threads())
        return conv_blocked.forward(x, w, b, stride, padding, groups, relu, numba.get_num_threads())
    plane = oh * ow
    k_rows = cin * kh * kw
    kg = cin_g * kh * kw
    cout_g = cout // groups
    w2 = np.ascontiguousarray(w).reshape(cout, kg)
    bias = np.zeros(1, dtype=x.dtype) if b is None else np.ascontiguousarray(b, dtype=x.dtype)
    y = np.empty((n, cout, oh, ow), dtype=x.dtype)
    y3 = y.reshape(n, cout, plane)
    nc = _chunk_size(n, k_rows, plane, x.itemsize)
    cols_buf = np.empty(k_rows * nc * plane, dtype=x.dtype)
    yc_buf = np.empty(cout * nc * plane, dtype=x.dtype)
    for n0 in range(0, n, nc):
        n1 = min(n, n0 + nc)
        m = (n1 - n0) * plane
        cols = im2col(x[n0:n1], kh, kw, stride, padding, out=cols_buf[:k_rows * m].reshape(k_rows, m))
        yc = yc_buf[:cout * m].reshape(cout, m)
        for g in range(groups):
            gemm(w2[g * cout_g:(g + 1) * cout_g], cols[g * kg:(g + 1) * kg],
                 out=yc[g * cout_g:(g + 1) * cout_g])
        _scatter_bias(yc, y3[n0:n1], bias, b is not None, relu)
    return y


def conv2d_backward(dy, x, w, dw, db, stride, padding, groups, need_dx=True, accumulate=True,
                    relu_out=None):
    """Backward of conv2d_forward: accumulates dw (and db unless None), returns dx or None.
    With accumulate=False dw and db are overwritten instead (a freshly zeroed gradient).
    relu_out: the output of a forward with relu=True; dy is then the gradient of that
    rectified output and the ReLU backward happens in the same pass.

    dy: (N, Cout, OH, OW) ; x: (N, Cin, H, W) ; w, dw: (Cout, Cin/groups, kh, kw) ; db: (Cout,) or None
    """
    stride, padding = pair(stride), pair(padding)
    _check(x, w, groups)
    x = np.ascontiguousarray(x)
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    oh, ow = conv_output_size(h, wd, kh, kw, stride, padding)
    if dy.shape != (n, cout, oh, ow):
        raise ValueError(f"dy shape {dy.shape} != expected {(n, cout, oh, ow)}")
    if n == 0:   # an empty batch adds nothing; "overwrite" means zero
        if not accumulate:
            dw[...] = 0
            if db is not None:
                db[...] = 0
        return np.zeros_like(x) if need_dx else None
    plane = oh * ow
    k_rows = cin * kh * kw
    kg = cin_g * kh * kw
    cout_g = cout // groups
    w2 = np.ascontiguousarray(w).reshape(cout, kg)
    # accumulate straight into dw when it can be viewed as (Cout, K/g), else through a scratch
    direct = dw.flags.c_contiguous and dw.dtype == x.dtype
    dw2 = dw.reshape(cout, kg) if direct else np.zeros((cout, kg), dtype=x.dtype)
    nthreads = numba.get_num_threads()
    if (conv_direct.supported_backward(x, w, stride, groups, padding) and dw.flags.c_contiguous
            and dw.dtype == np.float32 and (db is None or db.dtype == np.float32)):
        # stride 1: both gradients straight from channels-last copies, no im2col (conv_direct.py)
        return conv_direct.backward(dy, x, w, dw, db, padding, accumulate, need_dx, relu_out, nthreads)
    if not need_dx and conv_direct.supported_weight_grad(x, w, groups, dw, db):
        # the first layer (conv1): weight and bias gradients only, no column matrix
        return conv_direct.weight_grad(dy, x, w, dw, db, stride, padding, accumulate, relu_out, nthreads)
    if x.dtype == np.float32 and n >= nthreads:
        dx, db_sum = conv_blocked.backward(dy, x, w, dw2, stride, padding, groups,
                                           accumulate and direct, need_dx, relu_out, nthreads)
        _store_grads(dw, dw2, db, db_sum, direct, accumulate)
        return dx
    db_acc = np.zeros(cout, dtype=np.float64) if db is not None else np.zeros(1, dtype=np.float64)
    dy3 = dy.reshape(n, cout, plane)
    yr3 = dy3 if relu_out is None else np.ascontiguousarray(relu_out).reshape(n, cout, plane)
    dx = np.empty((n, cin, h, wd), dtype=x.dtype) if need_dx else None
    nc = _chunk_size(n, k_rows, plane, x.itemsize)
    cols_buf = np.empty(k_rows * nc * plane, dtype=x.dtype)
    dyc_buf = np.empty(cout * nc * plane, dtype=x.dtype)
    for n0 in range(0, n, nc):
        n1 = min(n, n0 + nc)
        m = (n1 - n0) * plane
        dyc = dyc_buf[:cout * m].reshape(cout, m)
        _gather_dy(dy3[n0:n1], dyc, db_acc, db is not None, yr3[n0:n1], relu_out is not None)
        cols = im2col(x[n0:n1], kh, kw, stride, padding, out=cols_buf[:k_rows * m].reshape(k_rows, m))
        for g in range(groups):
            gemm(dyc[g * cout_g:(g + 1) * cout_g], cols[g * kg:(g + 1) * kg],
                 out=dw2[g * cout_g:(g + 1) * cout_g], trans_b=True,
                 accumulate=accumulate or n0 > 0 or not direct)
        if need_dx:
            # the column buffer is free again: reuse it for the column gradient
            for g in range(groups):
                gemm(w2[g * cout_g:(g + 1) * cout_g], dyc[g * cout_g:(g + 1) * cout_g],
                     out=cols[g * kg:(g + 1) * kg], trans_a=True)
            dx[n0:n1] = col2im(cols, (n1 - n0, cin, h, wd), kh, kw, stride, padding)
    _store_grads(dw, dw2, db, db_acc, direct, accumulate)
    return dx


def _store_grads(dw, dw2, db, db_sum, direct, accumulate):
    # dw2 already holds dw's new value when direct, else the gradient of this call alone
    if not direct:
        if accumulate:
            dw += dw2.reshape(dw.shape)
        else:
            dw[...] = dw2.reshape(dw.shape)
    if db is not None:
        if accumulate:
            db += db_sum.astype(db.dtype)
        else:
            db[...] = db_sum


def conv2d_forward_ref(x, w, b, stride, padding, groups, relu=False):
    """NumPy reference twin of conv2d_forward, written as a direct sum over kernel taps."""
    sh, sw = pair(stride)
    ph, pw = pair(padding)
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    oh, ow = conv_output_size(h, wd, kh, kw, (sh, sw), (ph, pw))
    cout_g = cout // groups
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.zeros((n, cout, oh, ow), dtype=x.dtype)
    for g in range(groups):
        xg = xp[:, g * cin_g:(g + 1) * cin_g]
        wg = w[g * cout_g:(g + 1) * cout_g]
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
                y[:, g * cout_g:(g + 1) * cout_g] += np.einsum("nchw,oc->nohw", patch, wg[:, :, i, j])
    if b is not None:
        y += b.reshape(1, cout, 1, 1)
    return np.where(y <= 0, 0, y) if relu else y


def conv2d_backward_ref(dy, x, w, dw, db, stride, padding, groups, need_dx=True, accumulate=True,
                        relu_out=None):
    """NumPy reference twin of conv2d_backward (same accumulate semantics)."""
    if relu_out is not None:
        dy = np.where(relu_out <= 0, 0, dy)
    if not accumulate:
        dw[...] = 0
        if db is not None:
            db[...] = 0
    sh, sw = pair(stride)
    ph, pw = pair(padding)
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    oh, ow = dy.shape[2], dy.shape[3]
    cout_g = cout // groups
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dxp = np.zeros_like(xp)
    for g in range(groups):
        cs = slice(g * cin_g, (g + 1) * cin_g)
        os_ = slice(g * cout_g, (g + 1) * cout_g)
        for i in range(kh):
            for j in range(kw):
                hs = slice(i, i + sh * (oh - 1) + 1, sh)
                ws = slice(j, j + sw * (ow - 1) + 1, sw)
                dw[os_, :, i, j] += np.einsum("nohw,nchw->oc", dy[:, os_], xp[:, cs, hs, ws])
                dxp[:, cs, hs, ws] += np.einsum("nohw,oc->nchw", dy[:, os_], w[os_, :, i, j])
    if db is not None:
        db += dy.sum(axis=(0, 2, 3))
    if not need_dx:
        return None
    return dxp[:, :, ph:ph + h, pw:pw + wd].copy()
