"""AlexNet in three variants.

- "torchvision": torchvision's AlexNet (64-192-384-256-256, AdaptiveAvgPool2d(6)), same
  state_dict keys and shapes, 224×224 input.
- "paper": Krizhevsky et al. 2012 (96-256-384-384-256, LRN after the ReLUs of conv1 and conv2,
  overlapping 3/2 pools, groups=2 where the network was split over two GPUs), 227×227 input,
  the paper's initialisation.
- "cifar": the small AlexNet for 32×32 input (48-128-192-128, FC 512-2048-2048).
`batch_norm=True` puts BatchNorm2d after every convolution (before its ReLU).

Each variant is written once, as a plan: a list of layer descriptions per part of the model.
`alexnet()` builds modules from the plan and `state_shapes()` reads every state_dict shape off
the same plan without allocating anything, so the two cannot disagree.
"""
from collections import OrderedDict

from .. import nn
from ..nn import init

# Convolution stacks: ("conv", in, out, k, stride, pad, groups) | ("lrn",) | ("pool",).
# A ReLU follows every conv (after its BatchNorm2d when batch_norm is on).
SPECS = {
    "torchvision": [("conv", 3, 64, 11, 4, 2, 1), ("pool",),
                    ("conv", 64, 192, 5, 1, 2, 1), ("pool",),
                    ("conv", 192, 384, 3, 1, 1, 1),
                    ("conv", 384, 256, 3, 1, 1, 1),
                    ("conv", 256, 256, 3, 1, 1, 1), ("pool",)],
    "paper": [("conv", 3, 96, 11, 4, 0, 1), ("lrn",), ("pool",),
              ("conv", 96, 256, 5, 1, 2, 2), ("lrn",), ("pool",),
              ("conv", 256, 384, 3, 1, 1, 1),
              ("conv", 384, 384, 3, 1, 1, 2),
              ("conv", 384, 256, 3, 1, 1, 2), ("pool",)],
    "cifar": [("conv", 3, 48, 7, 1, 2, 1), ("lrn",), ("pool",),
              ("conv", 48, 128, 5, 1, 2, 1), ("lrn",), ("pool",),
              ("conv", 128, 192, 3, 1, 1, 1),
              ("conv", 192, 128, 3, 1, 1, 1), ("pool",)],
}

# (avgpool output size or None for no pooling, flattened features, hidden units of the FC layers)
HEADS = {"torchvision": (6, 256 * 6 * 6, 4096), "paper": (None, 256 * 6 * 6, 4096),
         "cifar": (None, 128 * 2 * 2, 2048)}


def plan(variant, num_classes, batch_norm, dropout=0.5):
    """{"features": [...], "avgpool": layer, "classifier": [...]}: every layer as a tuple
    ("conv", in, out, k, stride, pad, groups) | ("bn", c) | ("relu",) | ("lrn",) | ("pool",) |
    ("avgpool", size) | ("identity",) | ("dropout", p) | ("linear", in, out), in forward order."""
    if variant not in SPECS:
        raise ValueError(f"unknown AlexNet variant {variant!r}; choose one of {', '.join(SPECS)}")
    features = []
    for item in SPECS[variant]:
        features.append(item)
        if item[0] == "conv":
            features += [("bn", item[2])] if batch_norm else []
            features.append(("relu",))
    pool, flat, hidden = HEADS[variant]
    classifier = [("dropout", dropout), ("linear", flat, hidden), ("relu",),
                  ("dropout", dropout), ("linear", hidden, hidden), ("relu",),
                  ("linear", hidden, num_classes)]
    return {"features": features, "avgpool": ("avgpool", pool) if pool else ("identity",),
            "classifier": classifier}


# LRN as the paper used it (k=2, n=5, alpha=1e-4 per channel of the window, beta=0.75).
# PyTorch divides alpha by n, hence 5e-4. Public: the int8 model runs the same LRN in float32.
PAPER_LRN = {"size": 5, "alpha": 5e-4, "beta": 0.75, "k": 2.0}


def _paper_lrn():
    return nn.LocalResponseNorm(**PAPER_LRN)


def _module(layer):
    kind, args = layer[0], layer[1:]
    if kind == "conv":
        cin, cout, k, s, p, g = args
        return nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g)
    return {"bn": nn.BatchNorm2d, "relu": nn.ReLU, "lrn": _paper_lrn, "pool": lambda: nn.MaxPool2d(3, 2),
            "avgpool": nn.AdaptiveAvgPool2d, "identity": nn.Identity, "dropout": nn.Dropout,
            "linear": nn.Linear}[kind](*args)


def _sequential(layers):
    """The layers as a Sequential, declaring every conv directly followed by a ReLU as fused."""
    seq = nn.Sequential(*[_module(layer) for layer in layers])
    for i, (layer, after) in enumerate(zip(layers, layers[1:])):
        if layer[0] == "conv" and after[0] == "relu":
            seq.fuse_relu(i)
    return seq


def _state_entries(layer):
    """[(name, shape, is_parameter)] of one layer's state_dict entries, in PyTorch's order."""
    kind = layer[0]
    if kind == "conv":
        _, cin, cout, k, _, _, g = layer
        return [("weight", (cout, cin // g, k, k), True), ("bias", (cout,), True)]
    if kind == "linear":
        _, fin, fout = layer
        return [("weight", (fout, fin), True), ("bias", (fout,), True)]
    if kind == "bn":
        c = layer[1]
        return [("weight", (c,), True), ("bias", (c,), True), ("running_mean", (c,), False),
                ("running_var", (c,), False), ("num_batches_tracked", (), False)]
    return []


def state_shapes(variant, num_classes, batch_norm, parameters_only=False):
    """OrderedDict state_dict key -> shape of the model alexnet(...) would build, in
    state_dict order, read off the plan alone (nothing is allocated). The pools and the
    flatten own no state, so only features and classifier have entries."""
    layers = plan(variant, num_classes, batch_norm)
    shapes = OrderedDict()
    for part in ("features", "classifier"):
        for i, layer in enumerate(layers[part]):
            for name, shape, is_parameter in _state_entries(layer):
                if is_parameter or not parameters_only:
                    shapes[f"{part}.{i}.{name}"] = shape
    return shapes


class AlexNet(nn.Module):
    """features -> avgpool -> flatten -> classifier, as torchvision's AlexNet. The Flatten is a
    child like the others (it owns no state, so the state_dict keys stay torchvision's), and
    the children are declared in the order forward runs them."""

    def __init__(self, features, avgpool, classifier, variant):
        super().__init__()
        self.variant = variant
        self.features = features
        self.avgpool = avgpool
        self.flatten = nn.Flatten()
        self.classifier = classifier

    def forward(self, x):
        # x: (N, 3, S, S) -> logits (N, num_classes)
        x = self.features(x)
        x = self.avgpool(x)
        x = self.flatten(x)
        return self.classifier(x)

    def backward(self, grad_logits, need_input_grad=False):
        """Fills every parameter's .grad. Like a PyTorch input that does not require grad, the
        image's gradient is only computed (and returned) when need_input_grad=True."""
        g = self.classifier.backward(grad_logits)
        self.classifier.backward_done()
        g = self.flatten.backward(g)
        self.flatten.backward_done()
        g = self.avgpool.backward(g)
        self.avgpool.backward_done()
        g = self.features.backward(g, need_input_grad=need_input_grad)
        self.features.backward_done()
        return g

    def output_shape(self, input_shape):
        for child in self.children():
            input_shape = child.output_shape(input_shape)
        return input_shape

    def macs(self, input_shape):
        total = 0
        for child in self.children():
            total += child.macs(input_shape)
            input_shape = child.output_shape(input_shape)
        return total

    @property
    def num_classes(self):
        return self.classifier[-1].out_features


def _paper_init(model):
    """Weights N(0, 0.01); bias 1 on conv2, conv4, conv5 and the hidden FC layers, else 0."""
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    ones = {id(convs[1]), id(convs[3]), id(convs[4]), id(linears[0]), id(linears[1])}
    for m in convs + linears:
        m.weight.data[...] = init.normal(m.weight.data.shape, 0.01)
        m.bias.data[...] = 1.0 if id(m) in ones else 0.0


def alexnet(num_classes=1000, variant="torchvision", batch_norm=False, dropout=0.5):
    """Build an AlexNet; see the module docstring for the variants (models.build(Arch) checks
    its arguments strictly; this keeps PyTorch's loose constructor style)."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    parts = plan(variant, int(num_classes), batch_norm, dropout)
    model = AlexNet(_sequential(parts["features"]), _module(parts["avgpool"]),
                    _sequential(parts["classifier"]), variant)
    if variant == "paper":
        _paper_init(model)
    return model
