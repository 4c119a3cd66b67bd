"""Adam with PyTorch's update rule (L2 weight decay added to the gradient, as torch.optim.Adam):

    d = grad + weight_decay * p;  m = b1 m + (1-b1) d;  v = b2 v + (1-b2) d²
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
"""
import numpy as np

from ..kernels.optim import adam_step
from .optimizer import Optimizer


class Adam(Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid beta parameters: {betas}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def step(self):
        for i, p, group in self._indexed_params():
            state = self.state.setdefault(i, {})
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = np.zeros_like(p.data)
                state["exp_avg_sq"] = np.zeros_like(p.data)
            state["step"] += 1
            b1, b2 = group["betas"]
            adam_step(p.data.reshape(-1), p.grad.reshape(-1), state["exp_avg"].reshape(-1),
                      state["exp_avg_sq"].reshape(-1), float(group["lr"]), float(b1), float(b2),
                      float(group["eps"]), float(group["weight_decay"]), state["step"])
