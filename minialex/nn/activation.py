"""ReLU and Dropout."""
import numpy as np

from .._random import get_generator
from ..kernels.dropout import dropout_backward, dropout_forward
from ..kernels.relu import relu_backward, relu_forward
from .module import Module


class ReLU(Module):
    """y = max(x, 0). Keeps for backward: the output y (its sign is the mask)."""

    saved = ("y",)

    def __init__(self, inplace=False):
        super().__init__()
        self.y = None

    def forward(self, x):
        self.y = relu_forward(x)
        return self.y

    def backward(self, grad_out):
        dx = relu_backward(grad_out, self.y)
        self.y = None
        return dx


class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability p and scale the rest by
    1/(1-p); identity in eval mode. Masks come from minialex's seeded generator.

    Keeps for backward: the mask (None in eval mode).
    """

    saved = ("mask",)

    def __init__(self, p=0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = float(p)
        self.mask = None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self.mask = None
            return x
        # Drawn here, outside the kernel, so one generator decides every mask and a seed
        # reproduces a run whatever the thread count.
        self.mask = (get_generator().random(x.shape, dtype=np.float32) >= self.p).view(np.uint8)
        return dropout_forward(x, self.mask, self.p)

    def backward(self, grad_out):
        if self.mask is None:
            return grad_out
        dx = dropout_backward(grad_out, self.mask, self.p)
        self.mask = None
        return dx

    def extra_repr(self):
        return f"p={self.p}"
