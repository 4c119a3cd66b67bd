"""Cross-entropy on logits: stable log-softmax + NLL, mean over the batch, label smoothing
exactly as torch.nn.functional.cross_entropy(label_smoothing=eps):

    loss_i = (1 - eps) * (-logp[i, t_i]) + eps/K * sum_k (-logp[i, k]),   loss = mean_i loss_i
    dlogits = grad_loss/N * (softmax - (1 - eps)*onehot(t) - eps/K)

No fastmath here: a NaN or inf logit must come out as a NaN loss, as in torch.
"""
import numpy as np
from numba import njit, prange


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
        tot = 0.0
        for j in range(k):
            lp = row[j] - lse
            out[j] = lp
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
    _log_softmax_nll(x, t, float(label_smoothing), logp, per_row)
    return float(per_row.sum() / n) if n else float("nan"), logp


def cross_entropy_backward(log_probs, targets, label_smoothing=0.0, grad_loss=1.0):
    """log_probs: (N, K) from the forward ; targets: (N,) int. Returns dlogits (N, K)."""
    lp = np.ascontiguousarray(log_probs)
    n, k = lp.shape
    t = _targets(targets, n, k)
    dx = np.empty_like(lp)
    _ce_grad(lp, t, float(label_smoothing), float(grad_loss) / max(n, 1), dx)
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
