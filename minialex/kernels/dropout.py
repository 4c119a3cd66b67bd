"""Inverted dropout. The mask is drawn by the caller (minialex._random), never here.

y = x * mask * scale with scale = 1/(1-p) (0 when p == 1, as torch does). The product form
(not a select) keeps torch's behaviour that a NaN input stays NaN even where it is dropped.
"""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def _mask_scale(x, mask, scale, y):
    # x, y: (L,) flat ; mask: (L,) uint8
    for i in prange(x.shape[0]):
        y[i] = x[i] * (mask[i] * scale)


def _scale(p, dtype):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if p == 1.0:
        return dtype.type(0)
    return dtype.type(1) / dtype.type(1.0 - p)


def _run(a, mask, p):
    ac = np.ascontiguousarray(a)
    m = np.ascontiguousarray(mask)
    if m.shape != ac.shape:
        raise ValueError(f"mask shape {m.shape} != input shape {ac.shape}")
    if m.dtype != np.uint8:
        m = m.astype(np.uint8)
    out = np.empty_like(ac)
    _mask_scale(ac.reshape(-1), m.reshape(-1), _scale(p, ac.dtype), out.reshape(-1))
    return out


def dropout_forward(x, mask, p):
    """y = x * mask / (1 - p). x: any shape ; mask: x's shape, uint8/bool (1 = keep)."""
    return _run(x, mask, p)


def dropout_backward(dy, mask, p):
    """dx = dy * mask / (1 - p). dy: any shape ; mask: dy's shape, uint8/bool."""
    return _run(dy, mask, p)


def dropout_forward_ref(x, mask, p):
    """NumPy reference twin. x: any shape ; mask: x's shape."""
    return x * (mask.astype(x.dtype) * _scale(p, x.dtype))


def dropout_backward_ref(dy, mask, p):
    """NumPy reference twin. dy: any shape ; mask: dy's shape."""
    return dy * (mask.astype(dy.dtype) * _scale(p, dy.dtype))
