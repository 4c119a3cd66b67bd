"""Parameter initialisation, drawn from minialex's seeded generator (see `minialex.manual_seed`)."""
import math

import numpy as np

from .._random import get_generator


def uniform(shape, bound, dtype=np.float32):
    return get_generator().uniform(-bound, bound, size=shape).astype(dtype)


def normal(shape, std, mean=0.0, dtype=np.float32):
    return (mean + std * get_generator().standard_normal(size=shape)).astype(dtype)


def pytorch_default(shape, fan_in, dtype=np.float32):
    """PyTorch's default for Conv2d and Linear weights and biases.

    kaiming_uniform_(a=sqrt(5)) works out to U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the bias uses
    the same bound.
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return uniform(shape, bound, dtype)
