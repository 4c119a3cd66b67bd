"""minialex: AlexNet on the CPU, from scratch in NumPy and Numba.

    import minialex
    from minialex import nn, optim, models
    minialex.manual_seed(0)
    model = models.alexnet(num_classes=10, variant="cifar")

Importing minialex changes nothing in the importing program and loads no Numba: `nn`, `optim` and
`models` load on first use. Training and the benchmarks tune glibc's malloc where they start
(`_memory.keep_freed_memory`), not here.
"""
import importlib

from ._random import get_generator, manual_seed

__version__ = "0.1.0"
_SUBMODULES = ("nn", "optim", "models")
__all__ = ["manual_seed", "get_generator", "nn", "optim", "models", "__version__"]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'minialex' has no attribute {name!r}")
