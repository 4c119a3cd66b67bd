"""PyTorch twins of minialex's AlexNets for the tests, written out layer by layer from their
sources, NOT derived from minialex's own layer list (a wrong layer spec there must fail):

- torchvision: torchvision.models.alexnet (torchvision/models/alexnet.py);
- paper: Krizhevsky, Sutskever, Hinton 2012, section 3 and figure 2: 96 11x11/4 kernels,
  LRN (k=2, n=5, alpha=1e-4, beta=0.75) after the ReLU of conv1 and conv2, overlapping 3x3/2
  max pools, conv2/4/5 connected only within one GPU (groups=2), 227x227 input, FC 4096-4096;
- cifar: the variant documented in minialex/models/alexnet.py: 48 7x7 (pad 2), LRN, pool,
  128 5x5 (pad 2), LRN, pool, 192 3x3, 128 3x3, pool -> 128x2x2 -> FC 2048-2048.

With batch_norm every convolution is followed by BatchNorm2d, before its ReLU (the indices after
it shift by one, as torchvision's vgg*_bn do). Layer indices are the state_dict keys.
"""
import numpy as np


def _conv(torch, cin, cout, k, stride, pad, groups, batch_norm):
    layers = [torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups)]
    if batch_norm:
        layers.append(torch.nn.BatchNorm2d(cout))
    return layers + [torch.nn.ReLU()]


def _classifier(torch, flat, hidden, num_classes, dropout):
    return torch.nn.Sequential(
        torch.nn.Dropout(dropout), torch.nn.Linear(flat, hidden), torch.nn.ReLU(),
        torch.nn.Dropout(dropout), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, num_classes))


def torch_alexnet(variant, num_classes, batch_norm=False, dropout=0.5):
    """A freshly initialised torch.nn AlexNet of `variant` with minialex's state_dict keys."""
    import torch

    bn = batch_norm
    pool = lambda: torch.nn.MaxPool2d(kernel_size=3, stride=2)  # noqa: E731
    # torch's LocalResponseNorm divides alpha by the window size n; the paper does not.
    lrn = lambda: torch.nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0)  # noqa: E731
    if variant == "torchvision":
        features = [*_conv(torch, 3, 64, 11, 4, 2, 1, bn), pool(),
                    *_conv(torch, 64, 192, 5, 1, 2, 1, bn), pool(),
                    *_conv(torch, 192, 384, 3, 1, 1, 1, bn),
                    *_conv(torch, 384, 256, 3, 1, 1, 1, bn),
                    *_conv(torch, 256, 256, 3, 1, 1, 1, bn), pool()]
        avgpool, flat, hidden = torch.nn.AdaptiveAvgPool2d((6, 6)), 256 * 6 * 6, 4096
    elif variant == "paper":
        features = [*_conv(torch, 3, 96, 11, 4, 0, 1, bn), lrn(), pool(),      # 227 -> 55 -> 27
                    *_conv(torch, 96, 256, 5, 1, 2, 2, bn), lrn(), pool(),     # 27 -> 13
                    *_conv(torch, 256, 384, 3, 1, 1, 1, bn),                   # all of conv2's maps
                    *_conv(torch, 384, 384, 3, 1, 1, 2, bn),
                    *_conv(torch, 384, 256, 3, 1, 1, 2, bn), pool()]           # 13 -> 6
        avgpool, flat, hidden = torch.nn.Identity(), 256 * 6 * 6, 4096
    elif variant == "cifar":
        features = [*_conv(torch, 3, 48, 7, 1, 2, 1, bn), lrn(), pool(),       # 32 -> 30 -> 14
                    *_conv(torch, 48, 128, 5, 1, 2, 1, bn), lrn(), pool(),     # 14 -> 6
                    *_conv(torch, 128, 192, 3, 1, 1, 1, bn),
                    *_conv(torch, 192, 128, 3, 1, 1, 1, bn), pool()]           # 6 -> 2
        avgpool, flat, hidden = torch.nn.Identity(), 128 * 2 * 2, 2048
    else:
        raise ValueError(variant)

    class AlexNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(*features)
            self.avgpool = avgpool
            self.classifier = _classifier(torch, flat, hidden, num_classes, dropout)

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return AlexNet()


def copy_weights(net, model):
    """Load minialex `model`'s state_dict into torch `net` key by key (strict: every key must
    exist on both sides with the same shape)."""
    import torch
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()},
                        strict=True)
    return net


def torch_model_like(model):
    """The independent torch twin of minialex AlexNet `model`: same variant, classes, batch
    norm and dropout, its weights, and its train/eval mode."""
    batch_norm = any(k.endswith("running_mean") for k in model.state_dict())
    dropout = next(m.p for m in model.classifier if hasattr(m, "p"))
    net = copy_weights(torch_alexnet(model.variant, model.num_classes, batch_norm, dropout), model)
    return net.train(model.training)
