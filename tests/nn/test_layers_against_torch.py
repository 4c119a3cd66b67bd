"""Single layers against torch in float32: grouped convolutions at the paper variant's real
sizes, Flatten, the BatchNorm2d module (forward, backward, running statistics) and Dropout.

Tolerance: float32 on both sides with different summation orders, so results must agree within
1e-4 of the largest |value| of torch's result (gradients that sum over a whole batch of
activations, like a conv weight's, within 2e-4)."""
import numpy as np
import pytest

import minialex
from minialex import nn

RNG = np.random.default_rng(0)


def _close(ours, theirs, tol=1e-4, what=""):
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else theirs
    assert ours.shape == theirs.shape, what
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol * max(float(np.abs(theirs).max(initial=0)), 1e-30),
                               err_msg=what)


# The paper's grouped convolutions (227x227 input, batch 2): conv2 on 27x27, conv4 and conv5 on 13x13.
PAPER_GROUPED = {"conv2": (96, 256, 5, 2, 27), "conv4": (384, 384, 3, 1, 13), "conv5": (384, 256, 3, 1, 13)}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", list(PAPER_GROUPED))
def test_grouped_conv_backward_at_paper_sizes(torch, name, fused):
    cin, cout, k, pad, size = PAPER_GROUPED[name]
    conv = nn.Conv2d(cin, cout, k, padding=pad, groups=2)
    ref = torch.nn.Conv2d(cin, cout, k, padding=pad, groups=2)
    ref.load_state_dict({"weight": torch.from_numpy(conv.weight.data.copy()),
                         "bias": torch.from_numpy(conv.bias.data.copy())})
    x = RNG.standard_normal((2, cin, size, size)).astype(np.float32)
    g = RNG.standard_normal((2, cout, size, size)).astype(np.float32)
    layer = nn.Sequential(conv, nn.ReLU()).fuse_relu(0) if fused else conv
    y = layer(x)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = torch.relu(ref(xt)) if fused else ref(xt)
    _close(y, yt, what="forward")
    dx = layer.backward(g)
    yt.backward(torch.from_numpy(g))
    _close(dx, xt.grad, what="input gradient")
    _close(conv.weight.grad, ref.weight.grad, tol=2e-4, what="weight gradient")
    _close(conv.bias.grad, ref.bias.grad, tol=2e-4, what="bias gradient")


def test_flatten_forward_and_backward(torch):
    x = RNG.standard_normal((3, 4, 5, 2)).astype(np.float32)
    f = nn.Flatten()
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = torch.nn.Flatten()(xt)
    y = f(x)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    g = RNG.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_array_equal(f.backward(g), xt.grad.numpy())
    assert f.output_shape(x.shape) == tuple(yt.shape)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_module_backward(torch, mode):
    bn, ref = nn.BatchNorm2d(5, momentum=0.3), torch.nn.BatchNorm2d(5, momentum=0.3)
    gamma = RNG.uniform(0.5, 2, 5).astype(np.float32)
    beta = RNG.standard_normal(5).astype(np.float32)
    bn.weight.data[...], bn.bias.data[...] = gamma, beta
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(gamma))
        ref.bias.copy_(torch.from_numpy(beta))
    # some training steps first, so eval mode has real running statistics to use
    for _ in range(2):
        x = (RNG.standard_normal((4, 5, 6, 7)) * 2 + 1).astype(np.float32)
        bn(x), ref(torch.from_numpy(x))
    getattr(bn, mode)(), getattr(ref, mode)()
    x = (RNG.standard_normal((4, 5, 6, 7)) * 3 - 1).astype(np.float32)
    g = RNG.standard_normal(x.shape).astype(np.float32)
    bn.zero_grad()
    for _ in range(2):   # twice: parameter gradients accumulate, as in torch
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = ref(xt)
        _close(bn(x), yt, what="forward")
        dx = bn.backward(g)
        yt.backward(torch.from_numpy(g))
        _close(dx, xt.grad, what="input gradient")
    _close(bn.weight.grad, ref.weight.grad, tol=2e-4, what="weight gradient")
    _close(bn.bias.grad, ref.bias.grad, tol=2e-4, what="bias gradient")
    _close(bn.running_mean, ref.running_mean, what="running_mean")
    _close(bn.running_var, ref.running_var, what="running_var")
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)


# -- Dropout ---------------------------------------------------------------------------------
SHAPES = [(), (7,), (3, 50), (2, 4, 5, 5), (0, 9)]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", SHAPES)
def test_dropout_scales_kept_values_like_torch_and_backward_uses_the_forward_mask(torch, shape, p):
    minialex.manual_seed(3)
    d = nn.Dropout(p)
    x = RNG.uniform(0.5, 2.0, shape).astype(np.float32)    # nonzero: a zero output means dropped
    y = d(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    kept = np.asarray(y != 0)
    # torch's scaling of a kept value: where torch keeps an element, it holds x * 1/(1-p)
    yt = torch.nn.functional.dropout(torch.from_numpy(x.copy()), p, training=True).numpy()
    torch_scaled = yt[yt != 0] / x[yt != 0]
    ours_scaled = y[kept] / x[kept]
    if torch_scaled.size and ours_scaled.size:
        np.testing.assert_allclose(ours_scaled, torch_scaled[0], rtol=1e-6)
    np.testing.assert_array_equal(y[~kept], 0)
    # backward: torch's dropout backward with OUR forward's mask
    g = RNG.standard_normal(shape).astype(np.float32)
    want = torch.ops.aten.native_dropout_backward(torch.from_numpy(g), torch.from_numpy(kept), 1 / (1 - p))
    dx = d.backward(g)
    assert dx.shape == g.shape
    np.testing.assert_allclose(dx, want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_dropout_eval_and_p0_are_the_identity_and_p1_zeroes_like_torch(torch, shape):
    x = RNG.standard_normal(shape).astype(np.float32)
    g = RNG.standard_normal(shape).astype(np.float32)
    for d in (nn.Dropout(0.5).eval(), nn.Dropout(0.0)):
        y = d(x)
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(d.backward(g), g)
    np.testing.assert_array_equal(nn.Dropout(0.5).eval()(x),
                                  torch.nn.Dropout(0.5).eval()(torch.from_numpy(x.copy())).numpy())
    d = nn.Dropout(1.0)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = torch.nn.functional.dropout(xt, 1.0, training=True)
    yt.backward(torch.from_numpy(g))
    y, dx = d(x), d.backward(g)
    assert y.shape == x.shape and dx.shape == x.shape
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(dx, xt.grad.numpy())


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_drops_a_fraction_p(p):
    minialex.manual_seed(0)
    n = 200_000
    dropped = float((nn.Dropout(p)(np.ones(n, np.float32)) == 0).mean())
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 5 * sigma, (dropped, p)
