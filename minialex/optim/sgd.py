"""SGD with momentum, dampening, weight decay and Nesterov momentum, with PyTorch's update rule:

    d = grad + weight_decay * p
    buf = d (first step) or momentum * buf + (1 - dampening) * d
    d = d + momentum * buf (nesterov) or buf
    p -= lr * d
"""
import numpy as np

from ..kernels.optim import sgd_step
from .optimizer import Optimizer


class SGD(Optimizer):
    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def step(self):
        for i, p, group in self._indexed_params():
            momentum = float(group["momentum"])
            state = self.state.setdefault(i, {})
            first = "momentum_buffer" not in state
            if momentum != 0.0 and first:
                state["momentum_buffer"] = np.empty_like(p.data)
            buf = state.get("momentum_buffer", p.grad)  # unused without momentum
            sgd_step(p.data.reshape(-1), p.grad.reshape(-1), buf.reshape(-1), float(group["lr"]), momentum,
                     float(group["dampening"]), float(group["weight_decay"]), bool(group["nesterov"]), first)
