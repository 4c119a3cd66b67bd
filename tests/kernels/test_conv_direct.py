"""The channels-last direct convolution (stride 1, groups 1, channel panels of 32) and the direct
weight gradient of a first layer (any stride and Cin, no input gradient): kernels against the
NumPy twins and references, and the dispatch through conv2d_forward / conv2d_backward."""
import numba
import numpy as np
from hypothesis import given, settings, strategies as st

from helpers import to_torch
from minialex.kernels import conv_direct
from minialex.kernels.conv import conv2d_backward, conv2d_backward_ref, conv2d_forward, conv2d_forward_ref

case = st.tuples(
    st.integers(1, 3),                                # n
    st.integers(1, 40),                               # cin
    st.sampled_from([32, 64]),                        # cout (the direct kernel's panels)
    st.integers(1, 11), st.integers(1, 11),           # h, w
    st.integers(1, 5), st.integers(1, 5),             # kh, kw
    st.integers(0, 4), st.integers(0, 4),             # padding (kept below the kernel size)
    st.booleans(), st.booleans(),                     # bias, relu
    st.sampled_from([1, 2]),                          # threads
)


def _make(c, seed):
    n, cin, cout, h, w, kh, kw, ph, pw, bias, relu, threads = c
    # padding below the kernel size and at least one output pixel, by construction (filtering
    # drawn cases with assume() rejected so many that Hypothesis' health check could fail)
    ph, pw = ph % kh, pw % kw
    h, w = max(h, kh - 2 * ph), max(w, kw - 2 * pw)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    wt = rng.standard_normal((cout, cin, kh, kw)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) if bias else None
    return x, wt, b, (ph, pw), relu, min(threads, numba.config.NUMBA_NUM_THREADS), rng


def _with_threads(threads, fn):
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        return fn()
    finally:
        numba.set_num_threads(before)


def _close(a, ref):
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=2e-6 * scale)


@settings(max_examples=30, deadline=None)
@given(case, st.integers(0, 2**31))
def test_forward_matches_twin(c, seed):
    x, w, b, p, relu, threads, _ = _make(c, seed)
    assert conv_direct.supported(x, w, (1, 1), 1, p)
    y = _with_threads(threads, lambda: conv_direct.forward(x, w, b, (1, 1), p, relu, threads))
    ref = conv_direct.conv2d_direct_ref(x.astype(np.float64), w.astype(np.float64), p)
    if b is not None:
        ref = ref + b[None, :, None, None]
    if relu:
        ref = np.maximum(ref, 0)
    assert y.dtype == np.float32
    _close(y, ref)


@settings(max_examples=15, deadline=None)
@given(case, st.tuples(st.integers(1, 3), st.integers(1, 3)), st.integers(0, 2**31))
def test_strided_forward_matches_reference(c, stride, seed):
    # conv.py sends only stride 1 here (conv1 goes to forward_split), but the kernel computes
    # any stride
    x, w, b, p, relu, threads, _ = _make(c, seed)
    y = _with_threads(threads, lambda: conv_direct.forward(x, w, b, stride, p, relu, threads))
    _close(y, conv2d_forward_ref(x.astype(np.float64), w.astype(np.float64), b, stride, p, 1, relu=relu))


@settings(max_examples=30, deadline=None)
@given(case, st.tuples(st.integers(1, 4), st.integers(1, 4)), st.integers(0, 2**31))
def test_split_forward_matches_reference(c, stride, seed):
    # conv1's forward: any stride and Cin, NCHW written straight from the tile (planes that
    # are not a multiple of 8 pixels end in a partial tile), through the public entry point
    # whenever the stride is not 1
    x, w, b, p, relu, threads, _ = _make(c, seed)
    assert conv_direct.supported_split(x, w, stride, 1, p)
    y = _with_threads(threads, lambda: conv_direct.forward_split(x, w, b, stride, p, relu, threads))
    ref = conv2d_forward_ref(x.astype(np.float64), w.astype(np.float64), b, stride, p, 1, relu=relu)
    assert y.dtype == np.float32 and y.shape == ref.shape
    _close(y, ref)
    if stride != (1, 1):
        _close(_with_threads(threads, lambda: conv2d_forward(x, w, b, stride, p, 1, relu=relu)), ref)


def test_large_stride_one_planes_take_the_split_forward():
    # conv2-sized planes (>= SPLIT_MIN_PLANE pixels) go through forward_split at stride 1
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 21, 21)).astype(np.float32)
    w = rng.standard_normal((64, 8, 5, 5)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    assert 21 * 21 >= conv_direct.SPLIT_MIN_PLANE
    y = conv2d_forward(x, w, b, 1, 2, 1, relu=True)
    _close(y, conv2d_forward_ref(x.astype(np.float64), w.astype(np.float64), b, 1, 2, 1, relu=True))
    np.testing.assert_array_equal(y, conv_direct.forward_split(x, w, b, (1, 1), (2, 2), True, numba.get_num_threads()))


def test_split_forward_relu_keeps_nan():
    x = np.ones((1, 3, 9, 9), np.float32)
    x[0, 1, 4, 4] = np.nan
    w = np.ones((32, 3, 3, 3), np.float32)
    y = conv2d_forward(x, -w, None, 2, 0, 1, relu=True)  # every finite output is negative
    assert np.isnan(y[0, :, 1, 1]).all() and np.isnan(y[0, :, 2, 2]).all()
    assert (np.nan_to_num(y, nan=0.0) == 0).all()


@settings(max_examples=30, deadline=None)
@given(case, st.integers(0, 2**31))
def test_backward_matches_reference(c, seed):
    # the input gradient's panels are input channels: draw both channel counts from {32, 64}
    n, cin, cout, *rest = c
    x, w, b, p, relu, threads, rng = _make((n, cout, 32 * (1 + cin % 2), *rest), seed)
    y = conv2d_forward_ref(x.astype(np.float64), w.astype(np.float64), None, (1, 1), p, 1, relu=relu)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    relu_out = y.astype(np.float32) if relu else None
    start = rng.standard_normal(w.shape).astype(np.float32)
    accumulate = bool(seed % 2)
    dw, db = start.copy(), np.ones(w.shape[0], np.float32)
    dx = _with_threads(threads, lambda: conv_direct.backward(dy, x, w, dw, db, p, accumulate, True, relu_out, threads))
    dw_r, db_r = start.astype(np.float64), np.ones(w.shape[0])
    dx_r = conv2d_backward_ref(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64), dw_r, db_r,
                               (1, 1), p, 1, accumulate=accumulate,
                               relu_out=None if relu_out is None else relu_out.astype(np.float64))
    assert dx.shape == x.shape and dx.dtype == np.float32
    _close(dx, dx_r)
    _close(dw, dw_r)
    _close(db, db_r)
    assert conv_direct.backward(dy, x, w, dw, None, p, True, False, relu_out, threads) is None


@settings(max_examples=20, deadline=None)
@given(case, st.integers(0, 2**31))
def test_public_entry_points_use_it_and_agree_with_reference(c, seed):
    n, cin, cout, *rest = c
    x, w, b, p, relu, threads, rng = _make((n, 32 * (1 + cin % 2), cout, *rest), seed)
    y = _with_threads(threads, lambda: conv2d_forward(x, w, b, 1, p, 1, relu=relu))
    y_r = conv2d_forward_ref(x.astype(np.float64), w.astype(np.float64), b, 1, p, 1, relu=relu)
    _close(y, y_r)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dw, db = np.zeros_like(w), (np.zeros_like(b) if b is not None else None)
    dw_r, db_r = np.zeros(w.shape), (np.zeros(b.shape) if b is not None else None)
    dx = _with_threads(threads, lambda: conv2d_backward(dy, x, w, dw, db, 1, p, 1, relu_out=y if relu else None))
    dx_r = conv2d_backward_ref(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64), dw_r, db_r,
                               1, p, 1, relu_out=y_r if relu else None)
    _close(dx, dx_r)
    _close(dw, dw_r)
    if b is not None:
        _close(db, db_r)


@settings(max_examples=30, deadline=None)
@given(case, st.tuples(st.integers(1, 4), st.integers(1, 4)), st.integers(0, 2**31))
def test_weight_grad_any_stride_matches_reference(c, stride, seed):
    # the first layer's backward (conv1: 3 channels, stride 4): weight and bias gradients only,
    # through the public entry point, with and without accumulation and a fused ReLU
    x, w, b, p, relu, threads, rng = _make(c, seed)
    y = conv2d_forward_ref(x.astype(np.float64), w.astype(np.float64), None, stride, p, 1, relu=relu)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    relu_out = y.astype(np.float32) if relu else None
    accumulate = bool(seed % 2)
    start = rng.standard_normal(w.shape).astype(np.float32)
    dw, db = start.copy(), np.ones(w.shape[0], np.float32)
    assert conv_direct.supported_weight_grad(x, w, 1, dw, db)
    out = _with_threads(threads, lambda: conv2d_backward(dy, x, w, dw, db, stride, p, 1, need_dx=False,
                                                        accumulate=accumulate, relu_out=relu_out))
    assert out is None
    dw_r, db_r = start.astype(np.float64), np.ones(w.shape[0])
    conv2d_backward_ref(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64), dw_r, db_r,
                        stride, p, 1, need_dx=False, accumulate=accumulate,
                        relu_out=None if relu_out is None else relu_out.astype(np.float64))
    _close(dw, dw_r)
    _close(db, db_r)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(0, 3),
       st.integers(0, 3), st.integers(0, 2**31))
def test_phase_split_padding(c, h, w, s, top, left, seed):
    x = np.random.default_rng(seed).standard_normal((2, c, h, w)).astype(np.float32)
    hp = h + 2 * top
    wq = -(-(w + 2 * left) // s) + 1
    xq = np.full((2, c, hp, s, wq), np.nan, np.float32)
    conv_direct._pad_split(x, top, left, s, xq)
    padded = np.zeros((2, c, hp, s * wq), np.float32)
    padded[:, :, top:top + h, left:left + w] = x
    # xq[..., r, ph, m] is padded column m*s + ph
    np.testing.assert_array_equal(xq, padded.reshape(2, c, hp, wq, s).transpose(0, 1, 2, 4, 3))


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


def test_not_used_where_it_does_not_apply():
    x = np.zeros((1, 32, 8, 8), np.float32)
    w = np.zeros((64, 32, 3, 3), np.float32)
    for ok in (conv_direct.supported, conv_direct.supported_backward):
        assert ok(x, w, (1, 1), 1, (1, 1))
        assert not ok(x, w, (2, 2), 1, (1, 1))
        assert not ok(x, w[:, :16], (1, 1), 2, (1, 1))
        assert not ok(x, w, (1, 1), 1, (3, 1))
        assert not ok(x.astype(np.float64), w.astype(np.float64), (1, 1), 1, (1, 1))
    for ok in (conv_direct.supported, conv_direct.supported_backward):
        assert not ok(x, w[:48], (1, 1), 1, (1, 1))                        # Cout not in panels of 32
    assert conv_direct.supported(x[:, :16], w[:, :16], (1, 1), 1, (1, 1))  # any Cin forward,
    assert not conv_direct.supported_backward(x[:, :16], w[:, :16], (1, 1), 1, (1, 1))  # 32s backward
    assert conv_direct.supported_split(x, w, (4, 4), 1, (2, 1))
    assert not conv_direct.supported_split(x, w[:48], (4, 4), 1, (1, 1))
    assert not conv_direct.supported_split(x, w[:, :16], (4, 4), 2, (1, 1))
    assert not conv_direct.supported_split(x, w, (4, 4), 1, (3, 1))
    dw = np.zeros_like(w)
    assert conv_direct.supported_weight_grad(x[:, :3], w[:, :3], 1, dw[:, :3].copy(), None)  # any Cin
    assert not conv_direct.supported_weight_grad(x, w[:48], 1, dw[:48], None)
    assert not conv_direct.supported_weight_grad(x, w[:, :16], 2, dw[:, :16].copy(), None)
    assert not conv_direct.supported_weight_grad(x, w, 1, dw[:, :, :, ::-1], None)        # dw not contiguous


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
