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


def test_sequential_fuses_conv_relu_with_identical_results():
    rng = np.random.default_rng(3)
    fused = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    plain = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Identity(), nn.ReLU(), nn.MaxPool2d(2))
    plain.load_state_dict({k.replace("0.", "0."): v for k, v in fused.state_dict().items()})
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    g = rng.standard_normal((2, 5, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(fused(x), plain(x))
    np.testing.assert_array_equal(fused.backward(g), plain.backward(g))
    np.testing.assert_array_equal(fused[0].weight.grad, plain[0].weight.grad)
    np.testing.assert_array_equal(fused[0].bias.grad, plain[0].bias.grad)
    with pytest.raises(RuntimeError):
        fused.backward(g)  # the forward's plan is used once


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
