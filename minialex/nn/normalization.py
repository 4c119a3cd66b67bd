"""LocalResponseNorm and BatchNorm2d."""
import numpy as np

from ..kernels.batchnorm import (batchnorm2d_backward, batchnorm2d_backward_eval,
                                 batchnorm2d_forward_eval, batchnorm2d_forward_train)
from ..kernels.lrn import lrn_backward, lrn_forward
from .module import Module, Parameter


class LocalResponseNorm(Module):
    """b = a / (k + alpha/n * sum of a² over n neighbouring channels)^beta, PyTorch's formula.

    The window holds size//2 channels before and (size-1)//2 after. The AlexNet paper writes
    alpha without the 1/n, so its alpha=1e-4 with n=5 is alpha=5e-4 here.
    Keeps for backward: input x, output y and the denominator base `scale`.
    """

    saved = ("x", "y", "scale")

    def __init__(self, size, alpha=1e-4, beta=0.75, k=1.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = int(size), float(alpha), float(beta), float(k)
        self.x = self.y = self.scale = None

    def forward(self, x):
        y, scale = lrn_forward(x, self.size, self.alpha, self.beta, self.k)
        self.x, self.y, self.scale = x, y, scale
        return y

    def backward(self, grad_out):
        dx = lrn_backward(grad_out, self.x, self.y, self.scale, self.size, self.alpha, self.beta, self.k)
        self.x = self.y = self.scale = None
        return dx

    def extra_repr(self):
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class BatchNorm2d(Module):
    """Per-channel normalisation over (N, H, W). Training mode uses batch statistics and updates
    running_mean/running_var (unbiased) with `momentum`; eval mode uses the running statistics.

    Keeps for backward: x, the batch mean and 1/std (training) or nothing extra (eval).
    """

    saved = ("x", "mean", "invstd")

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, float(eps), float(momentum)
        self.weight = Parameter(np.ones(num_features, np.float32))
        self.bias = Parameter(np.zeros(num_features, np.float32))
        self.register_buffer("running_mean", np.zeros(num_features, np.float32))
        self.register_buffer("running_var", np.ones(num_features, np.float32))
        self.register_buffer("num_batches_tracked", np.array(0, np.int64))
        self.x = self.mean = self.invstd = None
        self._eval_forward = False

    def forward(self, x):
        self.x = x
        if self.training:
            y, mean, var, invstd = batchnorm2d_forward_train(x, self.weight.data, self.bias.data, self.eps)
            n = x.size // x.shape[1]
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.running_mean[...] = (1 - m) * self.running_mean + m * mean
            self.running_var[...] = (1 - m) * self.running_var + m * unbiased
            self.num_batches_tracked[...] = self.num_batches_tracked + 1
            self.mean, self.invstd, self._eval_forward = mean, invstd, False
            return y
        self._eval_forward = True
        return batchnorm2d_forward_eval(x, self.weight.data, self.bias.data,
                                        self.running_mean, self.running_var, self.eps)

    def backward(self, grad_out):
        if self._eval_forward:
            dx = batchnorm2d_backward_eval(grad_out, self.weight.data, self.running_var, self.eps,
                                           self.weight.grad, self.bias.grad, self.x, self.running_mean)
        else:
            dx = batchnorm2d_backward(grad_out, self.x, self.weight.data, self.mean, self.invstd,
                                      self.weight.grad, self.bias.grad)
        self.x = self.mean = self.invstd = None
        return dx

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
