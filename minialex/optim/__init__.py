"""Optimisers and learning-rate schedules with PyTorch's update rules."""
from .optimizer import Optimizer
from .sgd import SGD
from .adam import Adam
from . import lr_scheduler

__all__ = ["Optimizer", "SGD", "Adam", "lr_scheduler"]
