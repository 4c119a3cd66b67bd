"""Optimiser updates as single fused passes over a parameter, its gradient and its state.

Every array is flattened (C-contiguous): p, g, buf: (P,). Each element is independent, so the
loops run in parallel. No fastmath: a NaN gradient must stay a NaN the training loop can see.
"""
import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def sgd_step(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    # p, g, buf: (P,); buf is the momentum buffer (unused when momentum == 0).
    n = p.shape[0]
    for i in prange(n):
        d = g[i] + weight_decay * p[i]
        if momentum != 0.0:
            if first:
                b = d
            else:
                b = momentum * buf[i] + (1.0 - dampening) * d
            buf[i] = b
            if nesterov:
                d = d + momentum * b
            else:
                d = b
        p[i] -= lr * d


def sgd_step_ref(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    d = g + weight_decay * p
    if momentum != 0.0:
        buf[...] = d if first else momentum * buf + (1.0 - dampening) * d
        d = d + momentum * buf if nesterov else buf.copy()
    p -= lr * d


@njit(parallel=True, cache=True)
def adam_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    # p, g, m, v: (P,); m and v are the first and second moment estimates; step counts from 1.
    n = p.shape[0]
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    step_size = lr / bias1
    for i in prange(n):
        d = g[i] + weight_decay * p[i]
        mi = beta1 * m[i] + (1.0 - beta1) * d
        vi = beta2 * v[i] + (1.0 - beta2) * d * d
        m[i] = mi
        v[i] = vi
        p[i] -= step_size * mi / (math.sqrt(vi) / bias2_sqrt + eps)


def adam_step_ref(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    d = g + weight_decay * p
    m[...] = beta1 * m + (1.0 - beta1) * d
    v[...] = beta2 * v + (1.0 - beta2) * d * d
    denom = np.sqrt(v) / math.sqrt(1.0 - beta2 ** step) + eps
    p -= (lr / (1.0 - beta1 ** step)) * m / denom
