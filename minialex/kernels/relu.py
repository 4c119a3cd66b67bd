"""ReLU, with PyTorch's NaN behaviour: relu(NaN) = NaN and the gradient passes where y is NaN."""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def _relu_fwd(x, y):
    # x, y: (L,) flat
    for i in prange(x.shape[0]):
        v = x[i]
        # written as "not <= 0" so NaN passes through like torch.relu
        y[i] = 0 if v <= 0 else v


@njit(parallel=True, cache=True)
def _relu_bwd(dy, y, dx):
    # dy, y, dx: (L,) flat
    for i in prange(dy.shape[0]):
        dx[i] = 0 if y[i] <= 0 else dy[i]


def relu_forward(x):
    """y = max(x, 0). x: any shape, float32/float64. Returns y: x's shape."""
    xc = np.ascontiguousarray(x)
    y = np.empty_like(xc)
    _relu_fwd(xc.reshape(-1), y.reshape(-1))
    return y


def relu_backward(dy, y):
    """dx = dy where y > 0 else 0 (torch's threshold_backward). dy, y: same shape. Returns dx."""
    dyc = np.ascontiguousarray(dy, dtype=y.dtype)
    yc = np.ascontiguousarray(y)
    if dyc.shape != yc.shape:
        raise ValueError(f"dy shape {dyc.shape} != y shape {yc.shape}")
    dx = np.empty_like(dyc)
    _relu_bwd(dyc.reshape(-1), yc.reshape(-1), dx.reshape(-1))
    return dx


def relu_forward_ref(x):
    """NumPy reference twin. x: any shape."""
    return np.where(x <= 0, np.zeros_like(x), x)


def relu_backward_ref(dy, y):
    """NumPy reference twin. dy, y: same shape."""
    return np.where(y <= 0, np.zeros_like(dy), dy)
