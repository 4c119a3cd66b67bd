"""Winograd F(2x2,3x3) and F(4x4,3x3): forward, input gradient and weight gradient against the
float64 direct-sum reference, within the float32 error measured by benchmarks/winograd.py."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minialex.kernels.conv import winograd as wg
from minialex.kernels.conv import conv2d_backward_ref, conv2d_forward_ref

# max |error| / max |reference| measured on AlexNet conv3-conv5 (1.2e-6 and 2.4e-5), with room
# for the spread of random data; these shapes are smaller (fewer terms) than AlexNet's.
BOUND = {2: 4e-6, 4: 6e-5}

shapes = st.tuples(
    st.integers(0, 3),      # batch
    st.integers(1, 40),     # cin
    st.integers(1, 40),     # cout
    st.integers(1, 17),     # h (odd sizes and planes smaller than a tile included)
    st.integers(1, 17),     # w
)


def _data(shape, seed):
    n, cin, cout, h, w = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    wt = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    dy = rng.standard_normal((n, cout, h, w)).astype(np.float32)
    return x, wt, b, dy


def _exact(x, wt, b, dy, relu=False):
    """float64 direct sums: y, dx, dw (dy masked by the rectified output when relu)."""
    x64, w64, dy64 = x.astype(np.float64), wt.astype(np.float64), dy.astype(np.float64)
    y = conv2d_forward_ref(x64, w64, None if b is None else b.astype(np.float64), 1, 1, 1, relu=relu)
    dw = np.zeros_like(w64)
    dx = conv2d_backward_ref(dy64, x64, w64, dw, None, 1, 1, 1, relu_out=y if relu else None)
    return y, dx, dw


def _assert_within(ours, ref, tile):
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    np.testing.assert_allclose(ours, ref, rtol=0, atol=BOUND[tile] * max(scale, 1e-30))


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from(wg.TILES), st.booleans(), st.booleans(), st.integers(0, 2**31))
def test_forward_and_gradients_match_float64_reference(shape, tile, bias, relu, seed):
    x, wt, b, dy = _data(shape, seed)
    b = b if bias else None
    y_ref, dx_ref, dw_ref = _exact(x, wt, b, dy, relu)
    ww = wg.transform_weights(wt, tile)          # one transform serves forward and input grad
    y = wg.winograd_forward(x, ww, b, tile, relu=relu)
    _assert_within(y, y_ref, tile)
    relu_out = y if relu else None
    _assert_within(wg.winograd_backward_data(dy, ww, tile, relu_out=relu_out), dx_ref, tile)
    _assert_within(wg.winograd_backward_weight(dy, x, tile, relu_out=relu_out), dw_ref, tile)


@settings(max_examples=15, deadline=None)
@given(shapes, st.sampled_from(wg.TILES), st.booleans(), st.integers(0, 2**31))
def test_reference_twins_are_exact_in_float64(shape, tile, relu, seed):
    x, wt, b, dy = (a.astype(np.float64) for a in _data(shape, seed))
    y_ref, dx_ref, dw_ref = _exact(x, wt, b, dy, relu)
    y = wg.winograd_forward_ref(x, wt, b, tile, relu=relu)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    relu_out = y if relu else None
    np.testing.assert_allclose(wg.winograd_backward_data_ref(dy, wt, tile, relu_out), dx_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(wg.winograd_backward_weight_ref(dy, x, tile, relu_out), dw_ref, rtol=1e-10, atol=1e-10)


@settings(max_examples=10, deadline=None)
@given(shapes, st.sampled_from(wg.TILES), st.integers(0, 2**31))
def test_kernels_match_their_numpy_twins(shape, tile, seed):
    x, wt, b, dy = _data(shape, seed)
    ww = wg.transform_weights(wt, tile)
    n, cin, cout = shape[:3]
    a = tile + 2
    u = ww.u[:, :cin, :cout].reshape(a, a, cin, cout).transpose(0, 1, 3, 2)       # [i, j, co, ci]
    uf = ww.uf[:, :cout, :cin].reshape(a, a, cout, cin)                             # [i, j, co, ci]
    np.testing.assert_allclose(u, wg.transform_weights_ref(wt, tile), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(uf, wg.transform_weights_ref(wt[:, :, ::-1, ::-1], tile), rtol=1e-5, atol=1e-5)
    y_twin = wg.winograd_forward_ref(x, wt, b, tile)
    _assert_within(wg.winograd_forward(x, wt, b, tile), y_twin, tile)
    _assert_within(wg.winograd_backward_data(dy, wt, tile), wg.winograd_backward_data_ref(dy, wt, tile), tile)
    _assert_within(wg.winograd_backward_weight(dy, x, tile), wg.winograd_backward_weight_ref(dy, x, tile), tile)


def test_alexnet_conv4_shape_at_batch_2():
    # channel counts of a real layer (multiples of 16, 256 output channels: the padded row stride)
    x, wt, b, dy = _data((2, 384, 256, 13, 13), 7)
    y_ref, dx_ref, dw_ref = _exact(x, wt, b, dy)
    for tile in wg.TILES:
        ww = wg.transform_weights(wt, tile)
        _assert_within(wg.winograd_forward(x, ww, b, tile), y_ref, tile)
        _assert_within(wg.winograd_backward_data(dy, ww, tile), dx_ref, tile)
        _assert_within(wg.winograd_backward_weight(dy, x, tile), dw_ref, tile)


def test_refuses_what_it_does_not_compute():
    x, wt, b, dy = _data((1, 3, 4, 5, 5), 0)
    with pytest.raises(ValueError, match="tile"):
        wg.winograd_forward(x, wt, b, tile=3)
    with pytest.raises(ValueError, match="transformed for tile 2"):
        wg.winograd_forward(x, wg.transform_weights(wt, 2), b, tile=4)
    with pytest.raises(TypeError, match="float32"):
        wg.winograd_forward(x.astype(np.float64), wt, b, tile=2)
    with pytest.raises(ValueError, match="3x3"):
        wg.transform_weights(np.zeros((4, 3, 5, 5), np.float32), 2)
    with pytest.raises(ValueError, match="channels"):
        wg.winograd_backward_data(x, wt, 2)          # x has 3 channels, dy needs 4
    assert wg.supports(x.shape, wt.shape, 1, 1, 1, np.float32)
    assert not wg.supports(x.shape, wt.shape, 2, 1, 1, np.float32)
    assert not wg.supports(x.shape, wt.shape, 1, 0, 1, np.float32)
    assert not wg.supports(x.shape, wt.shape, 1, 1, 1, np.float64)
