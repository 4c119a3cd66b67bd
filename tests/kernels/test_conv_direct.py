"""The direct paths beyond what test_conv_paths.py checks: the phase-split and channels-last padded
copies and the way back to planes, a NaN through the fused ReLU, AlexNet's conv1 weight gradient
and conv3 against torch, empty batches."""
import numpy as np
from hypothesis import given, settings, strategies as st

from helpers import to_torch
from minialex.kernels.conv import conv2d_backward, conv2d_forward
from minialex.kernels.conv.layout import from_nhwc, pad_split, split_width, to_padded_nhwc


def test_split_forward_relu_keeps_nan():
    x = np.ones((1, 3, 9, 9), np.float32)
    x[0, 1, 4, 4] = np.nan
    w = np.ones((32, 3, 3, 3), np.float32)
    y = conv2d_forward(x, -w, None, 2, 0, 1, relu=True)  # every finite output is negative
    assert np.isnan(y[0, :, 1, 1]).all() and np.isnan(y[0, :, 2, 2]).all()
    assert (np.nan_to_num(y, nan=0.0) == 0).all()


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(0, 3),
       st.integers(0, 3), st.integers(0, 2**31))
def test_phase_split_padding(c, h, w, s, top, left, seed):
    x = np.random.default_rng(seed).standard_normal((2, c, h, w)).astype(np.float32)
    hp = h + 2 * top
    wq = split_width(w, left, s, 1)
    assert wq * s >= w + 2 * left
    xq = np.full((2, c, hp, s, wq), np.nan, np.float32)
    pad_split(x, top, left, s, xq)
    padded = np.zeros((2, c, hp, s * wq), np.float32)
    padded[:, :, top:top + h, left:left + w] = x
    # xq[..., r, ph, m] is padded column m*s + ph
    np.testing.assert_array_equal(xq, padded.reshape(2, c, hp, wq, s).transpose(0, 1, 2, 4, 3))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 80), h=st.integers(1, 20), w=st.integers(1, 40),
       top=st.integers(0, 2), left=st.integers(0, 2), bottom=st.integers(0, 2), right=st.integers(0, 2),
       extra=st.integers(0, 20), relu=st.booleans(), seed=st.integers(0, 2**31))
def test_channels_last_padding(n, c, h, w, top, left, bottom, right, extra, relu, seed):
    # register-transposed blocks of 16 pixels (rows wider and narrower than 16), the element-by-
    # element channels past the last 8, borders of any size, the padding channels and the ReLU
    # mask (a NaN in the mask keeps the value, as threshold_backward), against NumPy
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    yr = rng.standard_normal((n, c, h, w)).astype(np.float32)
    yr[rng.random(yr.shape) < 0.05] = np.nan
    xp = np.full((n, top + h + bottom, left + w + right, c + extra), np.nan, np.float32)
    to_padded_nhwc(x, yr if relu else x, relu, top, left, xp)
    want = np.zeros_like(xp)
    want[:, top:top + h, left:left + w, :c] = (np.where(yr <= 0, 0, x) if relu else x).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(xp, want)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 80), plane=st.integers(1, 60), extra=st.integers(0, 20),
       has_bias=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**31))
def test_from_channels_last(n, c, plane, extra, has_bias, relu, seed):
    # the way back: channels-last rows (row stride past C) to planes, bias and ReLU on the way
    # (a NaN passes the ReLU, as relu_forward), register-transposed blocks and ragged edges
    rng = np.random.default_rng(seed)
    src = rng.standard_normal((n * plane, c + extra)).astype(np.float32)
    src[rng.random(src.shape) < 0.05] = np.nan
    b = rng.standard_normal(c).astype(np.float32)
    y = np.full((n, c, plane), np.inf, np.float32)
    from_nhwc(src.reshape(-1), c + extra, b if has_bias else None, relu, y)
    want = src[:, :c].reshape(n, plane, c).transpose(0, 2, 1) + (b[None, :, None] if has_bias else 0)
    np.testing.assert_array_equal(y, np.where(want <= 0, 0, want) if relu else want)


def test_alexnet_conv1_weight_grad_matches_torch(torch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    w = (rng.standard_normal((64, 3, 11, 11)) * 0.05).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    wt, bt = to_torch(torch, w, True), to_torch(torch, b, True)
    yt = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), wt, bt, stride=4, padding=2))
    y = conv2d_forward(x, w, b, 4, 2, 1, relu=True)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.from_numpy(dy))
    dw, db = np.zeros_like(w), np.zeros_like(b)
    assert conv2d_backward(dy, x, w, dw, db, 4, 2, 1, need_dx=False, relu_out=y) is None
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_alexnet_conv3_matches_torch(torch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 192, 13, 13)).astype(np.float32)
    w = (rng.standard_normal((384, 192, 3, 3)) * 0.05).astype(np.float32)
    b = rng.standard_normal(384).astype(np.float32)
    xt, wt, bt = to_torch(torch, x, True), to_torch(torch, w, True), to_torch(torch, b, True)
    yt = torch.relu(torch.nn.functional.conv2d(xt, wt, bt, padding=1))
    y = conv2d_forward(x, w, b, 1, 1, 1, relu=True)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.from_numpy(dy))
    dw, db = np.zeros_like(w), np.zeros_like(b)
    dx = conv2d_backward(dy, x, w, dw, db, 1, 1, 1, relu_out=y)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_empty_batch():
    x = np.zeros((0, 32, 5, 5), np.float32)
    w = np.ones((32, 32, 3, 3), np.float32)
    y = conv2d_forward(x, w, None, 1, 1, 1)
    assert y.shape == (0, 32, 5, 5)
    dw, db = np.ones_like(w), np.ones(32, np.float32)
    dx = conv2d_backward(np.zeros_like(y), x, w, dw, db, 1, 1, 1, accumulate=False)
    assert dx.shape == x.shape and not dw.any() and not db.any()
    # the first layer's weight-gradient-only path (stride 4, 3 channels)
    x1, w1 = np.zeros((0, 3, 23, 23), np.float32), np.ones((32, 3, 11, 11), np.float32)
    y1 = conv2d_forward(x1, w1, None, 4, 2, 1)
    dw1, db1 = np.ones_like(w1), np.ones(32, np.float32)
    assert conv2d_backward(np.zeros_like(y1), x1, w1, dw1, db1, 4, 2, 1, need_dx=False, accumulate=False) is None
    assert not dw1.any() and not db1.any()

