"""MaxPool2d and AdaptiveAvgPool2d."""
import math

from ..kernels.avgpool import adaptive_avgpool2d_backward, adaptive_avgpool2d_forward
from ..kernels.maxpool import maxpool2d_backward, maxpool2d_forward
from .module import Module


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def pool_output_size(size, k, s, p, ceil_mode):
    """PyTorch's rule, including that with ceil_mode the last window must start inside the
    input or its left padding."""
    num = size + 2 * p - k
    out = (math.ceil(num / s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


class MaxPool2d(Module):
    """Max over k×k windows (AlexNet overlaps them: 3 with stride 2). Backward routes each
    gradient to the first maximum of its window, as PyTorch does.

    Keeps for backward: the argmax of every window and the input shape.
    """

    saved = ("argmax", "in_shape")

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride) if stride is not None else self.kernel_size
        self.padding = _pair(padding)
        self.ceil_mode = bool(ceil_mode)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError("pad should be at most half of effective kernel size")
        self.argmax = self.in_shape = None

    def forward(self, x):
        # x: (N, C, H, W) -> (N, C, OH, OW)
        self.in_shape = x.shape
        y, self.argmax = maxpool2d_forward(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)
        return y

    def backward(self, grad_out):
        dx = maxpool2d_backward(grad_out, self.argmax, self.in_shape)
        self.argmax = None
        return dx

    def output_shape(self, input_shape):
        n, c, h, w = input_shape
        oh = pool_output_size(h, self.kernel_size[0], self.stride[0], self.padding[0], self.ceil_mode)
        ow = pool_output_size(w, self.kernel_size[1], self.stride[1], self.padding[1], self.ceil_mode)
        return (n, c, oh, ow)

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}")


class AdaptiveAvgPool2d(Module):
    """Average over PyTorch's adaptive windows: start = floor(i*H/OH), end = ceil((i+1)*H/OH).

    Keeps for backward: the input shape.
    """

    saved = ("in_shape",)

    def __init__(self, output_size):
        super().__init__()
        self.output_size = _pair(output_size)
        self.in_shape = None

    def forward(self, x):
        self.in_shape = x.shape
        return adaptive_avgpool2d_forward(x, self.output_size)

    def backward(self, grad_out):
        return adaptive_avgpool2d_backward(grad_out, self.in_shape)

    def output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], *self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}"
