"""PyTorch AlexNet weights (a torch.save'd state_dict) -> a minialex checkpoint.

Reads the .pth with our restricted reader (torch need not be installed and the file's pickle
never runs), finds the state_dict in it, and writes a checkpoint that `inference` can use:
arch from the weights, ImageNet normalisation, and ImageNet's class names when the last layer
has 1,000 outputs (or the names of a labels file).

Everything is checked before the model is built: the output target, the labels file, finite
values, the class count (at most MAX_CLASSES) and every tensor's shape against the architecture,
so a file of a few bytes cannot make the converter build a model of gigabytes.
"""
import os
from collections import OrderedDict
from importlib import resources

import numpy as np

from minialex import models
from minialex.checkpoint import first_non_finite, load_into, save_checkpoint
from minialex.data.listfile import MAX_CLASSES
from minialex.data.transforms import (IMAGENET_EIGVAL, IMAGENET_EIGVEC, IMAGENET_MEAN, IMAGENET_STD,
                                      resize_for)   # the same 256 -> 224 rule training uses
from minialex.errors import CheckpointError, DataError
from minialex.files import check_input_file, check_output_target
from minialex.interop.torch_pickle import load_torch_file

# Wrapping checkpoints keep the weights under one of these keys (the first is PyTorch's ImageNet
# example, the second torchvision's reference scripts, the third the PyTorch tutorials).
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names in torchvision's index order (shipped with the package)."""
    text = resources.files("minialex.data").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names


def imagenet_normalization(variant="torchvision") -> dict:
    """ImageNet's mean/std and RGB principal components, with the resize/crop of the variant's
    input size."""
    crop = models.INPUT_SIZE[variant]
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "resize": resize_for(crop),
            "crop": crop, "pca_eigval": list(IMAGENET_EIGVAL), "pca_eigvec": [list(r) for r in IMAGENET_EIGVEC]}


def strip_wrappers(key: str) -> str:
    # DataParallel adds a "module." level: around the whole model ("module.features.0.weight") or,
    # as PyTorch's ImageNet example does for AlexNet, around the features only
    # ("features.module.0.weight"). No AlexNet key has a part called "module" of its own.
    return ".".join(part for part in key.split(".") if part != "module")


def state_dict_from(obj, path) -> OrderedDict:
    """The name -> array mapping inside what a .pth held: a state_dict, or a dict wrapping one."""
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds no state_dict (expected a dict of tensors, or a dict "
                              f"with a {' / '.join(repr(k) for k in STATE_DICT_KEYS)} entry)")
    state = OrderedDict()
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            shown = key[:60] if isinstance(key, str) else type(key).__name__
            raise CheckpointError(f"{path}: entry {shown!r} is not a tensor; not a state_dict")
        name = strip_wrappers(key)
        if name in state:
            raise CheckpointError(f"{path}: two tensors named {name!r}")
        state[name] = value
    return state


def read_torch_state_dict(path) -> OrderedDict:
    """state_dict (name -> np.ndarray) from a torch.save file, zip or legacy, no torch needed."""
    return state_dict_from(load_torch_file(path), os.fspath(path))


def arch_from_state_dict(state, variant, path) -> dict:
    """arch for the checkpoint: classes from the last Linear layer, batch norm if it has stats."""
    if variant not in models.INPUT_SIZE:
        raise CheckpointError(f"{path}: unknown architecture {variant!r}; choose one of "
                              f"{', '.join(models.INPUT_SIZE)}")
    linears = []
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "classifier" and parts[1].isdigit() \
                and parts[2] == "weight" and value.ndim == 2:
            linears.append((int(parts[1]), value.shape[0]))
    if not linears:
        raise CheckpointError(f"{path}: no classifier.<i>.weight matrix; not an AlexNet state_dict")
    num_classes = int(max(linears)[1])
    if not 1 <= num_classes <= MAX_CLASSES:
        raise CheckpointError(f"{path}: last layer has {num_classes:,} classes; expected 1 to "
                              f"{MAX_CLASSES:,}")
    batch_norm = any(k.endswith(".running_mean") for k in state)
    return models.Arch(variant, num_classes, batch_norm).to_dict()


def check_shapes(state, arch, path):
    """CheckpointError naming the first tensor whose shape the architecture does not have."""
    shapes = models.state_shapes(models.Arch.from_dict(arch))
    for key, value in state.items():
        if key in shapes and tuple(value.shape) != tuple(shapes[key]):
            raise CheckpointError(f"{path}: weights are for another architecture: {key!r} has "
                                  f"shape {tuple(value.shape)}, AlexNet "
                                  f"{arch['variant']} with {arch['num_classes']} classes needs "
                                  f"{tuple(shapes[key])}")


def convert_torch_file(src, dst, *, arch="torchvision", labels=None) -> dict:
    """Convert the PyTorch AlexNet weights in `src` to a minialex checkpoint at `dst`.

    arch: the variant the weights are for; labels: an optional `class_id name` labels file.
    Returns the checkpoint's arch dict. Raises CheckpointError / DataError (one line, naming the
    file) for anything that cannot be converted; `dst` is then left as it was.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    check_output_target(dst, "checkpoint", CheckpointError)
    if labels is not None:
        check_input_file(labels, "labels file", DataError)
    state = read_torch_state_dict(src)
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"{src}: {bad!r} holds NaN or inf values; refusing to convert it")
    arch_dict = arch_from_state_dict(state, arch, src)
    check_shapes(state, arch_dict, src)
    model = models.build(models.Arch.from_dict(arch_dict))
    load_into(model, state, src)
    num_classes = arch_dict["num_classes"]
    if labels is not None:
        from minialex.data import read_labels
        class_names = read_labels(labels)
        if len(class_names) != num_classes:
            raise CheckpointError(f"{labels}: names {len(class_names)} classes, but the weights "
                                  f"in {src} have {num_classes}")
    elif num_classes == 1000:
        class_names = imagenet_class_names()
    else:
        class_names = [f"class_{i}" for i in range(num_classes)]
    save_checkpoint(dst, model, arch=arch_dict, class_names=class_names,
                    normalization=imagenet_normalization(arch))
    return arch_dict
