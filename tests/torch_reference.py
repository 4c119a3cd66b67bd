"""PyTorch twins of minialex's models for the tests: the architecture from
minialex.interop.compare (plain torch.nn, no torchvision), with the same weights and mode.

Layer indices equal minialex's, so state_dicts map key for key.
"""
import numpy as np


def torch_model_like(model):
    """A torch.nn model with the same architecture, weights and train/eval mode as `model`."""
    import torch
    from minialex.interop.compare import torch_model_like as architecture_of

    net = architecture_of(model)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    net.train(model.training)
    return net
