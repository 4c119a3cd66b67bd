"""Model definitions and the registry that builds them from an Arch."""
from .alexnet import AlexNet, alexnet
from .registry import FIELDS, INPUT_SIZE, Arch, build, parameter_shapes, state_shapes
from .summary import summary

__all__ = ["FIELDS", "INPUT_SIZE", "AlexNet", "Arch", "alexnet", "build", "parameter_shapes",
           "state_shapes", "summary"]
