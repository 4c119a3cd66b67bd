"""Layers with PyTorch's names and semantics, each with forward beside backward."""
from .module import Module, Parameter, Identity
from .container import Sequential
from .conv import Conv2d
from .linear import Linear, Flatten
from .activation import ReLU, Dropout
from .pooling import MaxPool2d, AdaptiveAvgPool2d
from .normalization import LocalResponseNorm, BatchNorm2d
from .loss import CrossEntropyLoss

__all__ = ["Module", "Parameter", "Sequential", "Identity", "Conv2d", "Linear", "Flatten", "ReLU",
           "Dropout", "MaxPool2d", "AdaptiveAvgPool2d", "LocalResponseNorm", "BatchNorm2d",
           "CrossEntropyLoss"]
