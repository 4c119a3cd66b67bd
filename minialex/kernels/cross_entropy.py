"""Cross-entropy on logits: stable log-softmax + NLL, mean over the batch, label smoothing
exactly as torch.nn.functional.cross_entropy(label_smoothing=eps):

    loss_i = (1 - eps) * (-logp[i, t_i]) + eps/K * sum_k (-logp[i, k]),   loss = mean_i loss_i
    dlogits = grad_loss/N * (softmax - (1 - eps)*onehot(t) - eps/K)

No fastmath here: a NaN or inf logit must come out as a NaN loss, as in torch.

float32 takes the exponentials 16 lanes at a time (simd.vexp; np.exp in a loop runs one lane at
a time, 26 of the 29 µs of the forward at batch 8) and runs small batches in the calling thread,
where a parallel region would cost more than the rows. float64 (gradient checks) keeps the
scalar kernels.
"""
import numpy as np
from numba import njit, prange

from minialex.kernels.simd import (LANES, vadd, vexp, vhmax, vhsum, vload, vmax, vmul, vsplat, vstore,
                                   vsub, vzero)

# Below this many logits the float32 kernels run serially (measured: 8 x 1000 is as fast in one
# thread as in a parallel region on two, 64 x 1000 takes 1.2-1.7x longer).
PARALLEL_MIN = 1 << 14


@njit(parallel=True, cache=True)
def _log_softmax_nll(x, t, eps, logp, per_row):
    # x, logp: (N, K) ; t: (N,) int64 ; per_row: (N,) float64
    n, k = x.shape
    for i in prange(n):
        row = x[i]
        out = logp[i]
        mx = row[0]
        for j in range(1, k):
            v = row[j]
            # "not <=" so a NaN logit becomes the max and poisons the row like torch
            if not v <= mx:
                mx = v
        s = 0.0
        for j in range(k):
            s += np.exp(row[j] - mx)
        lse = mx + np.log(s)
        for j in range(k):
            out[j] = row[j] - lse
        tot = 0.0
        if eps != 0.0:  # only smoothing needs the sum (and 0 * a -inf log-prob would be NaN)
            for j in range(k):
                tot += out[j]
        per_row[i] = -(1.0 - eps) * out[t[i]] - eps / k * tot


@njit(parallel=True, cache=True)
def _ce_grad(logp, t, eps, scale, dx):
    # logp, dx: (N, K) ; t: (N,) int64
    n, k = logp.shape
    off = eps / k
    for i in prange(n):
        lp = logp[i]
        d = dx[i]
        for j in range(k):
            d[j] = scale * (np.exp(lp[j]) - off)
        d[t[i]] -= scale * (1.0 - eps)


@njit(cache=True)
def _row_f32(x, t, eps, logp, per_row, i):
    # row i of x, logp: (N, K) float32 ; per_row: (N,) float64
    # log-softmax in float32 as torch computes it: x - max - log(sum(exp(x - max))). A NaN
    # logit need not win the max: its exp makes the sum, and so the whole row, NaN.
    row = x[i]
    out = logp[i]
    k = row.size
    nv = k - k % LANES
    mx = row[0]
    if nv:
        mv = vload(row, 0)
        for j in range(LANES, nv, LANES):
            mv = vmax(vload(row, j), mv)
        mx = vhmax(mv)
    for j in range(nv, k):
        if row[j] > mx:
            mx = row[j]
    m = vsplat(mx)
    acc = vzero()
    for j in range(0, nv, LANES):
        acc = vadd(acc, vexp(vsub(vload(row, j), m)))
    s = np.float32(vhsum(acc))
    for j in range(nv, k):
        s += np.exp(row[j] - mx)
    logs = np.float32(np.log(s))
    ls = vsplat(logs)
    for j in range(0, nv, LANES):
        vstore(out, j, vsub(vsub(vload(row, j), m), ls))
    for j in range(nv, k):
        out[j] = (row[j] - mx) - logs
    tot = 0.0
    if eps != 0.0:  # only smoothing needs the sum (and 0 * a -inf log-prob would be NaN)
        for j in range(k):
            tot += out[j]
    per_row[i] = -(1.0 - eps) * out[t[i]] - eps / k * tot


@njit(cache=True)
def _log_softmax_nll_f32(x, t, eps, logp, per_row):
    for i in range(x.shape[0]):
        _row_f32(x, t, eps, logp, per_row, i)


@njit(parallel=True, cache=True)
def _log_softmax_nll_f32_par(x, t, eps, logp, per_row):
    for i in prange(x.shape[0]):
        _row_f32(x, t, eps, logp, per_row, i)


@njit(cache=True)
def _grad_row_f32(logp, t, eps, scale, dx, i):
    # row i of logp, dx: (N, K) float32
    lp = logp[i]
    d = dx[i]
    k = lp.size
    off = eps / k
    sc = vsplat(np.float32(scale))
    of = vsplat(np.float32(off))
    j = 0
    while j + LANES <= k:
        vstore(d, j, vmul(sc, vsub(vexp(vload(lp, j)), of)))
        j += LANES
    for jj in range(j, k):
        d[jj] = scale * (np.exp(lp[jj]) - off)
    d[t[i]] -= scale * (1.0 - eps)


@njit(cache=True)
def _ce_grad_f32(logp, t, eps, scale, dx):
    for i in range(logp.shape[0]):
        _grad_row_f32(logp, t, eps, scale, dx, i)


@njit(parallel=True, cache=True)
def _ce_grad_f32_par(logp, t, eps, scale, dx):
    for i in prange(logp.shape[0]):
        _grad_row_f32(logp, t, eps, scale, dx, i)


def _targets(targets, n, k):
    t = np.ascontiguousarray(targets, dtype=np.int64).reshape(-1)
    if t.shape[0] != n:
        raise ValueError(f"{t.shape[0]} targets for {n} rows of logits")
    if n and (t.min() < 0 or t.max() >= k):
        raise IndexError(f"targets must lie in [0, {k}), got range [{t.min()}, {t.max()}]")
    return t


def cross_entropy_forward(logits, targets, label_smoothing=0.0):
    """logits: (N, K) float32/float64 ; targets: (N,) int.

    Returns (loss, log_probs): loss a Python float (mean over N), log_probs (N, K) logits' dtype.
    """
    x = np.ascontiguousarray(logits)
    if x.ndim != 2:
        raise ValueError(f"cross_entropy expects (N, K) logits, got {x.shape}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    n, k = x.shape
    t = _targets(targets, n, k)
    logp = np.empty_like(x)
    per_row = np.empty(n)
    if x.dtype == np.float32:
        kernel = _log_softmax_nll_f32_par if x.size >= PARALLEL_MIN else _log_softmax_nll_f32
    else:
        kernel = _log_softmax_nll
    kernel(x, t, float(label_smoothing), logp, per_row)
    return float(per_row.sum() / n) if n else float("nan"), logp


def cross_entropy_backward(log_probs, targets, label_smoothing=0.0, grad_loss=1.0):
    """log_probs: (N, K) from the forward ; targets: (N,) int. Returns dlogits (N, K)."""
    lp = np.ascontiguousarray(log_probs)
    n, k = lp.shape
    t = _targets(targets, n, k)
    dx = np.empty_like(lp)
    if lp.dtype == np.float32:
        kernel = _ce_grad_f32_par if lp.size >= PARALLEL_MIN else _ce_grad_f32
    else:
        kernel = _ce_grad
    kernel(lp, t, float(label_smoothing), float(grad_loss) / max(n, 1), dx)
    return dx


def cross_entropy_forward_ref(logits, targets, label_smoothing=0.0):
    """NumPy reference twin."""
    n, k = logits.shape
    mx = logits.max(axis=1, keepdims=True)
    logp = logits - mx - np.log(np.exp(logits - mx).sum(axis=1, keepdims=True))
    t = np.asarray(targets, dtype=np.int64)
    nll = -logp[np.arange(n), t]
    smooth = -logp.sum(axis=1) / k
    loss = ((1.0 - label_smoothing) * nll + label_smoothing * smooth).mean()
    return float(loss), logp.astype(logits.dtype)


def cross_entropy_backward_ref(log_probs, targets, label_smoothing=0.0, grad_loss=1.0):
    """NumPy reference twin."""
    n, k = log_probs.shape
    onehot = np.zeros_like(log_probs)
    onehot[np.arange(n), np.asarray(targets, dtype=np.int64)] = 1.0
    target_dist = (1.0 - label_smoothing) * onehot + label_smoothing / k
    return (grad_loss / n * (np.exp(log_probs) - target_dist)).astype(log_probs.dtype)
