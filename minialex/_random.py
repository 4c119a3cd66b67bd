"""The one seeded random source of minialex (parameter init, dropout masks, shuffling).

`manual_seed(n)` re-seeds it, like `torch.manual_seed`. Kernels never draw random numbers
themselves: callers draw from this generator and pass arrays in.
"""
import numpy as np

_generator = np.random.default_rng(0)


def manual_seed(seed: int) -> np.random.Generator:
    global _generator
    _generator = np.random.default_rng(seed)
    return _generator


def get_generator() -> np.random.Generator:
    return _generator
