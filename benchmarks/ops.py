"""One layer op, forward and backward, set up for minialex or for torch from a JSON-able case.

A case is a dict: name, kind (conv, linear, relu, maxpool, lrn, dropout, avgpool, batchnorm,
cross_entropy), batch, the input shape "x" and the kind's parameters. `build(case, lib)` makes
the inputs from a seed derived from the case, so both libraries (in different processes) see the
same numbers, and returns a Bench: the phases to time and a function giving every output once
for the correctness check.

torch is timed as in training: forward with autograd recording, backward as
`torch.autograd.grad(y, inputs, dy, retain_graph=True)` on the graph of one forward, so only the
backward is timed. Our backward is the kernel the layer calls, on the saved forward results.
"""
import json
import zlib

import numpy as np


class Bench:
    """phases: [(phase name, zero-argument callable to time, FLOPs or None)];
    outputs(): {phase: [numpy arrays]} computed once, gradients accumulated from zero;
    labels: {phase: [a name per output]}, for saying which output disagrees;
    loose: {phase: indices of outputs compared norm-wise (see _common.LOOSE_FACTOR)}."""

    def __init__(self, phases, outputs, labels=None, loose=None):
        self.phases = phases
        self.outputs = outputs
        self.labels = labels or {}
        self.loose = loose or {}


def _rng(case):
    return np.random.default_rng(zlib.crc32(json.dumps(case, sort_keys=True).encode()))


def _randn(rng, shape, scale=1.0):
    return rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(scale)


def conv_flops(case):
    """2·N·Cout·OH·OW·(Cin/g)·kh·kw for the forward."""
    n, _, h, w = case["x"]
    cout, cin_g, kh, kw = case["w"]
    s, p = case["stride"], case["padding"]
    oh, ow = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    return 2.0 * n * cout * oh * ow * cin_g * kh * kw, (n, cout, oh, ow)


def _inputs(case, rng):
    """The arrays of one case: x, dy and the kind's parameters, float32."""
    kind, x_shape = case["kind"], case["x"]
    n = x_shape[0]
    d = {"x": _randn(rng, x_shape)}
    if kind == "conv":
        fan_in = int(np.prod(case["w"][1:]))
        d["w"] = _randn(rng, case["w"], fan_in ** -0.5)
        d["b"] = _randn(rng, case["w"][:1], 0.1)
        y_shape = conv_flops(case)[1]
    elif kind == "linear":
        d["w"] = _randn(rng, (case["out"], x_shape[1]), x_shape[1] ** -0.5)
        d["b"] = _randn(rng, (case["out"],), 0.1)
        y_shape = (n, case["out"])
    elif kind == "maxpool":
        k, s = case["kernel"], case["stride"]
        y_shape = (n, x_shape[1], (x_shape[2] - k) // s + 1, (x_shape[3] - k) // s + 1)
    elif kind == "avgpool":
        y_shape = (n, x_shape[1], case["output"], case["output"])
    elif kind == "batchnorm":
        d["gamma"] = 1.0 + _randn(rng, x_shape[1:2], 0.1)
        d["beta"] = _randn(rng, x_shape[1:2], 0.1)
        y_shape = x_shape
    elif kind == "dropout":
        d["mask"] = (rng.random(tuple(x_shape)) >= case["p"]).astype(np.uint8)
        y_shape = x_shape
    elif kind == "cross_entropy":
        d["t"] = rng.integers(0, x_shape[1], n).astype(np.int64)
        y_shape = None  # a scalar loss: the backward starts from 1
    elif kind in ("relu", "lrn"):
        y_shape = x_shape
    else:
        raise ValueError(f"unknown op kind {kind!r} in case {case.get('name')!r}")
    d["dy"] = None if y_shape is None else _randn(rng, y_shape)
    return d


def flops(case):
    """(forward FLOPs, backward FLOPs) where defined, else (None, None)."""
    if case["kind"] == "conv":
        f = conv_flops(case)[0]
        # backward-weight costs one forward, backward-data another (skipped for the first layer)
        return f, f * (2 if case.get("need_dx", True) else 1)
    if case["kind"] == "linear":
        f = 2.0 * case["x"][0] * case["x"][1] * case["out"]
        return f, 2 * f
    return None, None


def build(case, lib):
    """A Bench for `case` on `lib` ("minialex" or "torch")."""
    d = _inputs(case, _rng(case))
    if lib == "minialex":
        return _ours(case, d)
    if lib == "torch":
        return _torch(case, d)
    raise ValueError(f"unknown library {lib!r}")


# -- minialex --------------------------------------------------------------------------------------

def _ours(case, d):
    # Parameter gradients as a training step has them: allocated by Parameter (64-byte aligned)
    # and overwritten by the first backward after zero_grad() (accumulate=False); the check
    # (grads()) starts from zero either way.
    from minialex._memory import aligned_zeros_like
    kind, x, dy = case["kind"], d["x"], d["dy"]
    f_fwd, f_bwd = flops(case)
    if kind == "conv":
        from minialex.kernels import conv as K
        s, p, g, need_dx = case["stride"], case["padding"], case.get("groups", 1), case.get("need_dx", True)
        w, b = d["w"], d["b"]
        dw, db = aligned_zeros_like(w), aligned_zeros_like(b)

        precision = case.get("precision", "fp32")

        def fwd():
            return K.conv2d_forward(x, w, b, s, p, g, precision=precision)

        def bwd():
            return K.conv2d_backward(dy, x, w, dw, db, s, p, g, need_dx=need_dx, accumulate=False,
                                     precision=precision)

        def grads():
            dw[...], db[...] = 0, 0
            dx = bwd()
            return ([dx] if need_dx else []) + [dw.copy(), db.copy()]
    elif kind == "linear":
        from minialex.kernels import linear as K
        w, b = d["w"], d["b"]
        dw, db = aligned_zeros_like(w), aligned_zeros_like(b)

        precision = case.get("precision", "fp32")

        def fwd():
            return K.linear_forward(x, w, b, precision=precision)

        def bwd():
            return K.linear_backward(dy, x, w, dw, db, accumulate=False, precision=precision)

        def grads():
            dw[...], db[...] = 0, 0
            dx = bwd()
            return [dx, dw.copy(), db.copy()]
    elif kind == "relu":
        from minialex.kernels import relu as K
        y = K.relu_forward(x)

        def fwd():
            return K.relu_forward(x)

        def bwd():
            return K.relu_backward(dy, y)

        def grads():
            return [bwd()]
    elif kind == "maxpool":
        from minialex.kernels import maxpool as K
        k, s = case["kernel"], case["stride"]
        _, arg = K.maxpool2d_forward(x, k, s, 0, False)

        def fwd():
            return K.maxpool2d_forward(x, k, s, 0, False)[0]

        def bwd():
            return K.maxpool2d_backward(dy, arg, x.shape)

        def grads():
            return [bwd()]
    elif kind == "lrn":
        from minialex.kernels import lrn as K
        size, alpha, beta, kk = case["size"], case["alpha"], case["beta"], case["k"]
        y, scale = K.lrn_forward(x, size, alpha, beta, kk)

        def fwd():
            return K.lrn_forward(x, size, alpha, beta, kk)[0]

        def bwd():
            return K.lrn_backward(dy, x, y, scale, size, alpha, beta, kk)

        def grads():
            return [bwd()]
    elif kind == "dropout":
        from minialex import nn
        from minialex.kernels import dropout as K
        p, mask = case["p"], d["mask"]
        layer = nn.Dropout(p).train()
        layer.forward(x)
        (drawn,) = layer.take()

        def fwd():
            # the layer, so that drawing the mask is timed too, as torch's dropout draws its own
            return layer.forward(x)

        def bwd():
            return K.dropout_backward(dy, drawn, p)

        def outputs():
            # checked with a fixed mask: torch cannot be handed ours
            return {"forward": [K.dropout_forward(x, mask, p)], "backward": [K.dropout_backward(dy, mask, p)]}
        return Bench([("forward", fwd, None), ("backward", bwd, None)], outputs, _labels(case))
    elif kind == "avgpool":
        from minialex.kernels import avgpool as K
        o = case["output"]

        def fwd():
            return K.adaptive_avgpool2d_forward(x, o)

        def bwd():
            return K.adaptive_avgpool2d_backward(dy, x.shape)

        def grads():
            return [bwd()]
    elif kind == "batchnorm":
        from minialex.kernels import batchnorm as K
        gamma, beta, eps = d["gamma"], d["beta"], 1e-5
        _, mean, _, invstd = K.batchnorm2d_forward_train(x, gamma, beta, eps)
        dgamma, dbeta = np.zeros_like(gamma), np.zeros_like(beta)

        def fwd():
            return K.batchnorm2d_forward_train(x, gamma, beta, eps)[0]

        def bwd():
            return K.batchnorm2d_backward(dy, x, gamma, mean, invstd, dgamma, dbeta)

        def grads():
            dgamma[...], dbeta[...] = 0, 0
            dx = bwd()
            return [dx, dgamma.copy(), dbeta.copy()]
    elif kind == "cross_entropy":
        from minialex.kernels import cross_entropy as K
        t = d["t"]
        _, logp = K.cross_entropy_forward(x, t)

        def fwd():
            return np.float32(K.cross_entropy_forward(x, t)[0])

        def bwd():
            return K.cross_entropy_backward(logp, t)

        def grads():
            return [bwd()]
    else:
        raise ValueError(f"unknown op kind {kind!r}")

    def outputs():
        return {"forward": [np.asarray(fwd())], "backward": grads()}
    return Bench([("forward", fwd, f_fwd), ("backward", bwd, f_bwd)], outputs, _labels(case))


def _labels(case):
    kind = case["kind"]
    params = {"conv": ["dw", "db"], "linear": ["dw", "db"], "batchnorm": ["dgamma", "dbeta"]}.get(kind, [])
    dx = [] if kind == "conv" and not case.get("need_dx", True) else ["dx"]
    return {"forward": ["loss" if kind == "cross_entropy" else "y"], "backward": dx + params}


# -- torch -----------------------------------------------------------------------------------------

def _torch(case, d):
    import torch
    import torch.nn.functional as F
    kind = case["kind"]
    f_fwd, f_bwd = flops(case)
    t = {k: torch.from_numpy(v) for k, v in d.items() if v is not None}
    x = t["x"]
    want = [x]  # tensors whose gradients the backward returns, in our order
    if kind == "conv":
        s, p, g = case["stride"], case["padding"], case.get("groups", 1)
        if not case.get("need_dx", True):
            want = []
        want += [t["w"], t["b"]]

        def op():
            return F.conv2d(x, t["w"], t["b"], s, p, 1, g)
    elif kind == "linear":
        want += [t["w"], t["b"]]

        def op():
            return F.linear(x, t["w"], t["b"])
    elif kind == "relu":
        def op():
            return F.relu(x)
    elif kind == "maxpool":
        def op():
            return F.max_pool2d(x, case["kernel"], case["stride"])
    elif kind == "lrn":
        def op():
            return F.local_response_norm(x, case["size"], case["alpha"], case["beta"], case["k"])
    elif kind == "dropout":
        def op():
            return F.dropout(x, case["p"], training=True)
    elif kind == "avgpool":
        def op():
            return F.adaptive_avg_pool2d(x, case["output"])
    elif kind == "batchnorm":
        c = case["x"][1]
        running_mean, running_var = torch.zeros(c), torch.ones(c)
        want += [t["gamma"], t["beta"]]

        def op():
            return F.batch_norm(x, running_mean, running_var, t["gamma"], t["beta"], True, 0.1, 1e-5)
    elif kind == "cross_entropy":
        def op():
            return F.cross_entropy(x, t["t"])
    else:
        raise ValueError(f"unknown op kind {kind!r}")
    for v in want:
        v.requires_grad_(True)
    if case.get("precision", "fp32") == "bf16":   # conv and linear: torch's bf16 autocast
        plain = op

        def op():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return plain()
    y = op()
    dy = t.get("dy")
    if dy is not None and dy.dtype != y.dtype:
        dy = dy.to(y.dtype)

    def bwd():
        return torch.autograd.grad(y, want, dy, retain_graph=True)

    def outputs():
        if kind == "dropout":
            scale = 1.0 / (1.0 - case["p"])
            mask = t["mask"].to(x.dtype)
            with torch.no_grad():
                return {"forward": [(x * mask * scale).numpy()], "backward": [(dy * mask * scale).numpy()]}
        return {"forward": [op().detach().float().numpy()], "backward": [gr.float().numpy() for gr in bwd()]}
    return Bench([("forward", op, f_fwd), ("backward", bwd, f_bwd)], outputs)
