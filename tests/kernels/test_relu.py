import numpy as np
from hypothesis import given, settings, strategies as st

from helpers import check_grads, distinct, to_torch
from minialex.kernels.relu import relu_backward, relu_backward_ref, relu_forward, relu_forward_ref

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


@settings(max_examples=25, deadline=None)
@given(shapes, st.sampled_from([np.float64, np.float32]), st.integers(0, 2**31))
def test_matches_reference(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    x.reshape(-1)[0] = 0.0
    y = relu_forward(x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, relu_forward_ref(x))
    dy = rng.standard_normal(shape).astype(dtype)
    np.testing.assert_array_equal(relu_backward(dy, y), relu_backward_ref(dy, y))


@settings(max_examples=10, deadline=None)
@given(shapes, st.integers(0, 2**31))
def test_gradient_matches_finite_differences(shape, seed):
    rng = np.random.default_rng(seed)
    x = distinct(rng, shape, gap=0.1)
    gy = rng.standard_normal(shape)
    for fwd, bwd in ((relu_forward, relu_backward), (relu_forward_ref, relu_backward_ref)):
        check_grads(lambda a: float(np.sum(fwd(a) * gy)), [x], [bwd(gy, fwd(x))])


def test_non_contiguous_input():
    x = np.arange(-12.0, 12.0).reshape(4, 6).T
    np.testing.assert_array_equal(relu_forward(x), np.maximum(x, 0))


def test_matches_torch_including_nan_and_zero(torch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    x[0, 0, :3] = [np.nan, 0.0, -0.0]
    y = relu_forward(x)
    xt = to_torch(torch, x, True)
    yt = torch.relu(xt)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    dy = rng.standard_normal(x.shape).astype(np.float32)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(relu_backward(dy, y), xt.grad.numpy())
