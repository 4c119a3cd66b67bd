"""LocalResponseNorm and BatchNorm2d (optionally synchronised across data-parallel processes)."""
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

    def forward(self, x):
        if x.size == 0:    # an empty batch: nothing to normalise, as torch returns
            self.save(x=x, y=None, scale=None)
            return np.empty_like(x)
        y, scale = lrn_forward(x, self.size, self.alpha, self.beta, self.k)
        self.save(x=x, y=y, scale=scale)
        return y

    def backward(self, grad_out, need_input_grad=True):
        x, y, scale = self.take()
        if x.size == 0:
            return np.empty_like(x)
        return lrn_backward(grad_out, x, y, scale, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self):
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class BatchNorm2d(Module):
    """Per-channel normalisation over (N, H, W). Training mode uses batch statistics and updates
    running_mean/running_var (unbiased) with `momentum`; eval mode uses the running statistics.

    `allreduce` (constructor argument or attribute; None: off) synchronises training across
    data-parallel processes, as torch.nn.SyncBatchNorm does: a callable that sums a float64
    array in place over all processes makes the statistics, the running statistics and the
    input gradient those of the global batch (2 calls in forward, 1 in backward; every process
    must make them, so one whose batch is empty takes part too). The weight/bias gradients stay
    this process's share, for the gradient all-reduce to sum. Eval mode never calls it.
    An empty batch (without allreduce) gives an empty output and leaves the running statistics
    alone, as torch does (which still counts it in num_batches_tracked).
    Keeps for backward: x, in training the batch mean and 1/std (None after eval mode), and the
    allreduce the forward used.
    """

    saved = ("x", "mean", "invstd", "allreduce")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, allreduce=None):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, float(eps), float(momentum)
        self.weight = Parameter(np.ones(num_features, np.float32))
        self.bias = Parameter(np.zeros(num_features, np.float32))
        self.register_buffer("running_mean", np.zeros(num_features, np.float32))
        self.register_buffer("running_var", np.ones(num_features, np.float32))
        self.register_buffer("num_batches_tracked", np.array(0, np.int64))
        self.allreduce = allreduce

    def forward(self, x):
        if self.training:
            self.num_batches_tracked[...] = self.num_batches_tracked + 1
        sync = self.allreduce if self.training else None
        if not self.training or (x.size == 0 and sync is None):
            self.save(x=x, mean=None, invstd=None, allreduce=None)
            if x.size == 0:
                return np.empty_like(x)
            return batchnorm2d_forward_eval(x, self.weight.data, self.bias.data,
                                            self.running_mean, self.running_var, self.eps)
        y, mean, var, invstd, n = batchnorm2d_forward_train(x, self.weight.data, self.bias.data, self.eps,
                                                            allreduce=sync, return_count=True)
        unbiased = var * (n / max(n - 1, 1))    # n: values per channel in the (global) batch
        m = self.momentum
        self.running_mean[...] = (1 - m) * self.running_mean + m * mean
        self.running_var[...] = (1 - m) * self.running_var + m * unbiased
        self.save(x=x, mean=mean, invstd=invstd, allreduce=sync)
        return y

    def backward(self, grad_out, need_input_grad=True):
        x, mean, invstd, sync = self.take()
        dgamma, dbeta = self.weight.grad, self.bias.grad
        if x.size == 0 and sync is None:    # nothing to add to the parameters' gradients
            return np.empty_like(x)
        if mean is None:
            return batchnorm2d_backward_eval(grad_out, self.weight.data, self.running_var, self.eps,
                                             dgamma, dbeta, x, self.running_mean)
        return batchnorm2d_backward(grad_out, x, self.weight.data, mean, invstd, dgamma, dbeta,
                                    allreduce=sync)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


def convert_sync_batchnorm(model, allreduce):
    """Set `allreduce` on every BatchNorm2d in `model` (None turns synchronisation off), like
    torch.nn.SyncBatchNorm.convert_sync_batchnorm. Returns the model."""
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.allreduce = allreduce
    return model
