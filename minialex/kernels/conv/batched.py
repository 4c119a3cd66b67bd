"""Path `batched`: im2col + GEMM over chunks of the batch, any dtype, groups, stride and
channel counts (float64 gradient checks, and float32 backward with fewer images than threads).

Per batch chunk of Nc images:
    cols (K, Nc*P) = im2col(x chunk)          K = Cin*kh*kw, P = OH*OW
    Y_g (Cout/g, Nc*P) = W_g (Cout/g, K/g) @ cols[rows of group g]
    y[n, co, p] = Y[co, n*P + p] + b[co]      (reorder fused with the bias add)
Backward reorders dy the same way (fused with the bias-gradient sum), then
    dW_g += dY_g @ cols_g.T                   dcols_g = W_g.T @ dY_g ;  dx = col2im(dcols)
The batch is processed in chunks so the column buffer stays under _COLS_BYTES.

Path `bf16` is the same with every product on the bf16 GEMM (kernels.gemm_bf16: operands
rounded to bfloat16 while packed, float32 sums); the bias and its gradient stay float32.
"""
import functools

import numpy as np
from numba import njit, prange

from minialex.kernels.conv import grads
from minialex.kernels.conv.im2col import col2im, im2col
from minialex.kernels.gemm import gemm
from minialex.kernels.gemm_bf16 import gemm_bf16

# Upper bound for one column buffer; AlexNet conv1 at batch 8 needs ~35 MB in float32.
_COLS_BYTES = 64 * 1024 * 1024


def _chunks(g, itemsize):
    """(chunk size Nc, column rows K, columns per image P) for g's batch."""
    plane = g.oh * g.ow
    k_rows = g.cin * g.kh * g.kw
    per_image = max(1, k_rows * plane * itemsize)
    return int(max(1, min(g.n, _COLS_BYTES // per_image))), k_rows, plane


def _per_group(mm, a, ra, b, rb, out, ro, groups, **kw):
    # for each group g: out[g*ro:(g+1)*ro] = op(a[g*ra:(g+1)*ra]) @ op(b[g*rb:(g+1)*rb]) (gemm's kw)
    for grp in range(groups):
        mm(a[grp * ra:(grp + 1) * ra], b[grp * rb:(grp + 1) * rb], out=out[grp * ro:(grp + 1) * ro], **kw)


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


def forward(x, w, b, g, relu, nthreads, mm=gemm):
    """Path `batched`, forward: y = conv2d(x, w, b) (rectified when relu), x's dtype."""
    n, cout, groups = g.n, g.cout, g.groups
    kg = g.cin_g * g.kh * g.kw
    cout_g = cout // groups
    w2 = np.ascontiguousarray(w).reshape(cout, kg)
    bias = np.zeros(1, dtype=x.dtype) if b is None else np.ascontiguousarray(b, dtype=x.dtype)
    y = np.empty((n, cout, g.oh, g.ow), dtype=x.dtype)
    nc, k_rows, plane = _chunks(g, x.itemsize)
    y3 = y.reshape(n, cout, plane)
    cols_buf = np.empty(k_rows * nc * plane, dtype=x.dtype)
    yc_buf = np.empty(cout * nc * plane, dtype=x.dtype)
    for n0 in range(0, n, nc):
        n1 = min(n, n0 + nc)
        m = (n1 - n0) * plane
        cols = im2col(x[n0:n1], g.kh, g.kw, (g.sh, g.sw), (g.ph, g.pw), out=cols_buf[:k_rows * m].reshape(k_rows, m))
        yc = yc_buf[:cout * m].reshape(cout, m)
        _per_group(mm, w2, cout_g, cols, kg, yc, cout_g, groups)
        _scatter_bias(yc, y3[n0:n1], bias, b is not None, relu)
    return y


def backward(dy, x, w, dw, db, g, accumulate, need_dx, relu_out, nthreads, mm=gemm):
    """Path `batched`, backward: dW (+)= into dw, db (+)= into db (or None); returns dx, or
    None when not need_dx."""
    n, cin, cout, groups = g.n, g.cin, g.cout, g.groups
    kg = g.cin_g * g.kh * g.kw
    cout_g = cout // groups
    stride, padding = (g.sh, g.sw), (g.ph, g.pw)
    w2 = np.ascontiguousarray(w).reshape(cout, kg)
    dw2, in_place = grads.weight_rows(dw, x.dtype)
    db_acc = np.zeros(cout, dtype=np.float64) if db is not None else np.zeros(1, dtype=np.float64)
    nc, k_rows, plane = _chunks(g, x.itemsize)
    dy3 = dy.reshape(n, cout, plane)
    yr3 = dy3 if relu_out is None else np.ascontiguousarray(relu_out).reshape(n, cout, plane)
    dx = np.empty((n, cin, g.h, g.w), dtype=x.dtype) if need_dx else None
    cols_buf = np.empty(k_rows * nc * plane, dtype=x.dtype)
    dyc_buf = np.empty(cout * nc * plane, dtype=x.dtype)
    for n0 in range(0, n, nc):
        n1 = min(n, n0 + nc)
        m = (n1 - n0) * plane
        dyc = dyc_buf[:cout * m].reshape(cout, m)
        _gather_dy(dy3[n0:n1], dyc, db_acc, db is not None, yr3[n0:n1], relu_out is not None)
        cols = im2col(x[n0:n1], g.kh, g.kw, stride, padding, out=cols_buf[:k_rows * m].reshape(k_rows, m))
        _per_group(mm, dyc, cout_g, cols, kg, dw2, cout_g, groups, trans_b=True,
                   accumulate=accumulate or n0 > 0 or not in_place)
        if need_dx:
            # the column buffer is free again: reuse it for the column gradient
            _per_group(mm, w2, cout_g, dyc, cout_g, cols, kg, groups, trans_a=True)
            dx[n0:n1] = col2im(cols, (n1 - n0, cin, g.h, g.w), g.kh, g.kw, stride, padding)
    grads.store(dw, dw2, in_place, db, db_acc, accumulate)
    return dx


forward_bf16 = functools.partial(forward, mm=gemm_bf16)
forward_bf16.__doc__ = "Path `bf16`, forward: batched's forward with its products on the bf16 GEMM."
backward_bf16 = functools.partial(backward, mm=gemm_bf16)
backward_bf16.__doc__ = "Path `bf16`, backward: batched's backward with its products on the bf16 GEMM."
