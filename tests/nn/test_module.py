"""Module bookkeeping: parameters, buffers, state_dict, modes, grads, dtype."""
import numpy as np
import pytest

from minialex import nn


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 2 * 2, 3))


def test_named_parameters_and_state_dict_follow_pytorch_order():
    net = _net()
    assert [n for n, _ in net.named_parameters()] == [
        "0.weight", "0.bias", "1.weight", "1.bias", "6.weight", "6.bias"]
    assert list(net.state_dict()) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked", "6.weight", "6.bias"]


def test_state_dict_is_a_copy_and_loads_back():
    a, b = _net(), _net()
    sd = a.state_dict()
    sd["0.weight"][...] = 0
    assert a[0].weight.data.any()
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k])


def test_non_strict_load_reports_missing_and_unexpected():
    net = _net()
    sd = net.state_dict()
    del sd["6.bias"]
    sd["9.weight"] = np.zeros(1, np.float32)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert missing == ["6.bias"] and unexpected == ["9.weight"]
    with pytest.raises(ValueError, match="6.bias"):
        net.load_state_dict(sd)


def test_train_eval_reach_every_submodule():
    net = _net()
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_grads_accumulate_until_zero_grad():
    rng = np.random.default_rng(0)
    net = nn.Sequential(nn.Linear(5, 3))
    x = rng.standard_normal((2, 5)).astype(np.float32)
    g = rng.standard_normal((2, 3)).astype(np.float32)
    net(x)
    net.backward(g)
    once = net[0].weight.grad.copy()
    net(x)
    net.backward(g)
    np.testing.assert_allclose(net[0].weight.grad, 2 * once, rtol=1e-6)
    net.zero_grad()
    assert not net[0].weight.grad.any() and not net[0].bias.grad.any()
    # zero_grad is lazy: the next backward overwrites instead of adding
    net(x)
    net.zero_grad()
    net.backward(g)
    np.testing.assert_allclose(net[0].weight.grad, once, rtol=1e-6)
    np.testing.assert_allclose(net[0].bias.grad, net[0].bias.grad * 0 + g.sum(0), rtol=1e-6)


def test_parameters_zeroed_separately_still_accumulate_correctly():
    rng = np.random.default_rng(1)
    conv = nn.Conv2d(2, 3, 3)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    g = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    conv(x)
    conv.backward(g)
    once_w, once_b = conv.weight.grad.copy(), conv.bias.grad.copy()
    conv.weight.zero_grad()          # only the weight: the bias keeps accumulating
    conv(x)
    conv.backward(g)
    np.testing.assert_allclose(conv.weight.grad, once_w, rtol=1e-5)
    np.testing.assert_allclose(conv.bias.grad, 2 * once_b, rtol=1e-5)


def test_to_float64_casts_parameters_grads_and_buffers():
    net = _net().to(np.float64)
    for p in net.parameters():
        assert p.data.dtype == np.float64 and p.grad.dtype == np.float64
    assert net[1].running_mean.dtype == np.float64
    assert net[1].num_batches_tracked.dtype == np.int64
    y = net(np.zeros((1, 3, 4, 4)))
    assert y.dtype == np.float64


def test_dropout_is_identity_in_eval_and_seeded_in_training():
    import minialex
    d = nn.Dropout(0.5)
    x = np.ones((4, 100), np.float32)
    d.eval()
    assert d(x) is x
    d.train()
    minialex.manual_seed(1)
    a = d(x)
    minialex.manual_seed(1)
    b = d(x)
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) <= {0.0, 2.0}
    assert 0.3 < (a == 0).mean() < 0.7


def test_batchnorm_running_statistics_and_eval():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    bn, tbn = nn.BatchNorm2d(3, momentum=0.2), torch.nn.BatchNorm2d(3, momentum=0.2)
    for _ in range(3):
        x = (rng.standard_normal((4, 3, 5, 5)) * 3 + 1).astype(np.float32)
        np.testing.assert_allclose(bn(x), tbn(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, tbn.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-5)
    assert int(bn.num_batches_tracked) == 3
    bn.eval(), tbn.eval()
    np.testing.assert_allclose(bn(x), tbn(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_invalid_layer_arguments():
    with pytest.raises(ValueError):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError):
        nn.Dropout(1.5)
    with pytest.raises(ValueError):
        nn.MaxPool2d(2, padding=2)


def test_declared_conv_relu_fusion_gives_identical_results():
    rng = np.random.default_rng(3)
    fused = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).fuse_relu(0)
    plain = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    plain.load_state_dict(fused.state_dict())
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    g = rng.standard_normal((2, 5, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(fused(x), plain(x))
    np.testing.assert_array_equal(fused.backward(g), plain.backward(g))
    np.testing.assert_array_equal(fused[0].weight.grad, plain[0].weight.grad)
    np.testing.assert_array_equal(fused[0].bias.grad, plain[0].bias.grad)
    with pytest.raises(RuntimeError, match="without a forward"):
        fused.backward(g)  # the forward's steps are used once


class _SpyConv(nn.Conv2d):
    """A Conv2d that records whether the fused path ran and what its backward was asked."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_calls, self.need_input_grad = 0, []

    def forward_relu(self, x):
        self.fused_calls += 1
        return super().forward_relu(x)

    def backward(self, grad_out, need_input_grad=True):
        self.need_input_grad.append(need_input_grad)
        return super().backward(grad_out, need_input_grad)


def test_sequential_fuses_only_what_is_declared_not_by_type():
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    undeclared = nn.Sequential(_SpyConv(2, 3, 3), nn.ReLU())
    undeclared(x)
    assert undeclared[0].fused_calls == 0
    declared = nn.Sequential(_SpyConv(2, 3, 3), nn.ReLU()).fuse_relu(0)   # a subclass fuses too
    declared(x)
    assert declared[0].fused_calls == 1
    with pytest.raises(ValueError, match="cannot fuse"):
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(2)).fuse_relu(0)
    with pytest.raises(ValueError, match="cannot fuse"):
        nn.Sequential(nn.Linear(2, 3), nn.ReLU()).fuse_relu(0)


class _Scale(nn.Module):
    """A user-defined layer: y = 2x, recording the need_input_grad it is given."""

    saved = ()

    def __init__(self):
        super().__init__()
        self.asked = []

    def forward(self, x):
        return 2 * x

    def backward(self, grad_out, need_input_grad=True):
        self.asked.append(need_input_grad)
        return 2 * grad_out if need_input_grad else None


def test_sequential_passes_need_input_grad_to_any_first_layer():
    first = _Scale()
    seq = nn.Sequential(first, nn.ReLU(), nn.Flatten())
    x = np.ones((2, 3, 1, 1), np.float32)
    seq(x)
    assert seq.backward(np.ones((2, 3), np.float32), need_input_grad=False) is None
    assert first.asked == [False]
    seq(x)
    np.testing.assert_array_equal(seq.backward(np.ones((2, 3), np.float32)), 2 * x)
    assert first.asked == [False, True]


def _every_layer():
    """(layer, input) for every layer type of minialex.nn."""
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    return [(nn.Conv2d(4, 4, 3), img), (nn.ReLU(), img), (nn.Dropout(0.5), img),
            (nn.MaxPool2d(2), img), (nn.AdaptiveAvgPool2d(2), img), (nn.LocalResponseNorm(3), img),
            (nn.BatchNorm2d(4), img), (nn.Flatten(), img), (nn.Identity(), img),
            (nn.Linear(4 * 6 * 6, 3), img.reshape(2, -1)),
            (nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()).fuse_relu(0), img)]


@pytest.mark.parametrize("index", range(11))
def test_every_layer_backward_accepts_need_input_grad(index):
    layer, x = _every_layer()[index]
    y = layer(x)
    dx = layer.backward(np.ones_like(y), need_input_grad=False)
    assert dx is None or dx.shape == x.shape
    y = layer(x)
    assert layer.backward(np.ones_like(y), need_input_grad=True).shape == x.shape


@pytest.mark.parametrize("index", range(11))
def test_forward_keeps_exactly_what_saved_names_and_backward_releases_it(index):
    layer, x = _every_layer()[index]
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        before = {k: id(v) for k, v in vars(layer).items()}
        y = layer(x)
        kept = layer._saved or {}
        assert set(kept) == set(type(layer).saved), type(layer).__name__
        # nothing else of the forward's is left on the layer: no other attribute was rebound
        assert {k for k, v in vars(layer).items() if before.get(k) != id(v)} <= {"_saved"}
        layer.backward(np.ones_like(y))
        assert layer._saved is None
        if type(layer).saved:
            with pytest.raises(RuntimeError, match=f"{type(layer).__name__}.backward called without a forward"):
                layer.backward(np.ones_like(y))


@pytest.mark.parametrize("make", [nn.ReLU, lambda: nn.Conv2d(2, 2, 1), lambda: nn.Linear(2, 2),
                                  nn.Flatten, lambda: nn.MaxPool2d(2), lambda: nn.BatchNorm2d(2),
                                  lambda: nn.LocalResponseNorm(3), lambda: nn.AdaptiveAvgPool2d(1),
                                  lambda: nn.Dropout(0.5), nn.Sequential, nn.CrossEntropyLoss])
def test_backward_without_forward_is_a_clear_error(make):
    layer = make()
    with pytest.raises(RuntimeError, match="backward called without a forward"):
        layer.backward(np.ones((2, 2, 2, 2), np.float32))


def test_save_refuses_names_the_class_does_not_declare():
    class Leaky(nn.Module):
        saved = ("x",)

        def forward(self, x):
            self.save(x=x, extra=x * 2)
            return x

    with pytest.raises(TypeError, match=r"saves \['extra', 'x'\], but the class declares saved = \('x',\)"):
        Leaky()(np.ones(3))


def test_input_gradient_only_when_asked():
    from minialex import models
    rng = np.random.default_rng(5)
    model = models.alexnet(num_classes=3, variant="cifar", dropout=0.0)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    g = rng.standard_normal((2, 3)).astype(np.float32)
    model(x)
    assert model.backward(g) is None
    skipped = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    model(x)
    dx = model.backward(g, need_input_grad=True)
    assert dx.shape == x.shape
    for p, q in zip(model.parameters(), skipped):
        np.testing.assert_array_equal(p.grad, q)
