import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import check_grads, to_torch
from minialex.kernels.cross_entropy import (cross_entropy_backward, cross_entropy_backward_ref,
                                            cross_entropy_forward, cross_entropy_forward_ref)

cases = st.tuples(st.integers(1, 6), st.integers(1, 12), st.sampled_from([0.0, 0.1, 0.5, 1.0]),
                  st.sampled_from([1.0, 3.0, 30.0]))


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
