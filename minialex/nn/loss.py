"""CrossEntropyLoss: log-softmax + negative log-likelihood, mean over the batch."""
import numpy as np

from ..kernels.cross_entropy import cross_entropy_backward, cross_entropy_forward
from .module import Module


class CrossEntropyLoss(Module):
    """`forward(logits, targets)` returns the mean loss (a float); `backward()` returns dlogits.

    label_smoothing mixes the one-hot target with the uniform distribution, as in PyTorch.
    Keeps for backward: log-probabilities and targets.
    """

    saved = ("log_probs", "targets")

    def __init__(self, label_smoothing=0.0):
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits, targets):
        # logits: (N, K), targets: (N,) integer class ids
        targets = np.ascontiguousarray(targets, dtype=np.int64)
        loss, log_probs = cross_entropy_forward(logits, targets, self.label_smoothing)
        self.save(log_probs=log_probs, targets=targets)
        return loss

    def backward(self, grad_out=1.0, need_input_grad=True):
        log_probs, targets = self.take()
        return cross_entropy_backward(log_probs, targets, self.label_smoothing, float(grad_out))

    def extra_repr(self):
        return f"label_smoothing={self.label_smoothing}" if self.label_smoothing else ""
