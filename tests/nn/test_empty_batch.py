"""An empty batch (N = 0) goes through every layer and every model, forward and backward,
giving correctly shaped empty arrays as torch does; ReLU and Dropout keep a 0-d input 0-d."""
import numpy as np
import pytest

import minialex
from minialex import models, nn

LAYERS = {
    "Conv2d": (lambda t: nn.Conv2d(3, 4, 3, padding=1), lambda t: t.nn.Conv2d(3, 4, 3, padding=1)),
    "Conv2d+ReLU fused": (lambda t: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).fuse_relu(0),
                          lambda t: t.nn.Sequential(t.nn.Conv2d(3, 4, 3), t.nn.ReLU())),
    "ReLU": (lambda t: nn.ReLU(), lambda t: t.nn.ReLU()),
    "Dropout": (lambda t: nn.Dropout(0.5), lambda t: t.nn.Dropout(0.5)),
    "MaxPool2d": (lambda t: nn.MaxPool2d(3, 2), lambda t: t.nn.MaxPool2d(3, 2)),
    "AdaptiveAvgPool2d": (lambda t: nn.AdaptiveAvgPool2d(2), lambda t: t.nn.AdaptiveAvgPool2d(2)),
    "LocalResponseNorm": (lambda t: nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0),
                          lambda t: t.nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0)),
    "BatchNorm2d": (lambda t: nn.BatchNorm2d(3), lambda t: t.nn.BatchNorm2d(3)),
    "Flatten": (lambda t: nn.Flatten(), lambda t: t.nn.Flatten()),
    "Identity": (lambda t: nn.Identity(), lambda t: t.nn.Identity()),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_every_layer_takes_an_empty_batch_like_torch(torch, name, mode):
    ours, theirs = (make(torch) for make in LAYERS[name])
    getattr(ours, mode)(), getattr(theirs, mode)()
    x = np.zeros((0, 3, 7, 7), np.float32)
    xt = torch.zeros(0, 3, 7, 7, requires_grad=True)
    yt = theirs(xt)
    y = ours(x)
    assert y.shape == tuple(yt.shape) and y.dtype == np.float32
    yt.sum().backward()
    dx = ours.backward(np.zeros(y.shape, np.float32))
    assert dx.shape == (0, 3, 7, 7)
    for p in ours.parameters():     # torch leaves zero gradients
        assert not p.grad.any()


def test_batchnorm_in_training_leaves_running_statistics_like_torch(torch):
    bn, ref = nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    bn(np.zeros((0, 3, 4, 4), np.float32)), ref(torch.zeros(0, 3, 4, 4))
    np.testing.assert_array_equal(bn.running_mean, ref.running_mean.numpy())
    np.testing.assert_array_equal(bn.running_var, ref.running_var.numpy())
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)   # torch still counts it


def test_linear_and_loss_take_an_empty_batch(torch):
    lin = nn.Linear(5, 3)
    y = lin(np.zeros((0, 5), np.float32))
    assert y.shape == (0, 3) and lin.backward(np.zeros((0, 3), np.float32)).shape == (0, 5)
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    ref = torch.nn.functional.cross_entropy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert np.isnan(loss) and ref.isnan()          # torch's mean over nothing
    assert loss_fn.backward().shape == (0, 3)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("variant", ["torchvision", "paper", "cifar"])
def test_every_model_takes_an_empty_batch(variant, batch_norm, mode):
    minialex.manual_seed(0)
    model = getattr(models.build(models.Arch(variant, 7, batch_norm=batch_norm)), mode)()
    size = models.INPUT_SIZE[variant]
    logits = model(np.zeros((0, 3, size, size), np.float32))
    assert logits.shape == (0, 7) and logits.dtype == np.float32
    model.zero_grad()
    dx = model.backward(np.zeros((0, 7), np.float32), need_input_grad=True)
    assert dx.shape == (0, 3, size, size)
    assert all(not p.grad.any() for p in model.parameters())
    model(np.zeros((0, 3, size, size), np.float32))
    assert model.backward(np.zeros((0, 7), np.float32)) is None


@pytest.mark.parametrize("layer", [nn.ReLU(), nn.Dropout(0.5), nn.Dropout(0.5).eval()])
def test_relu_and_dropout_keep_a_0d_input_0d(torch, layer):
    minialex.manual_seed(1)
    x = np.array(1.5, np.float32)
    y = layer(x)
    assert y.shape == () and y.shape == tuple(torch.relu(torch.tensor(1.5)).shape)
    assert layer.backward(np.array(1.0, np.float32)).shape == ()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_an_empty_batch_after_zero_grad_leaves_zero_gradients(batch_norm):
    """zero_grad is lazy (the next backward overwrites): a backward over no samples must still
    leave zeros, not the previous step's gradients (a data-parallel process whose share of a short
    last batch is empty adds its gradients to the others')."""
    minialex.manual_seed(0)
    model = models.alexnet(num_classes=10, variant="cifar", batch_norm=batch_norm)
    loss_fn = nn.CrossEntropyLoss()
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    loss_fn(model(x), np.arange(4))
    model.zero_grad()
    model.backward(loss_fn.backward())
    assert any(np.abs(p.grad).max() > 0 for p in model.parameters())
    model.zero_grad()
    logits = model(np.zeros((0, 3, 32, 32), np.float32))
    model.backward(np.zeros_like(logits))
    for name, p in model.named_parameters():
        assert not np.any(p.grad), name
