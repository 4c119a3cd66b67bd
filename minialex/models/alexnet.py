"""AlexNet in three variants.

- "torchvision": torchvision's AlexNet (64-192-384-256-256, AdaptiveAvgPool2d(6)), same
  state_dict keys and shapes, 224×224 input.
- "paper": Krizhevsky et al. 2012 (96-256-384-384-256, LRN after the ReLUs of conv1 and conv2,
  overlapping 3/2 pools, groups=2 where the network was split over two GPUs), 227×227 input,
  the paper's initialisation.
- "cifar": the small AlexNet for 32×32 input (48-128-192-128, FC 512-2048-2048).
`batch_norm=True` puts BatchNorm2d after every convolution (before its ReLU).
"""

from .. import nn
from ..nn import init

INPUT_SIZE = {"torchvision": 224, "paper": 227, "cifar": 32}

# LRN as the paper used it (k=2, n=5, alpha=1e-4 per channel of the window, beta=0.75).
# PyTorch divides alpha by n, hence 5e-4.
def _paper_lrn():
    return nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)


class AlexNet(nn.Module):
    """features -> avgpool -> flatten -> classifier, as torchvision's AlexNet."""

    def __init__(self, features, avgpool, classifier, variant):
        super().__init__()
        self.variant = variant
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier
        # Not a child: torchvision's AlexNet calls torch.flatten, so the flatten has no state_dict entry.
        object.__setattr__(self, "_flatten", nn.Flatten())

    def forward(self, x):
        # x: (N, 3, S, S) -> logits (N, num_classes)
        x = self.features(x)
        x = self.avgpool(x)
        x = self._flatten(x)
        return self.classifier(x)

    def backward(self, grad_logits, need_input_grad=False):
        """Fills every parameter's .grad. Like a PyTorch input that does not require grad, the
        image's gradient is only computed (and returned) when need_input_grad=True."""
        g = self.classifier.backward(grad_logits)
        g = self._flatten.backward(g)
        g = self.avgpool.backward(g)
        return self.features.backward(g, need_input_grad=need_input_grad)

    def output_shape(self, input_shape):
        s = self.avgpool.output_shape(self.features.output_shape(input_shape))
        return self.classifier.output_shape(self._flatten.output_shape(s))

    @property
    def num_classes(self):
        return self.classifier[-1].out_features


def _features(spec, batch_norm):
    """spec: tuples ("conv", in, out, k, stride, pad, groups) | ("lrn",) | ("pool",)"""
    layers = []
    for item in spec:
        if item[0] == "conv":
            _, cin, cout, k, s, p, g = item
            layers.append(nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU())
        elif item[0] == "lrn":
            layers.append(_paper_lrn())
        else:
            layers.append(nn.MaxPool2d(3, 2))
    return nn.Sequential(*layers)


def _classifier(in_features, hidden, num_classes, dropout):
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(),
        nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes))


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


def _paper_init(model):
    """Weights N(0, 0.01); bias 1 on conv2, conv4, conv5 and the hidden FC layers, else 0."""
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    ones = {id(convs[1]), id(convs[3]), id(convs[4]), id(linears[0]), id(linears[1])}
    for m in convs + linears:
        m.weight.data[...] = init.normal(m.weight.data.shape, 0.01)
        m.bias.data[...] = 1.0 if id(m) in ones else 0.0


def alexnet(num_classes=1000, variant="torchvision", batch_norm=False, dropout=0.5):
    """Build an AlexNet; see the module docstring for the variants."""
    if variant not in SPECS:
        raise ValueError(f"unknown AlexNet variant {variant!r}; choose one of {', '.join(SPECS)}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    features = _features(SPECS[variant], batch_norm)
    if variant == "torchvision":
        avgpool, flat, hidden = nn.AdaptiveAvgPool2d(6), 256 * 6 * 6, 4096
    elif variant == "paper":
        avgpool, flat, hidden = nn.Identity(), 256 * 6 * 6, 4096
    else:
        avgpool, flat, hidden = nn.Identity(), 128 * 2 * 2, 2048
    model = AlexNet(features, avgpool, _classifier(flat, hidden, int(num_classes), dropout), variant)
    if variant == "paper":
        _paper_init(model)
    return model
