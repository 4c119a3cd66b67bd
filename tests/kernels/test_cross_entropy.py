import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import check_grads, to_torch
from minialex.kernels.cross_entropy import (PARALLEL_MIN, cross_entropy_backward, cross_entropy_backward_ref,
                                            cross_entropy_forward, cross_entropy_forward_ref)

# class counts below, at and past the 16 lanes of the float32 kernels (1000: ImageNet's)
cases = st.tuples(st.integers(1, 6), st.one_of(st.integers(1, 12), st.sampled_from([16, 17, 40, 1000])),
                  st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.sampled_from([1.0, 3.0, 30.0]))


def _make(c, dtype, seed):
    n, k, ls, spread = c
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, k)) * spread).astype(dtype), rng.integers(0, k, n), ls


@settings(max_examples=25, deadline=None)
@given(cases, st.sampled_from([np.float64, np.float32]), st.integers(0, 2**31))
def test_matches_reference(c, dtype, seed):
    x, t, ls = _make(c, dtype, seed)
    loss, lp = cross_entropy_forward(x, t, ls)
    loss_r, lp_r = cross_entropy_forward_ref(x, t, ls)
    assert isinstance(loss, float) and lp.dtype == dtype
    r = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(loss, loss_r, rtol=r, atol=r)
    np.testing.assert_allclose(lp, lp_r, rtol=r, atol=r * 10)
    np.testing.assert_allclose(cross_entropy_backward(lp, t, ls, 0.7), cross_entropy_backward_ref(lp_r, t, ls, 0.7),
                               rtol=r, atol=r)


@settings(max_examples=10, deadline=None)
@given(cases, st.integers(0, 2**31))
def test_gradient_matches_finite_differences(c, seed):
    x, t, ls = _make(c, np.float64, seed)
    for fwd, bwd in ((cross_entropy_forward, cross_entropy_backward),
                     (cross_entropy_forward_ref, cross_entropy_backward_ref)):
        _, lp = fwd(x, t, ls)
        check_grads(lambda a: 2.5 * fwd(a, t, ls)[0], [x], [bwd(lp, t, ls, 2.5)], rtol=1e-5, atol=1e-7)


def test_large_logits_are_stable_and_nan_propagates():
    x = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)
    loss, lp = cross_entropy_forward(x, np.array([0]))
    assert loss == 0.0 and np.isfinite(lp[0, :2]).all()
    loss, lp = cross_entropy_forward(np.array([[1.0, np.nan]]), np.array([0]))
    assert np.isnan(loss)
    with pytest.raises(IndexError):
        cross_entropy_forward(np.zeros((2, 3)), np.array([0, 3]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minus_inf_logit_and_nan_in_the_vector_lanes(dtype):
    # a -inf logit that is not the target: finite loss without smoothing (as torch: 0.4741),
    # inf with smoothing; its gradient is 0
    x = np.full((2, 40), -3.0, dtype)
    x[:, 0], x[:, 5], x[:, 39] = 1.0, -np.inf, 0.5
    t = np.array([0, 39])
    loss, lp = cross_entropy_forward(x, t)
    ref, _ = cross_entropy_forward_ref(np.where(np.isinf(x), -1e30, x).astype(np.float64), t)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    assert (cross_entropy_backward(lp, t)[:, 5] == 0).all()
    assert cross_entropy_forward(x, t, 0.1)[0] == np.inf
    # NaN anywhere in a row (a vector lane or the scalar tail) makes the loss NaN
    for j in (3, 33, 39):
        y = x.copy()
        y[1, j] = np.nan
        loss, lp = cross_entropy_forward(y, t)
        assert np.isnan(loss) and np.isnan(lp[1]).all() and not np.isnan(lp[0]).any()


@pytest.mark.parametrize("n", [1, 7, PARALLEL_MIN // 1000 + 3])
def test_serial_and_parallel_float32_paths_match_reference(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, 1000)) * 4).astype(np.float32)
    t = rng.integers(0, 1000, n)
    for ls in (0.0, 0.2):
        loss, lp = cross_entropy_forward(x, t, ls)
        loss_r, lp_r = cross_entropy_forward_ref(x.astype(np.float64), t, ls)
        np.testing.assert_allclose(loss, loss_r, rtol=1e-6)
        np.testing.assert_allclose(lp, lp_r, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(cross_entropy_backward(lp, t, ls, 3.0),
                                   cross_entropy_backward_ref(lp_r, t, ls, 3.0), rtol=1e-5, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(cases, st.integers(0, 2**31))
def test_matches_torch_cross_entropy(torch, c, seed):
    x, t, ls = _make(c, np.float32, seed)
    xt = to_torch(torch, x, True)
    lt = torch.nn.functional.cross_entropy(xt, torch.from_numpy(t), label_smoothing=ls)
    lt.backward()
    loss, lp = cross_entropy_forward(x, t, ls)
    np.testing.assert_allclose(loss, lt.item(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cross_entropy_backward(lp, t, ls), xt.grad.numpy(), rtol=1e-4, atol=1e-6)
