"""BatchNorm2d kernels (NCHW, statistics per channel over N, H, W), PyTorch semantics.

Training:  mean, var (biased) over the batch; invstd = 1/sqrt(var + eps);
           y = (x - mean) * invstd * gamma + beta.
           The caller updates the running stats with the unbiased variance var * M/(M-1).
Backward:  dx = gamma*invstd * (dy - mean(dy) - xhat * mean(dy*xhat)),
           dgamma += sum(dy*xhat), dbeta += sum(dy).
gamma/beta may be None (affine=False). Statistics are accumulated in float64 with two passes
(mean first, then squared deviations) so large offsets do not cancel. The sums may be
reassociated (fastmath "reassoc": vectorised partial sums; forward 2-4x and backward 1.3-2x
faster than one serial float64 chain at AlexNet's sizes); NaN handling is untouched, so a NaN
input still gives NaN statistics and gradients.

Synchronised (data-parallel) training: given `allreduce(a)`, which sums a small float64 array in
place over all processes, the training forward and backward use the statistics of the global
batch (every process's rows together), as torch.nn.SyncBatchNorm does: the forward reduces
[per-channel sums, count], then the squared deviations around the global mean (2 calls); the
backward reduces [sum(dy), sum(dy*xhat), count] (1 call) but adds only this process's sums to
dgamma/dbeta, which the data-parallel gradient all-reduce sums afterwards. A process with an
empty batch still takes part in every call, contributing zeros.
"""
import numpy as np
from numba import njit, prange


# reassociated sums only: no "nnan"/"ninf", which would let LLVM assume NaN never occurs
_SUMS = {"reassoc", "nsz", "contract"}


@njit(fastmath=_SUMS, cache=True)
def _channel_sum(x, c):
    # x: (N, C, HW) ; returns the float64 sum of channel c's N*HW values
    s = 0.0
    for n in range(x.shape[0]):
        r = x[n, c]
        for p in range(x.shape[2]):
            s += r[p]
    return s


@njit(fastmath=_SUMS, cache=True)
def _channel_sq_dev(x, c, mu):
    # x: (N, C, HW) ; mu: float64 ; returns the float64 sum of (x - mu)^2 over channel c
    v = 0.0
    for n in range(x.shape[0]):
        r = x[n, c]
        for p in range(x.shape[2]):
            d = r[p] - mu
            v += d * d
    return v


@njit(parallel=True, fastmath=_SUMS, cache=True)
def _stats(x, mean, var, invstd, eps):
    # x: (N, C, HW) ; mean, var, invstd: (C,) float64, overwritten. One process's whole batch:
    # both passes over a channel run back to back, while its planes are still in cache.
    n_img, n_ch, hw = x.shape
    m = n_img * hw
    for c in prange(n_ch):
        mu = _channel_sum(x, c) / m
        v = _channel_sq_dev(x, c, mu)
        mean[c] = mu
        var[c] = v / m
        invstd[c] = 1.0 / np.sqrt(v / m + eps)


@njit(parallel=True, fastmath=_SUMS, cache=True)
def _sums(x, s):
    # x: (N, C, HW) ; s: (C,) float64, overwritten with each channel's sum (0 when N is 0)
    for c in prange(x.shape[1]):
        s[c] = _channel_sum(x, c)


@njit(parallel=True, fastmath=_SUMS, cache=True)
def _sq_devs(x, mean, v):
    # x: (N, C, HW) ; mean: (C,) float64, given ; v: (C,) float64, overwritten with each
    # channel's sum of (x - mean)^2 (0 when N is 0)
    for c in prange(x.shape[1]):
        v[c] = _channel_sq_dev(x, c, mean[c])


@njit(parallel=True, cache=True)
def _affine(x, a, b, y):
    # x, y: (N, C, HW) ; a, b: (C,) ; y = x * a[c] + b[c]
    n_img, n_ch, hw = x.shape
    for task in prange(n_img * n_ch):
        n = task // n_ch
        c = task - n * n_ch
        xr = x[n, c]
        yr = y[n, c]
        ac = a[c]
        bc = b[c]
        for p in range(hw):
            yr[p] = xr[p] * ac + bc


@njit(parallel=True, fastmath=_SUMS, cache=True)
def _grad_sums(dy, x, mean, invstd, sum_dy, sum_dyxhat):
    # dy, x: (N, C, HW) ; mean, invstd, sum_dy, sum_dyxhat: (C,) float64, overwritten
    # One task per (image, channel) plane, read contiguously; the planes' partial sums are
    # added per channel in image order afterwards (the same order whatever the thread count).
    n_img, n_ch, hw = x.shape
    p1 = np.empty((n_img, n_ch))
    p2 = np.empty((n_img, n_ch))
    for task in prange(n_img * n_ch):
        n = task // n_ch
        c = task - n * n_ch
        mu = mean[c]
        dr = dy[n, c]
        xr = x[n, c]
        s1 = 0.0
        s2 = 0.0
        for p in range(hw):
            g = dr[p]
            s1 += g
            s2 += g * (xr[p] - mu)
        p1[n, c] = s1
        p2[n, c] = s2
    for c in range(n_ch):
        s1 = 0.0
        s2 = 0.0
        for n in range(n_img):
            s1 += p1[n, c]
            s2 += p2[n, c]
        sum_dy[c] = s1
        sum_dyxhat[c] = s2 * invstd[c]


@njit(parallel=True, cache=True)
def _bwd_train(dy, x, k, mdy, q, mu, dx):
    # dy, x, dx: (N, C, HW) ; k, mdy, q, mu: (C,) coefficients in dx's dtype (float32 for
    # float32: twice the lanes of float64 arithmetic), dx = k * (dy - mdy - (x - mu) * q)
    n_img, n_ch, hw = x.shape
    for task in prange(n_img * n_ch):
        n = task // n_ch
        c = task - n * n_ch
        kc = k[c]
        mc = mdy[c]
        qc = q[c]
        uc = mu[c]
        dr = dy[n, c]
        xr = x[n, c]
        out = dx[n, c]
        for p in range(hw):
            out[p] = kc * (dr[p] - mc - (xr[p] - uc) * qc)


def _as3(a):
    # (N, C, H, W) -> (N, C, H*W), also when N (or H*W) is 0
    return a.reshape(a.shape[0], a.shape[1], a.size // max(a.shape[0] * a.shape[1], 1))


def _vec(v, c, fill):
    if v is None:
        return np.full(c, fill, dtype=np.float64)
    return np.asarray(v, dtype=np.float64).reshape(c)


def _too_few(shape, m):
    return ValueError(f"expected more than 1 value per channel when training, got input {shape}"
                      + ("" if m is None else f" (the global batch over all processes has {m} per channel)"))


def _global_stats(x3, eps, allreduce, shape):
    """Mean, biased var, invstd (C,) float64 and the count M of the global batch: 2 allreduces."""
    n_img, c, hw = x3.shape
    packed = np.empty(c + 1)                  # [sum per channel..., count]
    _sums(x3, packed[:c])
    packed[c] = n_img * hw
    allreduce(packed)
    m = int(packed[c])
    if m <= 1:
        raise _too_few(shape, m)
    mean = packed[:c] / m
    sq = np.empty(c)                          # squared deviations around the GLOBAL mean
    _sq_devs(x3, mean, sq)
    allreduce(sq)
    var = sq / m
    return mean, var, 1.0 / np.sqrt(var + eps), m


def batchnorm2d_forward_train(x, gamma, beta, eps=1e-5, allreduce=None, return_count=False):
    """x: (N, C, H, W) ; gamma, beta: (C,) or None.

    Returns (y, mean, var, invstd): y x's shape; mean, var (biased), invstd: (C,) of x's dtype;
    with return_count, also M, the number of values per channel the statistics cover (for the
    caller's unbiased running variance). With `allreduce` (sums a float64 array in place over
    all processes; its return value is not used) they are the global batch's statistics; N may
    then be 0. ValueError when M <= 1.
    """
    xc = np.ascontiguousarray(x)
    c = xc.shape[1]
    x3 = _as3(xc)
    if allreduce is None:
        m = xc.size // c
        if m <= 1:
            raise _too_few(x.shape, None)
        mean = np.empty(c)
        var = np.empty(c)
        invstd = np.empty(c)
        _stats(x3, mean, var, invstd, float(eps))
    else:
        mean, var, invstd, m = _global_stats(x3, float(eps), allreduce, x.shape)
    a = _vec(gamma, c, 1.0) * invstd
    b = _vec(beta, c, 0.0) - mean * a
    y = np.empty_like(xc)
    _affine(x3, a.astype(xc.dtype), b.astype(xc.dtype), _as3(y))
    dt = xc.dtype
    out = (y, mean.astype(dt), var.astype(dt), invstd.astype(dt))
    return out + (m,) if return_count else out


def batchnorm2d_forward_eval(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """x: (N, C, H, W) ; gamma, beta, running_mean, running_var: (C,) (gamma/beta may be None)."""
    xc = np.ascontiguousarray(x)
    c = xc.shape[1]
    a = _vec(gamma, c, 1.0) / np.sqrt(_vec(running_var, c, 1.0) + eps)
    b = _vec(beta, c, 0.0) - _vec(running_mean, c, 0.0) * a
    y = np.empty_like(xc)
    _affine(_as3(xc), a.astype(xc.dtype), b.astype(xc.dtype), _as3(y))
    return y


def batchnorm2d_backward(dy, x, gamma, mean, invstd, dgamma, dbeta, allreduce=None):
    """Training-mode backward. dy, x: (N, C, H, W) ; gamma, mean, invstd: (C,).

    Accumulates dgamma += sum(dy*xhat), dbeta += sum(dy) (either may be None). Returns dx.
    With `allreduce` (as in the forward), dx uses the global batch's mean(dy) and mean(dy*xhat)
    (1 call), while dgamma/dbeta get this process's sums only (the gradient all-reduce adds them).
    """
    xc = np.ascontiguousarray(x)
    dyc = np.ascontiguousarray(dy, dtype=xc.dtype)
    c = xc.shape[1]
    mean64 = _vec(mean, c, 0.0)
    inv64 = _vec(invstd, c, 1.0)
    sum_dy = np.empty(c)
    sum_dyxhat = np.empty(c)
    _grad_sums(_as3(dyc), _as3(xc), mean64, inv64, sum_dy, sum_dyxhat)
    m = xc.size // c
    all_dy, all_dyxhat = sum_dy, sum_dyxhat
    if allreduce is not None:
        packed = np.concatenate([sum_dy, sum_dyxhat, [m]])    # [sum(dy)..., sum(dy*xhat)..., count]
        allreduce(packed)
        all_dy, all_dyxhat, m = packed[:c], packed[c:2 * c], int(packed[2 * c])
    dx = np.empty_like(xc)
    # per channel, in float64, then rounded once: dx = gamma*invstd * (dy - mean(dy) - xhat *
    # mean(dy*xhat)), with xhat * mean(dy*xhat) = (x - mean) * invstd * sum_dyxhat / m
    dt = xc.dtype
    _bwd_train(_as3(dyc), _as3(xc), (_vec(gamma, c, 1.0) * inv64).astype(dt), (all_dy / m).astype(dt),
               (inv64 * all_dyxhat / m).astype(dt), mean64.astype(dt), _as3(dx))
    if dgamma is not None:
        dgamma += sum_dyxhat.astype(dgamma.dtype)
    if dbeta is not None:
        dbeta += sum_dy.astype(dbeta.dtype)
    return dx


def batchnorm2d_backward_eval(dy, gamma, running_var, eps, dgamma, dbeta, x, running_mean):
    """Eval-mode backward (statistics are constants). dy, x: (N, C, H, W) ; the rest: (C,).

    Accumulates dgamma += sum(dy*(x-rm)/sqrt(rv+eps)), dbeta += sum(dy). Returns dx.
    """
    xc = np.ascontiguousarray(x)
    dyc = np.ascontiguousarray(dy, dtype=xc.dtype)
    c = xc.shape[1]
    inv = 1.0 / np.sqrt(_vec(running_var, c, 1.0) + eps)
    dx = np.empty_like(xc)
    _affine(_as3(dyc), (_vec(gamma, c, 1.0) * inv).astype(xc.dtype), np.zeros(c, dtype=xc.dtype),
            _as3(dx))
    if dgamma is not None or dbeta is not None:
        sum_dy = np.empty(c)
        sum_dyxhat = np.empty(c)
        _grad_sums(_as3(dyc), _as3(xc), _vec(running_mean, c, 0.0), inv, sum_dy, sum_dyxhat)
        if dgamma is not None:
            dgamma += sum_dyxhat.astype(dgamma.dtype)
        if dbeta is not None:
            dbeta += sum_dy.astype(dbeta.dtype)
    return dx


def batchnorm2d_forward_train_ref(x, gamma, beta, eps=1e-5):
    """NumPy reference twin of the training forward."""
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean[None, :, None, None]) * invstd[None, :, None, None]
    g = 1.0 if gamma is None else gamma[None, :, None, None]
    b = 0.0 if beta is None else beta[None, :, None, None]
    return (xhat * g + b).astype(x.dtype), mean, var, invstd.astype(x.dtype)


def batchnorm2d_forward_eval_ref(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """NumPy reference twin of the eval forward."""
    xhat = (x - running_mean[None, :, None, None]) / np.sqrt(running_var[None, :, None, None] + eps)
    g = 1.0 if gamma is None else gamma[None, :, None, None]
    b = 0.0 if beta is None else beta[None, :, None, None]
    return (xhat * g + b).astype(x.dtype)


def batchnorm2d_backward_ref(dy, x, gamma, mean, invstd, dgamma, dbeta):
    """NumPy reference twin of the training backward."""
    inv = invstd[None, :, None, None]
    xhat = (x - mean[None, :, None, None]) * inv
    g = 1.0 if gamma is None else gamma[None, :, None, None]
    mdy = dy.mean(axis=(0, 2, 3), keepdims=True)
    mdyx = (dy * xhat).mean(axis=(0, 2, 3), keepdims=True)
    if dgamma is not None:
        dgamma += (dy * xhat).sum(axis=(0, 2, 3))
    if dbeta is not None:
        dbeta += dy.sum(axis=(0, 2, 3))
    return (g * inv * (dy - mdy - xhat * mdyx)).astype(x.dtype)


def batchnorm2d_backward_eval_ref(dy, gamma, running_var, eps, dgamma, dbeta, x, running_mean):
    """NumPy reference twin of the eval backward."""
    inv = 1.0 / np.sqrt(running_var[None, :, None, None] + eps)
    g = 1.0 if gamma is None else gamma[None, :, None, None]
    if dgamma is not None:
        dgamma += (dy * (x - running_mean[None, :, None, None]) * inv).sum(axis=(0, 2, 3))
    if dbeta is not None:
        dbeta += dy.sum(axis=(0, 2, 3))
    return (dy * g * inv).astype(dy.dtype)
