"""Layer-by-layer alignment check against PyTorch.

Runs one image through a minialex checkpoint and through a torch.nn model of the same
architecture holding the weights of a .pth file, and reports, after every layer, the sum and
the maximum of |minialex - torch|. A wrong conversion or a kernel bug then shows at the first
layer where the two part ways instead of only as different final scores.

PyTorch is needed here (and only here): it is the reference being compared against.
"""
import sys
from typing import NamedTuple

import numpy as np

from minialex import nn
from minialex.checkpoint import load_checkpoint, model_from_checkpoint
from minialex.errors import CheckpointError, MinialexError, printable
from minialex.files import check_input_file
from minialex.interop.convert import STATE_DICT_KEYS, strip_wrappers

# A layer "disagrees" when its largest difference exceeds this fraction of its largest activation.
RELATIVE_TOLERANCE = 1e-4


class LayerDiff(NamedTuple):
    name: str
    kind: str
    shape: tuple
    sum_abs_diff: float
    max_abs_diff: float
    max_abs_value: float   # of the torch activation, the scale the difference is judged against

    @property
    def agrees(self):
        return self.max_abs_diff <= RELATIVE_TOLERANCE * max(self.max_abs_value, 1e-30)


def require_torch():
    try:
        import torch
    except ImportError:
        raise MinialexError("compare needs PyTorch, the reference it compares against, and it is "
                            "not installed (pip install torch)") from None
    return torch


def torch_model_like(model):
    """An untrained torch.nn AlexNet with the architecture (layers, indices, keys) of `model`."""
    torch = require_torch()

    def twin(m):
        if isinstance(m, nn.Sequential):
            return torch.nn.Sequential(*[twin(c) for c in m])
        if isinstance(m, nn.Conv2d):
            return torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                                   m.padding, groups=m.groups, bias=m.bias is not None)
        if isinstance(m, nn.Linear):
            return torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        if isinstance(m, nn.BatchNorm2d):
            return torch.nn.BatchNorm2d(m.num_features, m.eps, m.momentum)
        if isinstance(m, nn.ReLU):
            return torch.nn.ReLU()
        if isinstance(m, nn.LocalResponseNorm):
            return torch.nn.LocalResponseNorm(m.size, m.alpha, m.beta, m.k)
        if isinstance(m, nn.MaxPool2d):
            return torch.nn.MaxPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return torch.nn.AdaptiveAvgPool2d(m.output_size)
        if isinstance(m, nn.Dropout):
            return torch.nn.Dropout(m.p)
        if isinstance(m, nn.Identity):
            return torch.nn.Identity()
        if isinstance(m, nn.Flatten):
            return torch.nn.Flatten()
        raise TypeError(f"no torch.nn equivalent for {type(m).__name__}")

    class TorchAlexNet(torch.nn.Module):
        # A Flatten child owns no state: the state_dict keys stay torchvision's.
        def __init__(self):
            super().__init__()
            for name, child in model._modules.items():
                self.add_module(name, twin(child))

        def forward(self, x):
            for child in self.children():
                x = child(x)
            return x

    return TorchAlexNet()


def _layers(model):
    """(name, layer) of every leaf layer, in execution order (the order children are declared),
    for minialex and torch models alike."""
    for name, m in model.named_modules():
        if name and not any(True for _ in m.children()):
            yield name, m


def compare_models(model, torch_model, x):
    """LayerDiff per layer for input x (N, 3, S, S); both models are run in eval mode."""
    torch = require_torch()
    model.eval()
    torch_model.eval()
    ours = np.asarray(x, dtype=np.float32)
    with torch.no_grad():
        theirs = torch.from_numpy(ours.copy())
        torch_layers = dict(_layers(torch_model))
        rows = []
        for name, layer in _layers(model):
            ours, theirs, kind = layer(ours), torch_layers[name](theirs), type(layer).__name__
            ref = theirs.numpy()
            if ours.shape != ref.shape:
                raise ValueError(f"{name}: minialex gives shape {ours.shape}, torch {ref.shape}")
            diff = np.abs(ours.astype(np.float64) - ref)
            rows.append(LayerDiff(name, kind, ref.shape, float(diff.sum()), float(diff.max(initial=0)),
                                  float(np.abs(ref).max(initial=0))))
    return rows


def format_report(rows) -> str:
    lines = [f"{'layer':<14} {'type':<18} {'shape':<16} {'sum |diff|':>12} {'max |diff|':>12} "
             f"{'max |torch|':>12}"]
    first_bad = next((r for r in rows if not r.agrees), None)
    for r in rows:
        shape = "x".join(map(str, r.shape))
        mark = "  <- first mismatch" if r is first_bad else ""
        lines.append(f"{r.name:<14} {r.kind:<18} {shape:<16} {r.sum_abs_diff:>12.4e} "
                     f"{r.max_abs_diff:>12.4e} {r.max_abs_value:>12.4e}{mark}")
    if first_bad is None:
        lines.append(f"all {len(rows)} layers agree (max |diff| <= {RELATIVE_TOLERANCE:g} x max |torch|)")
    else:
        lines.append(f"layers differ from {first_bad.name} on "
                     f"(max |diff| > {RELATIVE_TOLERANCE:g} x max |torch|)")
    return "\n".join(lines)


def load_torch_weights(torch_model, path):
    """Load a .pth state_dict (or a dict wrapping one) into torch_model with torch's safe loader."""
    torch = require_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such PyTorch file") from None
    except Exception as e:  # torch reports bad files with many exception types, often multi-line
        raise CheckpointError(f"{path}: torch cannot load it ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds no state_dict")
    state = {strip_wrappers(str(k)): v for k, v in obj.items()}
    try:
        torch_model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit the checkpoint's architecture: {e}") from None
    return torch_model


def compare_files(load, torch_path, input_path, out=None):
    """`minialex compare`: print the per-layer table for one image; returns the LayerDiff rows."""
    from minialex.data import load_image
    from minialex.evaluation import eval_transform
    out = out if out is not None else sys.stdout
    require_torch()
    check_input_file(torch_path, "PyTorch file", CheckpointError)   # torch.load would wait on a FIFO
    ckpt = load_checkpoint(load)
    model = model_from_checkpoint(ckpt)
    # The reader has checked the crop against the architecture's input size.
    torch_model = load_torch_weights(torch_model_like(model), torch_path)
    x = eval_transform(ckpt)(load_image(input_path))[None]
    rows = compare_models(model, torch_model, x)
    print(printable(f"minialex {load} vs torch {torch_path} on {input_path}", None), file=out)
    print(format_report(rows), file=out)
    return rows
