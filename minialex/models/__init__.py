"""Model definitions."""
from .alexnet import INPUT_SIZE, AlexNet, alexnet
from .summary import summary

__all__ = ["INPUT_SIZE", "AlexNet", "alexnet", "summary"]
