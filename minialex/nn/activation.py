"""ReLU and Dropout."""
import numpy as np

from .._random import uniform
from ..kernels.dropout import dropout_backward, dropout_forward
from ..kernels.relu import relu_backward, relu_forward
from .module import Module


class ReLU(Module):
    """y = max(x, 0). Keeps for backward: the output y (its sign is the mask)."""

    saved = ("y",)

    def __init__(self, inplace=False):
        super().__init__()

    def forward(self, x):
        # the kernels work on flat contiguous arrays; the reshape gives a 0-d input its shape back
        y = relu_forward(x).reshape(np.shape(x))
        self.save(y=y)
        return y

    def backward(self, grad_out, need_input_grad=True):
        (y,) = self.take()
        return relu_backward(grad_out, y).reshape(y.shape)


class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability p and scale the rest by
    1/(1-p) (p = 1 zeroes everything, as torch); identity in eval mode or with p = 0. Masks come
    from minialex's seeded generator, keyed per sample during training (`_random.uniform`).

    Keeps for backward: the mask (None when forward was the identity).
    """

    saved = ("mask",)

    def __init__(self, p=0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = float(p)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self.save(mask=None)
            return x
        # Drawn here, outside the kernel, so a seed reproduces a run whatever the thread count;
        # in training each sample's row is keyed by its index (_random.per_sample).
        keep = np.asarray(uniform(np.shape(x)) >= self.p)
        mask = keep.view(np.uint8)
        self.save(mask=mask)
        return dropout_forward(x, mask, self.p).reshape(mask.shape)

    def backward(self, grad_out, need_input_grad=True):
        (mask,) = self.take()
        if mask is None:
            return grad_out
        return dropout_backward(grad_out, mask, self.p).reshape(mask.shape)

    def extra_repr(self):
        return f"p={self.p}"
