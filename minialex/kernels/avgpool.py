"""AdaptiveAvgPool2d with torch's windows: start = floor(i*H/OH), end = ceil((i+1)*H/OH)."""
import numpy as np
from numba import njit, prange

from minialex.shapes import pair


@njit(cache=True, inline="always")
def _start(i, size, osize):
    return (i * size) // osize


@njit(cache=True, inline="always")
def _end(i, size, osize):
    return ((i + 1) * size + osize - 1) // osize


@njit(parallel=True, cache=True)
def _avg_fwd(x, y):
    # x: (N*C, H, W) ; y: (N*C, OH, OW)
    planes, h, w = x.shape
    oh_n, ow_n = y.shape[1], y.shape[2]
    for pl in prange(planes):
        xp = x[pl]
        for oh in range(oh_n):
            h0 = _start(oh, h, oh_n)
            h1 = _end(oh, h, oh_n)
            for ow in range(ow_n):
                w0 = _start(ow, w, ow_n)
                w1 = _end(ow, w, ow_n)
                s = 0.0
                for ih in range(h0, h1):
                    for iw in range(w0, w1):
                        s += xp[ih, iw]
                y[pl, oh, ow] = s / ((h1 - h0) * (w1 - w0))


@njit(parallel=True, cache=True)
def _avg_bwd(dy, dx):
    # dy: (N*C, OH, OW) ; dx: (N*C, H, W), overwritten; one task per plane (windows overlap)
    planes, h, w = dx.shape
    oh_n, ow_n = dy.shape[1], dy.shape[2]
    for pl in prange(planes):
        d = dx[pl]
        for ih in range(h):
            for iw in range(w):
                d[ih, iw] = 0
        for oh in range(oh_n):
            h0 = _start(oh, h, oh_n)
            h1 = _end(oh, h, oh_n)
            for ow in range(ow_n):
                w0 = _start(ow, w, ow_n)
                w1 = _end(ow, w, ow_n)
                g = dy[pl, oh, ow] / ((h1 - h0) * (w1 - w0))
                for ih in range(h0, h1):
                    for iw in range(w0, w1):
                        d[ih, iw] += g


def adaptive_avgpool2d_forward(x, output_size):
    """x: (N, C, H, W) ; output_size: int or (oh, ow). Returns y: (N, C, OH, OW)."""
    oh, ow = pair(output_size)
    n, c, h, w = x.shape
    xc = np.ascontiguousarray(x)
    y = np.empty((n, c, oh, ow), dtype=x.dtype)
    _avg_fwd(xc.reshape(n * c, h, w), y.reshape(n * c, oh, ow))
    return y


def adaptive_avgpool2d_backward(dy, x_shape):
    """dy: (N, C, OH, OW) ; x_shape: (N, C, H, W). Returns dx: (N, C, H, W)."""
    n, c, h, w = x_shape
    dyc = np.ascontiguousarray(dy)
    oh, ow = dyc.shape[2], dyc.shape[3]
    dx = np.empty((n, c, h, w), dtype=dyc.dtype)
    _avg_bwd(dyc.reshape(n * c, oh, ow), dx.reshape(n * c, h, w))
    return dx


def _windows(size, osize):
    return [(i * size // osize, -((-(i + 1) * size) // osize)) for i in range(osize)]


def adaptive_avgpool2d_forward_ref(x, output_size):
    """NumPy reference twin. x: (N, C, H, W)."""
    oh, ow = pair(output_size)
    n, c, h, w = x.shape
    y = np.empty((n, c, oh, ow), dtype=x.dtype)
    for i, (h0, h1) in enumerate(_windows(h, oh)):
        for j, (w0, w1) in enumerate(_windows(w, ow)):
            y[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return y


def adaptive_avgpool2d_backward_ref(dy, x_shape):
    """NumPy reference twin. dy: (N, C, OH, OW)."""
    n, c, h, w = x_shape
    oh, ow = dy.shape[2], dy.shape[3]
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for i, (h0, h1) in enumerate(_windows(h, oh)):
        for j, (w0, w1) in enumerate(_windows(w, ow)):
            dx[:, :, h0:h1, w0:w1] += dy[:, :, i:i + 1, j:j + 1] / ((h1 - h0) * (w1 - w0))
    return dx
