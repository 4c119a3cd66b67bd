"""minialex: AlexNet on the CPU, from scratch in NumPy and Numba.

    import minialex
    from minialex import nn, optim, models
    minialex.manual_seed(0)
    model = models.alexnet(num_classes=10, variant="cifar")
"""
from ._memory import keep_freed_memory
from ._random import manual_seed, get_generator

keep_freed_memory()
from . import nn, optim, models

__version__ = "0.1.0"
__all__ = ["manual_seed", "get_generator", "nn", "optim", "models", "__version__"]
