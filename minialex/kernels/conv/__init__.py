"""2-D convolution (PyTorch Conv2d semantics, groups included, no dilation).

conv2d_forward / conv2d_backward check their arguments, handle an empty batch, ask plan.route
which path computes the call and run it; the paths (direct.py, blocked.py, batched.py,
winograd.py) share geometry and layouts through layout.py. A backward routed to a path that
computes only the input gradient (plan.INPUT_GRAD_ONLY: direct_bf16) gets its weight
and bias gradients from the path the plan routes the same call without dx to. force_path(name)
(or the MINIALEX_CONV_PATH environment variable) makes every call take one path, for tests. The _ref twins are plain NumPy sums.
"""
import functools

import numba
import numpy as np

from minialex.kernels.conv import batched, blocked, direct, plan, winograd
from minialex.kernels.conv.layout import geometry
from minialex.kernels.conv.plan import force_path
from minialex.shapes import conv_output_size, pair

__all__ = ["conv2d_forward", "conv2d_backward", "conv2d_forward_ref", "conv2d_backward_ref", "force_path"]

_FORWARD = {"direct_bf16": direct.forward_bf16, "bf16": batched.forward_bf16,
            "winograd4": functools.partial(winograd.forward, m=4), "winograd": winograd.forward,
            "direct": direct.forward, "direct_split": direct.forward_split,
            "blocked": blocked.forward, "batched": batched.forward}
_INPUT_GRAD = {"direct_bf16": direct.input_grad_bf16}
_BACKWARD = {"bf16": batched.backward_bf16, "winograd4": functools.partial(winograd.backward, m=4),
             "winograd": winograd.backward, "direct": direct.backward, "direct_split": direct.backward_split,
             "blocked": blocked.backward, "batched": batched.backward}


def _check(x, w, groups):
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d expects x (N,C,H,W) and w (Cout,Cin/g,kh,kw), got {x.shape}, {w.shape}")
    cin = x.shape[1]
    cout, cin_g = w.shape[0], w.shape[1]
    if cin % groups or cout % groups or cin // groups != cin_g:
        raise ValueError(f"groups={groups} does not split x channels {cin} / weight {w.shape}")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w dtypes differ: {x.dtype} vs {w.dtype}")


def _grads_float32(dw, db):
    return dw.flags.c_contiguous and dw.dtype == np.float32 and (db is None or db.dtype == np.float32)


def conv2d_forward(x, w, b, stride, padding, groups, relu=False, precision="fp32"):
    """y = conv2d(x, w, b) like torch.nn.functional.conv2d (no dilation); relu(conv2d(...))
    in the same pass when relu=True. precision "bf16" (float32 x and w): the products take x and
    w rounded to bfloat16 and sum in float32 (kernels.gemm_bf16); the bias stays float32.

    x: (N, Cin, H, W) ; w: (Cout, Cin/groups, kh, kw) ; b: (Cout,) or None
    stride, padding: int or (h, w). Returns y: (N, Cout, OH, OW) of x's dtype.
    """
    _check(x, w, groups)
    plan.check_precision(precision)
    x = np.ascontiguousarray(x)
    g = geometry(x.shape, w.shape, stride, padding, groups)
    if g.n == 0:
        return np.empty((0, g.cout, g.oh, g.ow), dtype=x.dtype)
    nthreads = numba.get_num_threads()
    path = plan.route(plan.describe("forward", g, x.dtype, nthreads, precision=precision))
    return _FORWARD[path](x, w, b, g, relu, nthreads)


def conv2d_backward(dy, x, w, dw, db, stride, padding, groups, need_dx=True, accumulate=True,
                    relu_out=None, precision="fp32"):
    """Backward of conv2d_forward: accumulates dw (and db unless None), returns dx or None.
    With accumulate=False dw and db are overwritten instead (a freshly zeroed gradient).
    relu_out: the output of a forward with relu=True; dy is then the gradient of that
    rectified output and the ReLU backward happens in the same pass. precision "bf16": the
    products of dx and dW take their operands rounded to bfloat16 (db sums dy in float32).

    dy: (N, Cout, OH, OW) ; x: (N, Cin, H, W) ; w, dw: (Cout, Cin/groups, kh, kw) ; db: (Cout,) or None
    """
    _check(x, w, groups)
    plan.check_precision(precision)
    x = np.ascontiguousarray(x)
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    g = geometry(x.shape, w.shape, stride, padding, groups)
    if dy.shape != (g.n, g.cout, g.oh, g.ow):
        raise ValueError(f"dy shape {dy.shape} != expected {(g.n, g.cout, g.oh, g.ow)}")
    if g.n == 0:   # an empty batch adds nothing; "overwrite" means zero
        if not accumulate:
            dw[...] = 0
            if db is not None:
                db[...] = 0
        return np.zeros_like(x) if need_dx else None
    nthreads = numba.get_num_threads()
    call = plan.describe("backward", g, x.dtype, nthreads, need_dx, _grads_float32(dw, db), precision)
    path = plan.route(call)
    if path in plan.INPUT_GRAD_ONLY:
        weights_path = plan.route_unforced(plan.weight_grad_call(call))
        _BACKWARD[weights_path](dy, x, w, dw, db, g, accumulate, False, relu_out, nthreads)
        return _INPUT_GRAD[path](dy, w, g, relu_out, nthreads)
    return _BACKWARD[path](dy, x, w, dw, db, g, accumulate, need_dx, relu_out, nthreads)


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
