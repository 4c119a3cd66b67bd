"""MaxPool2d and AdaptiveAvgPool2d."""
from ..kernels.avgpool import adaptive_avgpool2d_backward, adaptive_avgpool2d_forward
from ..kernels.maxpool import maxpool2d_backward, maxpool2d_forward
from ..shapes import pair, pool2d_output_size
from .module import Module


class MaxPool2d(Module):
    """Max over k×k windows (AlexNet overlaps them: 3 with stride 2). Backward routes each
    gradient to the first maximum of its window, as PyTorch does.

    Keeps for backward: the argmax of every window and the input shape.
    """

    saved = ("argmax", "in_shape")

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        super().__init__()
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride) if stride is not None else self.kernel_size
        self.padding = pair(padding)
        self.ceil_mode = bool(ceil_mode)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError("pad should be at most half of effective kernel size")

    def forward(self, x):
        # x: (N, C, H, W) -> (N, C, OH, OW)
        y, argmax = maxpool2d_forward(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)
        self.save(argmax=argmax, in_shape=x.shape)
        return y

    def backward(self, grad_out, need_input_grad=True):
        argmax, in_shape = self.take()
        return maxpool2d_backward(grad_out, argmax, in_shape)

    def output_shape(self, input_shape):
        n, c, h, w = input_shape
        return (n, c, *pool2d_output_size(h, w, self.kernel_size, self.stride, self.padding, self.ceil_mode))

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
        self.output_size = pair(output_size)

    def forward(self, x):
        self.save(in_shape=x.shape)
        return adaptive_avgpool2d_forward(x, self.output_size)

    def backward(self, grad_out, need_input_grad=True):
        (in_shape,) = self.take()
        return adaptive_avgpool2d_backward(grad_out, in_shape)

    def output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], *self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}"
