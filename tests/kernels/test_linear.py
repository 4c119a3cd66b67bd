import numpy as np
from hypothesis import given, settings, strategies as st

from helpers import assert_close, check_grads, to_torch
from minialex.kernels.linear import linear_backward, linear_backward_ref, linear_forward, linear_forward_ref

dims = st.tuples(st.integers(1, 5), st.integers(1, 70), st.integers(1, 70), st.booleans())


def _make(d, dtype, seed):
    n, fin, fout, bias = d
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, fin)).astype(dtype)
    w = rng.standard_normal((fout, fin)).astype(dtype)
    b = rng.standard_normal(fout).astype(dtype) if bias else None
    return x, w, b, rng


@settings(max_examples=25, deadline=None)
@given(dims, st.sampled_from([np.float64, np.float32]), st.integers(0, 2**31))
def test_matches_reference(d, dtype, seed):
    x, w, b, rng = _make(d, dtype, seed)
    y = linear_forward(x, w, b)
    assert y.dtype == dtype
    at = None if dtype == np.float64 else 1e-4
    assert_close(y, linear_forward_ref(x, w, b), dtype, atol=at)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dw, dw_r = np.zeros_like(w), np.zeros_like(w)
    db, db_r = (np.zeros_like(b), np.zeros_like(b)) if b is not None else (None, None)
    assert_close(linear_backward(dy, x, w, dw, db), linear_backward_ref(dy, x, w, dw_r, db_r), dtype, atol=at)
    assert_close(dw, dw_r, dtype, atol=at)
    if b is not None:
        assert_close(db, db_r, dtype, atol=at)


@settings(max_examples=10, deadline=None)
@given(dims, st.integers(0, 2**31))
def test_gradients_match_finite_differences(d, seed):
    x, w, b, rng = _make(d, np.float64, seed)
    gy = rng.standard_normal((x.shape[0], w.shape[0]))
    for fwd, bwd in ((linear_forward, linear_backward), (linear_forward_ref, linear_backward_ref)):
        dw = np.zeros_like(w)
        db = np.zeros_like(b) if b is not None else None
        dx = bwd(gy, x, w, dw, db)
        if b is None:
            check_grads(lambda x_, w_: float(np.sum(fwd(x_, w_, None) * gy)), [x, w], [dx, dw])
        else:
            check_grads(lambda x_, w_, b_: float(np.sum(fwd(x_, w_, b_) * gy)), [x, w, b], [dx, dw, db])


def test_backward_accumulates():
    x, w, b, rng = _make((3, 7, 5, True), np.float64, 0)
    dy = rng.standard_normal((3, 5))
    dw, db = np.zeros_like(w), np.zeros_like(b)
    linear_backward(dy, x, w, dw, db)
    dw1, db1 = dw.copy(), db.copy()
    assert linear_backward(dy, x, w, dw, db, need_dx=False) is None
    np.testing.assert_allclose(dw, 2 * dw1, rtol=1e-12)
    np.testing.assert_allclose(db, 2 * db1, rtol=1e-12)
    for bwd in (linear_backward, linear_backward_ref):
        dw, db = np.full_like(w, 7.0), np.full_like(b, 7.0)
        bwd(dy, x, w, dw, db, need_dx=False, accumulate=False)
        np.testing.assert_allclose(dw, dw1, rtol=1e-12)
        np.testing.assert_allclose(db, db1, rtol=1e-12)


@settings(max_examples=10, deadline=None)
@given(dims, st.integers(0, 2**31))
def test_matches_torch_linear(torch, d, seed):
    x, w, b, rng = _make(d, np.float32, seed)
    xt, wt = to_torch(torch, x, True), to_torch(torch, w, True)
    bt = to_torch(torch, b, True) if b is not None else None
    yt = torch.nn.functional.linear(xt, wt, bt)
    y = linear_forward(x, w, b)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.from_numpy(dy))
    dw = np.zeros_like(w)
    db = np.zeros_like(b) if b is not None else None
    np.testing.assert_allclose(linear_backward(dy, x, w, dw, db), xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-4, atol=1e-4)
    if b is not None:
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(1, 300), st.integers(8, 90), st.booleans(), st.booleans(),
       st.booleans(), st.sampled_from([1, 2]), st.integers(0, 2**31))
def test_small_batch_backward_matches_reference(n, fin, fout, accumulate, need_dx, aligned, threads, seed):
    # float32 with at most SMALL_BATCH rows takes the fused one-pass kernel: edges in both
    # directions (rows past a multiple of 8, columns past a multiple of 16), the streaming-store
    # case (aligned gradient, whole vectors per row) and the plain-store case, 1 and 2 threads
    import numba
    from minialex._memory import aligned_zeros_like
    from minialex.kernels.linear import SMALL_BATCH
    assert n <= SMALL_BATCH
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, fin)).astype(np.float32)
    w = rng.standard_normal((fout, fin)).astype(np.float32)
    dy = rng.standard_normal((n, fout)).astype(np.float32)
    start = rng.standard_normal((fout, fin)).astype(np.float32)
    dw = aligned_zeros_like(w) if aligned else np.zeros((fout * fin + 1,), np.float32)[1:].reshape(fout, fin)
    dw[...] = start
    db = np.zeros(fout, np.float32)
    dw_r, db_r = start.astype(np.float64), np.zeros(fout)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        dx = linear_backward(dy, x, w, dw, db, need_dx=need_dx, accumulate=accumulate)
    finally:
        numba.set_num_threads(before)
    dx_r = linear_backward_ref(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64), dw_r, db_r,
                               need_dx=need_dx, accumulate=accumulate)
    np.testing.assert_allclose(dw, dw_r, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(db, db_r, rtol=1e-5, atol=1e-5)
    if need_dx:
        assert dx.shape == (n, fin) and dx.dtype == np.float32
        np.testing.assert_allclose(dx, dx_r, rtol=1e-5, atol=1e-4)
    else:
        assert dx is None


def test_parameter_gradients_are_aligned_for_streaming_stores():
    from minialex._memory import aligned_zeros_like
    from minialex.nn import Linear
    layer = Linear(37, 11)
    assert layer.weight.grad.ctypes.data % 64 == 0 and layer.weight.grad.shape == (11, 37)
    a = aligned_zeros_like(np.ones((3, 5), np.float64))
    assert a.ctypes.data % 64 == 0 and a.dtype == np.float64 and a.flags.c_contiguous and not a.any()
