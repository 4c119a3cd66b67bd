import numpy as np
from hypothesis import given, settings, strategies as st

from helpers import check_grads, to_torch
from minialex.kernels.lrn import lrn_backward, lrn_backward_ref, lrn_forward, lrn_forward_ref

# a large alpha makes the window matter: with AlexNet's 1e-4 a wrong window still passes
cases = st.tuples(st.integers(1, 2), st.integers(1, 9), st.integers(1, 5), st.integers(1, 5),
                  st.integers(1, 7), st.sampled_from([0.5, 1e-4, 2.0]),
                  st.sampled_from([0.75, 0.5, 1.0, 0.6]), st.sampled_from([1.0, 2.0, 0.5]))


def _run(c, dtype, seed):
    n, ch, h, w, size, alpha, beta, k = c
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, ch, h, w)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    return x, dy, size, alpha, beta, k


@settings(max_examples=25, deadline=None)
@given(cases, st.sampled_from([np.float64, np.float32]), st.integers(0, 2**31))
def test_matches_reference(c, dtype, seed):
    x, dy, size, alpha, beta, k = _run(c, dtype, seed)
    y, scale = lrn_forward(x, size, alpha, beta, k)
    y_r, scale_r = lrn_forward_ref(x, size, alpha, beta, k)
    assert y.dtype == dtype and scale.dtype == dtype
    r, a = (1e-12, 1e-12) if dtype == np.float64 else (1e-5, 1e-6)
    np.testing.assert_allclose(scale, scale_r, rtol=r, atol=a)
    np.testing.assert_allclose(y, y_r, rtol=r, atol=a)
    np.testing.assert_allclose(lrn_backward(dy, x, y, scale, size, alpha, beta, k),
                               lrn_backward_ref(dy, x, y_r, scale_r, size, alpha, beta, k), rtol=r, atol=a)


@settings(max_examples=10, deadline=None)
@given(cases, st.integers(0, 2**31))
def test_gradient_matches_finite_differences(c, seed):
    x, gy, size, alpha, beta, k = _run(c, np.float64, seed)
    for fwd, bwd in ((lrn_forward, lrn_backward), (lrn_forward_ref, lrn_backward_ref)):
        y, scale = fwd(x, size, alpha, beta, k)
        check_grads(lambda a: float(np.sum(fwd(a, size, alpha, beta, k)[0] * gy)), [x],
                    [bwd(gy, x, y, scale, size, alpha, beta, k)], rtol=1e-6, atol=1e-8)


def test_window_is_size_half_before_and_rest_after():
    # one hot channel c=3: with size 4, the window of c covers c-2..c+1, so channel 3 reaches
    # the scale of channels 2, 3, 4, 5 and of no other
    x = np.zeros((1, 8, 1, 1))
    x[0, 3] = 1.0
    _, scale = lrn_forward(x, 4, alpha=4.0, beta=1.0, k=1.0)
    np.testing.assert_array_equal(scale[0, :, 0, 0] > 1.0, [False, False, True, True, True, True, False, False])


@settings(max_examples=15, deadline=None)
@given(cases, st.integers(0, 2**31))
def test_matches_torch_local_response_norm(torch, c, seed):
    x, dy, size, alpha, beta, k = _run(c, np.float32, seed)
    xt = to_torch(torch, x, True)
    yt = torch.nn.functional.local_response_norm(xt, size, alpha, beta, k)
    y, scale = lrn_forward(x, size, alpha, beta, k)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-5)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(lrn_backward(dy, x, y, scale, size, alpha, beta, k), xt.grad.numpy(),
                               rtol=1e-4, atol=1e-4)


def test_matches_torch_at_alexnet_shape_with_large_alpha(torch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 96, 11, 11)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    xt = to_torch(torch, x, True)
    yt = torch.nn.functional.local_response_norm(xt, 5, 0.5, 0.75, 2.0)
    yt.backward(torch.from_numpy(dy))
    y, scale = lrn_forward(x, 5, 0.5, 0.75, 2.0)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lrn_backward(dy, x, y, scale, 5, 0.5, 0.75, 2.0), xt.grad.numpy(),
                               rtol=1e-4, atol=1e-4)
