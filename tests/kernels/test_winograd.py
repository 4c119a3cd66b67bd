"""The winograd paths' own pieces: the weight transform, the NumPy twin of the algorithm, and the
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


TILES = [2, 4]   # F(2x2, 3x3) and F(4x4, 3x3)
PATH = {2: "winograd", 4: "winograd4"}


@settings(max_examples=30, deadline=None)
@given(cout=st.integers(1, 70), cin=st.integers(1, 40), flipped=st.booleans(), m=st.sampled_from(TILES),
       seed=st.integers(0, 2**31))
def test_weight_transform_is_g_w_gt_in_its_layout(cout, cin, flipped, m, seed):
    w = np.random.default_rng(seed).standard_normal((cout, cin, 3, 3)).astype(np.float32)
    u = winograd.transform_weights(w, flipped=flipped, m=m)
    g = winograd.MATRICES[m][1]
    a = m + 2
    src = w[:, :, ::-1, ::-1] if flipped else w
    ref = np.einsum("ik,ockl,jl->ijoc", g, src.astype(np.float64), g).reshape(a * a, cout, cin)
    rows, lanes = (cout, cin) if flipped else (cin, cout)   # GEMM depth, GEMM columns
    # the GEMM's B panels: u[p, lane // 32, row, lane % 32]
    assert u.shape[0] == a * a and u.shape[3] == 32 and u.shape[1] * 32 >= lanes and u.shape[2] >= rows
    b = u.transpose(0, 2, 1, 3).reshape(a * a, u.shape[2], -1)           # (points, rows, lanes)
    got = b[:, :rows, :lanes] if flipped else b[:, :rows, :lanes].transpose(0, 2, 1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # the padding the GEMM reads is zero
    assert not b[:, rows:].any() and not b[:, :, lanes:].any()


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 3), cin=st.integers(1, 6), cout=st.integers(1, 6), h=st.integers(1, 9),
       w=st.integers(1, 9), relu=st.booleans(), m=st.sampled_from(TILES), seed=st.integers(0, 2**31))
def test_numpy_twin_is_exact_in_float64(n, cin, cout, h, w, relu, m, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cin, h, w))
    wt = rng.standard_normal((cout, cin, 3, 3))
    b = rng.standard_normal(cout)
    np.testing.assert_allclose(winograd.winograd_forward_ref(x, wt, b, *winograd.MATRICES[m], relu=relu),
                               conv2d_forward_ref(x, wt, b, 1, 1, 1, relu=relu), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("cin,cout", [(192, 384), (384, 256), (256, 256)], ids=["conv3", "conv4", "conv5"])
def test_alexnet_3x3_layers_are_within_the_criterion(cin, cout, m):
    # He-scaled weights as in training; output, input gradient and weight gradient at batch 8
    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((8, cin, 13, 13)), 0).astype(np.float32)
    w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    dy = rng.standard_normal((8, cout, 13, 13)).astype(np.float32)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y_ref = conv2d_forward_ref(x64, w64, b.astype(np.float64), 1, 1, 1)
    dw_ref = np.zeros_like(w64)
    dx_ref = conv2d_backward_ref(dy.astype(np.float64), x64, w64, dw_ref, None, 1, 1, 1)
    dw = np.zeros_like(w)
    with force_path(PATH[m]):
        y = conv2d_forward(x, w, b, 1, 1, 1)
        dx = conv2d_backward(dy, x, w, dw, None, 1, 1, 1)
    assert _rel_max(y, y_ref) < CRITERION
    assert _rel_max(dx, dx_ref) < CRITERION
    assert _rel_max(dw, dw_ref) < CRITERION


@pytest.mark.parametrize("m", TILES)
def test_special_values_pass_through_as_in_the_direct_path(m):
    # a NaN or inf in the input poisons the outputs it reaches, never silently becomes a number
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    x[0, 1, 2, 3] = np.nan
    with force_path(PATH[m]):
        y = conv2d_forward(x, w, None, 1, 1, 1, relu=True)
    reach = conv2d_forward_ref(np.isnan(x).astype(np.float64), np.ones(w.shape), None, 1, 1, 1) > 0
    assert np.isnan(y[reach]).all()
