"""The winograd path's own pieces: the weight transform, the NumPy twin of the algorithm, and the
error criterion the plan relies on (within 1e-5 of the largest output magnitude) on AlexNet's
3x3 layers. Its forward and gradients on random shapes run in test_conv_paths.py with the other
paths."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minialex.kernels.conv import (conv2d_backward, conv2d_backward_ref, conv2d_forward, conv2d_forward_ref,
                                   force_path, winograd)

CRITERION = 1e-5   # the plan takes Winograd only within this of the largest output magnitude


def _rel_max(ours, ref):
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


@settings(max_examples=20, deadline=None)
@given(cout=st.integers(1, 40), cin=st.integers(1, 40), flipped=st.booleans(), seed=st.integers(0, 2**31))
def test_weight_transform_is_g_w_gt_in_its_layout(cout, cin, flipped, seed):
    w = np.random.default_rng(seed).standard_normal((cout, cin, 3, 3)).astype(np.float32)
    u = winograd.transform_weights(w, flipped=flipped)
    src = w[:, :, ::-1, ::-1] if flipped else w
    ref = np.einsum("ik,ockl,jl->ijoc", winograd.G, src.astype(np.float64), winograd.G).reshape(16, cout, cin)
    rows, lanes = (cout, cin) if flipped else (cin, cout)
    assert u.shape[0] == 16 and u.shape[1] >= rows and u.shape[2] >= lanes
    got = u[:, :rows, :lanes] if flipped else u[:, :rows, :lanes].transpose(0, 2, 1)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # the padding the GEMM reads is zero
    assert not u[:, rows:].any() and not u[:, :, lanes:].any()


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), cin=st.integers(1, 6), cout=st.integers(1, 6), h=st.integers(1, 9),
       w=st.integers(1, 9), relu=st.booleans(), seed=st.integers(0, 2**31))
def test_numpy_twin_is_exact_in_float64(n, cin, cout, h, w, relu, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cin, h, w))
    wt = rng.standard_normal((cout, cin, 3, 3))
    b = rng.standard_normal(cout)
    np.testing.assert_allclose(winograd.winograd_forward_ref(x, wt, b, relu=relu),
                               conv2d_forward_ref(x, wt, b, 1, 1, 1, relu=relu), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cin,cout", [(192, 384), (384, 256), (256, 256)], ids=["conv3", "conv4", "conv5"])
def test_alexnet_3x3_layers_are_within_the_criterion(cin, cout):
    # He-scaled weights as in training; output, input gradient and weight gradient at batch 2
    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((2, cin, 13, 13)), 0).astype(np.float32)
    w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    dy = rng.standard_normal((2, cout, 13, 13)).astype(np.float32)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y_ref = conv2d_forward_ref(x64, w64, b.astype(np.float64), 1, 1, 1)
    dw_ref = np.zeros_like(w64)
    dx_ref = conv2d_backward_ref(dy.astype(np.float64), x64, w64, dw_ref, None, 1, 1, 1)
    dw = np.zeros_like(w)
    with force_path("winograd"):
        y = conv2d_forward(x, w, b, 1, 1, 1)
        dx = conv2d_backward(dy, x, w, dw, None, 1, 1, 1)
    assert _rel_max(y, y_ref) < CRITERION
    assert _rel_max(dx, dx_ref) < CRITERION
    assert _rel_max(dw, dw_ref) < CRITERION


def test_special_values_pass_through_as_in_the_direct_path():
    # a NaN or inf in the input poisons the outputs it reaches, never silently becomes a number
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    x[0, 1, 2, 3] = np.nan
    with force_path("winograd"):
        y = conv2d_forward(x, w, None, 1, 1, 1, relu=True)
    reach = conv2d_forward_ref(np.isnan(x).astype(np.float64), np.ones(w.shape), None, 1, 1, 1) > 0
    assert np.isnan(y[reach]).all()
