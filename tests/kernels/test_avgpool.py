import numpy as np
from hypothesis import given, settings, strategies as st

from helpers import assert_close, check_grads, to_torch
from minialex.kernels.avgpool import (adaptive_avgpool2d_backward, adaptive_avgpool2d_backward_ref,
                                      adaptive_avgpool2d_forward, adaptive_avgpool2d_forward_ref)

cases = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 10), st.integers(1, 10),
                  st.integers(1, 7), st.integers(1, 7))


@settings(max_examples=25, deadline=None)
@given(cases, st.sampled_from([np.float64, np.float32]), st.integers(0, 2**31))
def test_matches_reference(c, dtype, seed):
    n, ch, h, w, oh, ow = c
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, ch, h, w)).astype(dtype)
    y = adaptive_avgpool2d_forward(x, (oh, ow))
    assert y.dtype == dtype and y.shape == (n, ch, oh, ow)
    assert_close(y, adaptive_avgpool2d_forward_ref(x, (oh, ow)))
    dy = rng.standard_normal(y.shape).astype(dtype)
    assert_close(adaptive_avgpool2d_backward(dy, x.shape), adaptive_avgpool2d_backward_ref(dy, x.shape))


@settings(max_examples=10, deadline=None)
@given(cases, st.integers(0, 2**31))
def test_gradient_matches_finite_differences(c, seed):
    n, ch, h, w, oh, ow = c
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, ch, h, w))
    gy = rng.standard_normal((n, ch, oh, ow))
    for fwd, bwd in ((adaptive_avgpool2d_forward, adaptive_avgpool2d_backward),
                     (adaptive_avgpool2d_forward_ref, adaptive_avgpool2d_backward_ref)):
        check_grads(lambda a: float(np.sum(fwd(a, (oh, ow)) * gy)), [x], [bwd(gy, x.shape)])


def test_alexnet_6x6_from_13x13_windows_overlap():
    x = np.arange(13 * 13, dtype=np.float64).reshape(1, 1, 13, 13)
    y = adaptive_avgpool2d_forward(x, 6)
    # rows of window 0: floor(0) .. ceil(13/6) = 0..3 ; window 1: 2..5 (overlaps window 0)
    assert y[0, 0, 0, 0] == x[0, 0, 0:3, 0:3].mean()
    assert y[0, 0, 1, 1] == x[0, 0, 2:5, 2:5].mean()


@settings(max_examples=15, deadline=None)
@given(cases, st.integers(0, 2**31))
def test_matches_torch_adaptive_avg_pool2d(torch, c, seed):
    n, ch, h, w, oh, ow = c
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, ch, h, w)).astype(np.float32)
    xt = to_torch(torch, x, True)
    yt = torch.nn.functional.adaptive_avg_pool2d(xt, (oh, ow))
    y = adaptive_avgpool2d_forward(x, (oh, ow))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-6)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(adaptive_avgpool2d_backward(dy, x.shape), xt.grad.numpy(), rtol=1e-4, atol=1e-6)
