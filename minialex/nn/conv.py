"""Conv2d on our convolution kernels (kernels/conv/plan.py picks the path for each call)."""

from ..kernels.conv import conv2d_backward, conv2d_forward
from ..shapes import conv_output_size, pair
from . import init
from .module import Module, Parameter, grads_for_backward


class Conv2d(Module):
    """y = conv(x, weight) + bias. weight: (out, in/groups, kh, kw), as in PyTorch.

    Keeps for backward: the input x, and the output when forward_relu rectified it.
    """

    saved = ("x", "relu_out")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, bias=True):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding = pair(kernel_size), pair(stride), pair(padding)
        kh, kw = self.kernel_size
        fan_in = in_channels // groups * kh * kw
        self.weight = Parameter(init.pytorch_default((out_channels, in_channels // groups, kh, kw), fan_in))
        self.bias = Parameter(init.pytorch_default((out_channels,), fan_in)) if bias else None

    def forward(self, x):
        # x: (N, Cin, H, W) -> (N, Cout, OH, OW)
        return self._forward(x, relu=False)

    def forward_relu(self, x):
        """relu(self.forward(x)) in one pass; backward then expects the gradient of that output."""
        return self._forward(x, relu=True)

    def _forward(self, x, relu):
        b = self.bias.data if self.bias is not None else None
        y = conv2d_forward(x, self.weight.data, b, self.stride, self.padding, self.groups, relu=relu,
                           precision=self.precision)
        self.save(x=x, relu_out=y if relu else None)
        return y

    def backward(self, grad_out, need_input_grad=True):
        """Accumulates the weight and bias gradients; returns the input gradient, or None when
        need_input_grad is False (the first layer of a network: nobody needs the image's gradient,
        and skipping it saves a GEMM and a col2im)."""
        x, relu_out = self.take()
        (dw, db), accumulate = grads_for_backward(self.weight, self.bias)
        return conv2d_backward(grad_out, x, self.weight.data, dw, db, self.stride, self.padding,
                               self.groups, need_dx=need_input_grad, accumulate=accumulate,
                               relu_out=relu_out, precision=self.precision)

    def output_shape(self, input_shape):
        n, _, h, w = input_shape
        oh, ow = conv_output_size(h, w, *self.kernel_size, self.stride, self.padding)
        return (n, self.out_channels, oh, ow)

    def macs(self, input_shape):
        n, c, oh, ow = self.output_shape(input_shape)
        kh, kw = self.kernel_size
        return n * c * oh * ow * (self.in_channels // self.groups) * kh * kw

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s
