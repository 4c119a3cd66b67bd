"""PyTorch twins of minialex's models, built from plain torch.nn (torchvision is not needed).

Layer indices equal minialex's, so state_dicts map key for key.
"""
import numpy as np


def torch_model_like(model):
    """A torch.nn model with the same architecture and weights as a minialex AlexNet."""
    import torch
    from minialex import nn as mnn

    def convert(m):
        if isinstance(m, mnn.Conv2d):
            return torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                   groups=m.groups, bias=m.bias is not None)
        if isinstance(m, mnn.Linear):
            return torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        if isinstance(m, mnn.ReLU):
            return torch.nn.ReLU()
        if isinstance(m, mnn.MaxPool2d):
            return torch.nn.MaxPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
        if isinstance(m, mnn.LocalResponseNorm):
            return torch.nn.LocalResponseNorm(m.size, m.alpha, m.beta, m.k)
        if isinstance(m, mnn.Dropout):
            return torch.nn.Dropout(m.p)
        if isinstance(m, mnn.BatchNorm2d):
            return torch.nn.BatchNorm2d(m.num_features, m.eps, m.momentum)
        if isinstance(m, mnn.AdaptiveAvgPool2d):
            return torch.nn.AdaptiveAvgPool2d(m.output_size)
        if isinstance(m, mnn.Identity):
            return torch.nn.Identity()
        if isinstance(m, mnn.Sequential):
            return torch.nn.Sequential(*[convert(c) for c in m])
        raise TypeError(f"no torch twin for {type(m).__name__}")

    class TorchAlexNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = convert(model.features)
            self.avgpool = convert(model.avgpool)
            self.classifier = convert(model.classifier)

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    net = TorchAlexNet()
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    net.train(model.training)
    return net
