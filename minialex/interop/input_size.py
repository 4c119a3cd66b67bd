"""Whether a model can take square images of a given side, worked out from layer shapes alone.

The cifar and paper variants end their features without an adaptive pool, so their classifier
accepts one input size only; torchvision's accepts any size its convolutions and pools do not
shrink to nothing. `compare` and `export` check this before running or writing anything.
"""
from minialex import nn
from minialex.errors import CheckpointError


def check_input_size(model, size, where):
    """Raise CheckpointError (naming `where`) unless a (1, 3, size, size) input runs through `model`."""
    problem = None
    try:
        shape = model.avgpool.output_shape(model.features.output_shape((1, 3, size, size)))
    except ValueError as e:   # a kernel larger than what is left of the image
        problem = str(e)
    else:
        flat = 1
        for d in shape[1:]:
            flat *= d
        first = next(m for m in model.classifier if isinstance(m, nn.Linear))
        if min(shape) < 1:
            problem = f"the features shrink it to {shape[1:]}"
        elif flat != first.in_features:
            problem = (f"its features give {flat:,} values, the classifier takes "
                       f"{first.in_features:,}")
    if problem is not None:
        raise CheckpointError(f"{where}: this AlexNet {getattr(model, 'variant', '')} cannot take "
                              f"{size}x{size} images ({problem})")
