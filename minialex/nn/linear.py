"""Linear and Flatten."""
import math

import numpy as np

from ..kernels.linear import linear_backward, linear_forward
from . import init
from .module import Module, Parameter, grads_for_backward


class Linear(Module):
    """y = x @ weight.T + bias. weight: (out_features, in_features), as in PyTorch.

    Keeps for backward: the input x.
    """

    saved = ("x",)

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(init.pytorch_default((out_features, in_features), in_features))
        self.bias = Parameter(init.pytorch_default((out_features,), in_features)) if bias else None

    def forward(self, x):
        # x: (N, in_features) -> (N, out_features)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear expects input of shape (N, {self.in_features}), got {tuple(x.shape)}")
        self.save(x=x)
        return linear_forward(x, self.weight.data, self.bias.data if self.bias is not None else None,
                              precision=self.precision)

    def backward(self, grad_out, need_input_grad=True):
        (x,) = self.take()
        (dw, db), accumulate = grads_for_backward(self.weight, self.bias)
        return linear_backward(grad_out, x, self.weight.data, dw, db, need_dx=need_input_grad,
                               accumulate=accumulate, precision=self.precision)

    def output_shape(self, input_shape):
        return (input_shape[0], self.out_features)

    def macs(self, input_shape):
        return input_shape[0] * self.in_features * self.out_features

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Flatten(Module):
    """(N, C, H, W) -> (N, C*H*W), torch.flatten(x, 1). It owns no parameters or buffers, so
    as a model's child it adds no state_dict key. Keeps for backward: the input shape."""

    saved = ("in_shape",)

    def forward(self, x):
        self.save(in_shape=x.shape)
        # the flat size is spelled out: reshape(n, -1) cannot infer it when n is 0
        return np.ascontiguousarray(x).reshape(self.output_shape(x.shape))

    def backward(self, grad_out, need_input_grad=True):
        (in_shape,) = self.take()
        return grad_out.reshape(in_shape)

    def output_shape(self, input_shape):
        return (input_shape[0], math.prod(input_shape[1:]))
