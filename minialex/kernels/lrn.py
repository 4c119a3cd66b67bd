"""LocalResponseNorm across channels, torch.nn.functional.local_response_norm's formula:

    scale[c] = k + alpha/size * sum_{c' = c - size//2}^{c + (size-1)//2} x[c']^2   (zero padded)
    y[c]     = x[c] * scale[c]^-beta
    dx[c]    = dy[c] * scale[c]^-beta
               - 2*alpha*beta/size * x[c] * sum_{j : c in window(j)} dy[j] * y[j] / scale[j]

Both passes walk the channels once per pixel block with a sliding window sum (one add and one
subtract per channel instead of `size` adds), vectorised across the pixels of the block. The
running sums are kept in float64 so the add/subtract sliding does not drift in float32.
scale^-beta is evaluated with square roots for AlexNet's beta = 0.75 (no vector pow without SVML).
"""
import numpy as np
from numba import njit, prange

# pixels per task: one channel row of a block (1-2 KB) stays in L1 across the window
_BLOCK = 256


@njit(cache=True, fastmath=True, inline="always")
def _neg_pow(s, beta, mode):
    # s^-beta ; mode 1: beta == 0.75, mode 2: beta == 0.5, mode 3: beta == 1
    if mode == 1:
        r = 1.0 / np.sqrt(s)
        return r * np.sqrt(r)
    if mode == 2:
        return 1.0 / np.sqrt(s)
    if mode == 3:
        return 1.0 / s
    return s ** (-beta)


def _mode(beta):
    return {0.75: 1, 0.5: 2, 1.0: 3}.get(float(beta), 0)


@njit(parallel=True, cache=True, fastmath=True)
def _lrn_fwd(x, y, scale, size, alpha, beta, k, mode):
    # x, y, scale: (N, C, HW)
    n_img, n_ch, hw = x.shape
    before = size // 2
    after = (size - 1) // 2
    nblk = (hw + _BLOCK - 1) // _BLOCK
    coef = alpha / size
    for task in prange(n_img * nblk):
        n = task // nblk
        p0 = (task - n * nblk) * _BLOCK
        p1 = min(hw, p0 + _BLOCK)
        m = p1 - p0
        acc = np.zeros(m, dtype=np.float64)
        for c in range(min(after, n_ch - 1) + 1):
            xr = x[n, c, p0:p1]
            for t in range(m):
                acc[t] += xr[t] * xr[t]
        for c in range(n_ch):
            xr = x[n, c, p0:p1]
            yr = y[n, c, p0:p1]
            sr = scale[n, c, p0:p1]
            for t in range(m):
                s = k + coef * acc[t]
                sr[t] = s
                yr[t] = xr[t] * _neg_pow(s, beta, mode)
            ca = c + 1 + after
            if ca < n_ch:
                xa = x[n, ca, p0:p1]
                for t in range(m):
                    acc[t] += xa[t] * xa[t]
            cb = c - before
            if cb >= 0:
                xb = x[n, cb, p0:p1]
                for t in range(m):
                    acc[t] -= xb[t] * xb[t]


@njit(parallel=True, cache=True, fastmath=True)
def _lrn_bwd(dy, x, y, scale, dx, size, alpha, beta, mode):
    # dy, x, y, scale, dx: (N, C, HW)
    n_img, n_ch, hw = x.shape
    before = size // 2
    after = (size - 1) // 2
    nblk = (hw + _BLOCK - 1) // _BLOCK
    coef = 2.0 * alpha * beta / size
    for task in prange(n_img * nblk):
        n = task // nblk
        p0 = (task - n * nblk) * _BLOCK
        p1 = min(hw, p0 + _BLOCK)
        m = p1 - p0
        # ring[j % size] holds t_j = dy_j * y_j / scale_j of the channels in the window
        ring = np.empty((size, m), dtype=np.float64)
        acc = np.zeros(m, dtype=np.float64)
        for j in range(min(before, n_ch - 1) + 1):
            slot = ring[j % size]
            dr = dy[n, j, p0:p1]
            yr = y[n, j, p0:p1]
            sr = scale[n, j, p0:p1]
            for t in range(m):
                v = dr[t] * yr[t] / sr[t]
                slot[t] = v
                acc[t] += v
        for c in range(n_ch):
            dr = dy[n, c, p0:p1]
            xr = x[n, c, p0:p1]
            sr = scale[n, c, p0:p1]
            out = dx[n, c, p0:p1]
            for t in range(m):
                out[t] = dr[t] * _neg_pow(sr[t], beta, mode) - coef * xr[t] * acc[t]
            # drop channel c - after before reusing its ring slot for c + 1 + before
            cb = c - after
            if cb >= 0:
                slot = ring[cb % size]
                for t in range(m):
                    acc[t] -= slot[t]
            ca = c + 1 + before
            if ca < n_ch:
                slot = ring[ca % size]
                da = dy[n, ca, p0:p1]
                ya = y[n, ca, p0:p1]
                sa = scale[n, ca, p0:p1]
                for t in range(m):
                    v = da[t] * ya[t] / sa[t]
                    slot[t] = v
                    acc[t] += v


def _as3(a):
    return a.reshape(a.shape[0], a.shape[1], -1)


def lrn_forward(x, size, alpha=1e-4, beta=0.75, k=1.0):
    """x: (N, C, H, W) (or (N, C, ...)). Returns (y, scale), both x's shape and dtype."""
    xc = np.ascontiguousarray(x)
    if xc.ndim < 3:
        raise ValueError(f"local response norm needs (N, C, ...) input, got {x.shape}")
    y = np.empty_like(xc)
    scale = np.empty_like(xc)
    _lrn_fwd(_as3(xc), _as3(y), _as3(scale), int(size), float(alpha), float(beta), float(k),
             _mode(beta))
    return y, scale


def lrn_backward(dy, x, y, scale, size, alpha=1e-4, beta=0.75, k=1.0):
    """dy, x, y, scale: (N, C, H, W). Returns dx. k is already folded into scale."""
    xc = np.ascontiguousarray(x)
    dyc = np.ascontiguousarray(dy, dtype=xc.dtype)
    yc = np.ascontiguousarray(y)
    sc = np.ascontiguousarray(scale)
    dx = np.empty_like(xc)
    _lrn_bwd(_as3(dyc), _as3(xc), _as3(yc), _as3(sc), _as3(dx), int(size), float(alpha),
             float(beta), _mode(beta))
    return dx


def _window_sum_ref(a, size):
    # a: (N, C, ...) -> sum over channels c - size//2 .. c + (size-1)//2, zero padded
    c = a.shape[1]
    pad = [(0, 0)] * a.ndim
    pad[1] = (size // 2, (size - 1) // 2)
    ap = np.pad(a, pad)
    return sum(ap[:, i:i + c] for i in range(size))


def lrn_forward_ref(x, size, alpha=1e-4, beta=0.75, k=1.0):
    """NumPy reference twin. x: (N, C, H, W)."""
    scale = k + alpha / size * _window_sum_ref(x * x, size)
    return x * scale ** -beta, scale


def lrn_backward_ref(dy, x, y, scale, size, alpha=1e-4, beta=0.75, k=1.0):
    """NumPy reference twin. The inner sum runs over the reversed window."""
    t = dy * y / scale
    c = x.shape[1]
    pad = [(0, 0)] * x.ndim
    pad[1] = ((size - 1) // 2, size // 2)
    tp = np.pad(t, pad)
    rev = sum(tp[:, i:i + c] for i in range(size))
    return dy * scale ** -beta - 2.0 * alpha * beta / size * x * rev
