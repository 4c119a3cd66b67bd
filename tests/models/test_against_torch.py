"""Whole-model float32 training step against an independently written torch model.

Every variant, with and without batch norm, in TRAINING mode: the same weights (copied by
state_dict key) and input give the same logits, loss, parameter gradients and (with batch
norm) running statistics. Dropout is set to p=0 here so both sides compute the same function;
tests/nn/test_layers_against_torch.py checks Dropout itself.

Tolerances. Logits and loss: within 1e-4 of the largest |logit| of torch's float32 result.
Input and parameter gradients: judged against the same torch model run in float64 (the exact answer up to
1e-12 here), because some are ill-conditioned in float32 (the paper variant's N(0, 0.01) weights
make conv1's weight gradient differ by about 2% between torch's own float32 and float64). Each
gradient's largest error must be at most 2 x torch float32's own error plus GRAD_TOL (2e-3) of
its largest |gradient|: as accurate as torch in float32, while a wrong index or a missed term
moves it by O(1) of that scale. Running statistics: within rtol 1e-4 of torch.
"""
import copy

import numpy as np
import pytest

import minialex
from minialex import models, nn
from tests.torch_reference import copy_weights, torch_alexnet

GRAD_TOL = 2e-3
BATCH = {"torchvision": 2, "paper": 2, "cifar": 4}


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("variant", ["torchvision", "paper", "cifar"])
def test_training_step_matches_torch_in_float32(torch, variant, batch_norm):
    minialex.manual_seed(11)
    model = models.build(models.Arch(variant, 10, batch_norm=batch_norm, dropout=0.0)).train()
    net = copy_weights(torch_alexnet(variant, 10, batch_norm, dropout=0.0), model).train()
    size, n = models.INPUT_SIZE[variant], BATCH[variant]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 10, n)

    loss_fn = nn.CrossEntropyLoss()
    logits = model(x)
    loss = loss_fn(logits, y)
    model.zero_grad()
    dx = model.backward(loss_fn.backward(), need_input_grad=True)

    net64 = copy.deepcopy(net).double()     # before any forward: the same weights and statistics
    inputs = []
    for twin in (net, net64):
        xt = torch.from_numpy(x.copy()).to(next(twin.parameters()).dtype).requires_grad_(True)
        inputs.append(xt)
        twin_logits = twin(xt)
        twin_loss = torch.nn.functional.cross_entropy(twin_logits, torch.from_numpy(y))
        twin_loss.backward()
        if twin is net:
            ref, ref_loss = twin_logits.detach().numpy(), twin_loss.item()

    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4 * scale)
    assert abs(loss - ref_loss) <= 1e-4 * max(scale, 1.0)
    grads = [("input", dx, inputs[0].grad.numpy(), inputs[1].grad.numpy())]
    t32, t64 = dict(net.named_parameters()), dict(net64.named_parameters())
    assert [k for k, _ in model.named_parameters()] == list(t32)
    grads += [(name, p.grad, t32[name].grad.numpy(), t64[name].grad.numpy())
              for name, p in model.named_parameters()]
    for name, ours, theirs, exact in grads:
        scale = float(np.abs(exact).max())
        weight = name[:-len("bias")] + "weight"
        if batch_norm and name.endswith(".bias") and t64[weight].dim() == 4:
            # A conv bias followed by batch norm has gradient 0 in exact arithmetic (the
            # normalisation removes any constant): both sides hold rounding noise only, so it
            # is judged against the scale of its convolution's weight gradient.
            scale = float(np.abs(t64[weight].grad.numpy()).max())
        torch_error = float(np.abs(theirs - exact).max())
        our_error = float(np.abs(ours - exact).max())
        assert our_error <= 2 * torch_error + GRAD_TOL * scale, \
            f"{name}: error {our_error:.3g}, torch float32's {torch_error:.3g}, scale {scale:.3g}"
    if batch_norm:
        buffers = dict(net.named_buffers())
        for name, value in model.state_dict().items():
            if "running" in name or "num_batches" in name:
                np.testing.assert_allclose(value, buffers[name].numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_the_torch_twins_are_the_documented_networks(torch):
    """The hand-written twins themselves: torchvision's parameter count and the paper's shapes."""
    tv = torch_alexnet("torchvision", 1000)
    assert sum(p.numel() for p in tv.parameters()) == 61_100_840
    paper = torch_alexnet("paper", 1000)
    assert paper.features(torch.zeros(1, 3, 227, 227)).shape == (1, 256, 6, 6)
    assert [m.groups for m in paper.features if isinstance(m, torch.nn.Conv2d)] == [1, 2, 1, 2, 2]
    cifar = torch_alexnet("cifar", 10)
    assert cifar.features(torch.zeros(1, 3, 32, 32)).shape == (1, 128, 2, 2)
