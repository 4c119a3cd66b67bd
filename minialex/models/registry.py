"""The models minialex can build, described by a small checked record.

`Arch` is everything a model is built from, and what a checkpoint stores about it;
`Arch.from_dict` reads one from JSON-like data (a checkpoint header) and refuses anything
unexpected with a one-line ValueError naming the field. `build(arch)` makes the model;
`state_shapes(arch)` / `parameter_shapes(arch)` give the shape of every state_dict entry
without allocating one, so a reader can check a file's weights before building a model of
200,000 classes.
"""
import math
from dataclasses import asdict, dataclass

from .alexnet import alexnet
from .alexnet import state_shapes as alexnet_state_shapes

# Image side each variant is built for (its classifier's input size depends on it).
INPUT_SIZE = {"torchvision": 224, "paper": 227, "cifar": 32}

FIELDS = ("variant", "num_classes", "batch_norm", "dropout", "input_size")


def _max_classes():
    # Imported here, not at the top, so that `import minialex` does not load the data package.
    from ..data.listfile import MAX_CLASSES
    return MAX_CLASSES


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v):
    text = repr(v)
    return text if len(text) <= 40 else text[:40] + "..."


@dataclass(frozen=True)
class Arch:
    """variant: one of INPUT_SIZE; num_classes: int in 1..MAX_CLASSES; batch_norm: bool;
    dropout: float in [0, 1); input_size: the variant's INPUT_SIZE (the default).
    Construction checks every field (ValueError naming it)."""

    variant: str
    num_classes: int
    batch_norm: bool = False
    dropout: float = 0.5
    input_size: int | None = None

    def __post_init__(self):
        if not isinstance(self.variant, str) or self.variant not in INPUT_SIZE:
            raise ValueError(f"variant: unknown {_show(self.variant)}, "
                             f"expected one of {', '.join(INPUT_SIZE)}")
        limit = _max_classes()
        if not _is_int(self.num_classes) or not 1 <= self.num_classes <= limit:
            raise ValueError(f"num_classes must be an integer in 1..{limit}, got {_show(self.num_classes)}")
        if not isinstance(self.batch_norm, bool):
            raise ValueError(f"batch_norm must be true or false, got {_show(self.batch_norm)}")
        d = self.dropout
        if (not isinstance(d, (int, float)) or isinstance(d, bool) or not math.isfinite(d)
                or not 0.0 <= d < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {_show(d)}")
        object.__setattr__(self, "dropout", float(d))
        size = INPUT_SIZE[self.variant]
        if self.input_size is None:
            object.__setattr__(self, "input_size", size)
        elif not _is_int(self.input_size) or self.input_size != size:
            raise ValueError(f"input_size must be {size} for the {self.variant} variant, "
                             f"got {_show(self.input_size)}")

    @classmethod
    def from_dict(cls, d):
        """Arch from a dict with keys FIELDS (variant and num_classes required, the rest
        default); ValueError on a missing or unknown key or a bad value."""
        if not isinstance(d, dict):
            raise ValueError(f"architecture must be a mapping of {', '.join(FIELDS)}, got {_show(d)}")
        unknown = [k for k in d if k not in FIELDS]
        if unknown:
            raise ValueError(f"{_show(unknown[0])}: unknown architecture field, expected {', '.join(FIELDS)}")
        for key in ("variant", "num_classes"):
            if key not in d:
                raise ValueError(f"{key}: missing from the architecture")
        if "input_size" in d and d["input_size"] is None:
            raise ValueError("input_size must be an integer, got None")
        return cls(**d)

    def to_dict(self):
        """The fields as a plain dict (JSON-ready); from_dict(to_dict()) == self."""
        return asdict(self)


def build(arch):
    """A freshly initialised model for `arch` (an Arch), in training mode."""
    if not isinstance(arch, Arch):
        raise TypeError(f"build expects an Arch, got {type(arch).__name__} (use Arch.from_dict)")
    return alexnet(num_classes=arch.num_classes, variant=arch.variant,
                   batch_norm=arch.batch_norm, dropout=arch.dropout)


def state_shapes(arch):
    """{state_dict key: shape} for every entry (parameters and buffers) of build(arch), in
    state_dict order, computed without allocating the model."""
    return alexnet_state_shapes(arch.variant, arch.num_classes, arch.batch_norm)


def parameter_shapes(arch):
    """{key: shape} for the trainable parameters only (state_shapes without the buffers)."""
    return alexnet_state_shapes(arch.variant, arch.num_classes, arch.batch_norm, parameters_only=True)
