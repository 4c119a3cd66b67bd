import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import minialex.kernels.conv.batched as batched
from helpers import assert_close, check_grads, record_im2col_chunks, to_torch
from minialex.kernels.conv import (conv2d_backward, conv2d_backward_ref, conv2d_forward,
                                   conv2d_forward_ref)

case = st.tuples(
    st.integers(1, 3),                                # n
    st.integers(1, 3), st.integers(1, 3),             # groups, cin per group
    st.integers(1, 3),                                # cout per group
    st.integers(1, 8), st.integers(1, 8),             # h, w
    st.integers(1, 3), st.integers(1, 3),             # kh, kw
    st.tuples(st.integers(1, 3), st.integers(1, 3)),  # stride
    st.tuples(st.integers(0, 2), st.integers(0, 2)),  # padding
    st.booleans(),                                    # bias
)


def _make(c, dtype, seed):
    n, g, cig, cog, h, w, kh, kw, s, p, bias = c
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, g * cig, h, w)).astype(dtype)
    wt = rng.standard_normal((g * cog, cig, kh, kw)).astype(dtype)
    b = rng.standard_normal(g * cog).astype(dtype) if bias else None
    return x, wt, b, s, p, g, rng


def _fits(c):
    _, _, _, _, h, w, kh, kw, _, p, _ = c
    return h + 2 * p[0] >= kh and w + 2 * p[1] >= kw


@settings(max_examples=25, deadline=None)
@given(case, st.sampled_from([np.float64, np.float32]), st.integers(0, 2**31))
def test_forward_and_backward_match_reference(c, dtype, seed):
    assume(_fits(c))
    x, w, b, s, p, g, rng = _make(c, dtype, seed)
    y = conv2d_forward(x, w, b, s, p, g)
    assert y.dtype == dtype
    assert_close(y, conv2d_forward_ref(x, w, b, s, p, g), dtype, atol=None if dtype == np.float64 else 1e-5)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dw, dw_r = np.zeros_like(w), np.zeros_like(w)
    db, db_r = (np.zeros_like(b), np.zeros_like(b)) if b is not None else (None, None)
    dx = conv2d_backward(dy, x, w, dw, db, s, p, g)
    dx_r = conv2d_backward_ref(dy, x, w, dw_r, db_r, s, p, g)
    at = None if dtype == np.float64 else 1e-5
    assert_close(dx, dx_r, dtype, atol=at)
    assert_close(dw, dw_r, dtype, atol=at)
    if b is not None:
        assert_close(db, db_r, dtype, atol=at)


@settings(max_examples=10, deadline=None)
@given(case, st.integers(0, 2**31))
def test_gradients_match_finite_differences(c, seed):
    assume(_fits(c))
    x, w, b, s, p, g, rng = _make(c, np.float64, seed)
    gy = rng.standard_normal(conv2d_forward_ref(x, w, b, s, p, g).shape)
    for fwd, bwd in ((conv2d_forward, conv2d_backward), (conv2d_forward_ref, conv2d_backward_ref)):
        dw = np.zeros_like(w)
        db = np.zeros_like(b) if b is not None else None
        dx = bwd(gy, x, w, dw, db, s, p, g)
        if b is None:
            check_grads(lambda x_, w_: float(np.sum(fwd(x_, w_, None, s, p, g) * gy)), [x, w], [dx, dw])
        else:
            check_grads(lambda x_, w_, b_: float(np.sum(fwd(x_, w_, b_, s, p, g) * gy)),
                        [x, w, b], [dx, dw, db])


def test_backward_accumulates_parameter_grads_and_can_skip_dx():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 6, 6))
    w = rng.standard_normal((6, 2, 3, 3))
    b = rng.standard_normal(6)
    dy = rng.standard_normal(conv2d_forward(x, w, b, 1, 1, 2).shape)
    dw, db = np.zeros_like(w), np.zeros_like(b)
    dx1 = conv2d_backward(dy, x, w, dw, db, 1, 1, 2)
    dw1, db1 = dw.copy(), db.copy()
    assert conv2d_backward(dy, x, w, dw, db, 1, 1, 2, need_dx=False) is None
    np.testing.assert_allclose(dw, 2 * dw1, rtol=1e-12)
    np.testing.assert_allclose(db, 2 * db1, rtol=1e-12)
    # db=None leaves the bias gradient alone and still accumulates dw
    dx2 = conv2d_backward(dy, x, w, dw, None, 1, 1, 2)
    np.testing.assert_allclose(dw, 3 * dw1, rtol=1e-12)
    np.testing.assert_allclose(dx2, dx1, rtol=1e-12)
    # a non-contiguous dw (e.g. a transposed view) is accumulated through a scratch buffer
    dwt = np.zeros(w.shape[::-1]).T
    conv2d_backward(dy, x, w, dwt, None, 1, 1, 2, need_dx=False)
    np.testing.assert_allclose(dwt, dw1, rtol=1e-12)
    # accumulate=False overwrites whatever the gradients held (contiguous or not)
    for bwd in (conv2d_backward, conv2d_backward_ref):
        dw_stale, db_stale, dwt = np.full_like(w, 7.0), np.full_like(b, 7.0), np.full(w.shape[::-1], 7.0).T
        bwd(dy, x, w, dw_stale, db_stale, 1, 1, 2, need_dx=False, accumulate=False)
        bwd(dy, x, w, dwt, None, 1, 1, 2, need_dx=False, accumulate=False)
        np.testing.assert_allclose(dw_stale, dw1, rtol=1e-12)
        np.testing.assert_allclose(db_stale, db1, rtol=1e-12)
        np.testing.assert_allclose(dwt, dw1, rtol=1e-12)


def test_batch_chunking_gives_the_same_result(monkeypatch):
    # the batched path (float64; float32 takes the blocked path)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3, 7, 7))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    dy = rng.standard_normal((5, 4, 4, 4))
    y_full = conv2d_forward(x, w, b, 2, 1, 1)
    dw_full, db_full = np.zeros_like(w), np.zeros_like(b)
    dx_full = conv2d_backward(dy, x, w, dw_full, db_full, 2, 1, 1)
    # room for two images' columns per chunk, so the batch of 5 really is split
    monkeypatch.setattr(batched, "_COLS_BYTES", 27 * 16 * 8 * 2)
    calls = record_im2col_chunks(monkeypatch, batched)
    np.testing.assert_allclose(conv2d_forward(x, w, b, 2, 1, 1), y_full, rtol=1e-6, atol=1e-6)
    assert [count for _, count, _ in calls] == [2, 2, 1]
    dw, db = np.zeros_like(w), np.zeros_like(b)
    dx = conv2d_backward(dy, x, w, dw, db, 2, 1, 1)
    np.testing.assert_allclose(dx, dx_full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, dw_full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, db_full, rtol=1e-5, atol=1e-5)


def test_rejects_bad_groups():
    with pytest.raises(ValueError):
        conv2d_forward(np.zeros((1, 4, 5, 5)), np.zeros((3, 2, 3, 3)), None, 1, 0, 2)


@settings(max_examples=15, deadline=None)
@given(case, st.integers(0, 2**31))
def test_matches_torch_conv2d(torch, c, seed):
    assume(_fits(c))
    x, w, b, s, p, g, rng = _make(c, np.float32, seed)
    y = conv2d_forward(x, w, b, s, p, g)
    xt, wt = to_torch(torch, x, True), to_torch(torch, w, True)
    bt = to_torch(torch, b, True) if b is not None else None
    yt = torch.nn.functional.conv2d(xt, wt, bt, stride=s, padding=p, groups=g)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.from_numpy(dy))
    dw = np.zeros_like(w)
    db = np.zeros_like(b) if b is not None else None
    dx = conv2d_backward(dy, x, w, dw, db, s, p, g)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-4, atol=1e-4)
    if b is not None:
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_matches_torch_at_alexnet_conv2_shape(torch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 96, 27, 27)).astype(np.float32)
    w = (rng.standard_normal((256, 48, 5, 5)) * 0.05).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32)
    y = conv2d_forward(x, w, b, 1, 2, 2)
    yt = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                    padding=2, groups=2)
    np.testing.assert_allclose(y, yt.numpy(), rtol=1e-4, atol=2e-4)


def test_fused_relu_equals_conv_then_relu():
    from minialex.kernels.relu import relu_backward, relu_forward
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4, 7, 7))
    w = rng.standard_normal((6, 2, 3, 3))
    b = rng.standard_normal(6)
    dy = rng.standard_normal((3, 6, 4, 4))
    y_plain = conv2d_forward(x, w, b, 2, 1, 2)
    y = conv2d_forward(x, w, b, 2, 1, 2, relu=True)
    np.testing.assert_array_equal(y, relu_forward(y_plain))
    np.testing.assert_allclose(conv2d_forward_ref(x, w, b, 2, 1, 2, relu=True), y, rtol=1e-12, atol=1e-12)
    dy_masked = relu_backward(dy, y)
    want = [np.zeros_like(w), np.zeros_like(b)]
    dx_want = conv2d_backward(dy_masked, x, w, *want, 2, 1, 2)
    for bwd in (conv2d_backward, conv2d_backward_ref):
        dw, db = np.zeros_like(w), np.zeros_like(b)
        dx = bwd(dy, x, w, dw, db, 2, 1, 2, relu_out=y)
        np.testing.assert_allclose(dx, dx_want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dw, want[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(db, want[1], rtol=1e-12, atol=1e-12)


@pytest.fixture
def threads():
    """Set numba's thread count for one test and restore it afterwards."""
    import numba
    before = numba.get_num_threads()
    yield lambda t: numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(before)


def _float32_case_against_float64(rng, n, cin, cout, k, s, p, hw, g, relu, accumulate):
    x = rng.standard_normal((n, cin, hw, hw)).astype(np.float32)
    w = (rng.standard_normal((cout, cin // g, k, k)) * 0.2).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    y = conv2d_forward(x, w, b, s, p, g, relu=relu)
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(y, conv2d_forward_ref(x64, w64, b64, s, p, g, relu=relu), rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dw, db = np.full_like(w, 0.5), np.full_like(b, 0.5)
    dw_r, db_r = np.full(w.shape, 0.5), np.full(b.shape, 0.5)
    relu_out = y if relu else None
    dx = conv2d_backward(dy, x, w, dw, db, s, p, g, accumulate=accumulate, relu_out=relu_out)
    dx_r = conv2d_backward_ref(dy.astype(np.float64), x64, w64, dw_r, db_r, s, p, g, accumulate=accumulate,
                               relu_out=None if relu_out is None else relu_out.astype(np.float64))
    np.testing.assert_allclose(dx, dx_r, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, dw_r, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(db, db_r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("block_cols", [1024, 40, 7])
def test_blocked_float32_path_covers_row_blocks_image_groups_and_thread_splits(
        monkeypatch, threads, nthreads, block_cols):
    # block_cols 1024: whole images grouped per block; 40 and 7: images cut into row blocks
    # (of one row at 7); n=1 deals one image's rows out to the threads (backward then takes
    # the batched path), n=3 gives the threads unequal image counts
    import minialex.kernels.conv.blocked as blocked
    threads(nthreads)
    monkeypatch.setattr(blocked, "BLOCK_COLS", block_cols)
    rng = np.random.default_rng(block_cols + nthreads)
    for n, cin, cout, k, s, p, hw, g, relu, acc in (
            (3, 3, 8, 11, 4, 2, 40, 1, True, True),    # conv1-like: stride 4, phase-split rows
            (4, 6, 10, 5, 1, 2, 11, 2, True, False),   # grouped, stride 1
            (1, 5, 7, 3, 2, 1, 9, 1, False, True),     # one image
            (5, 4, 40, 3, 1, 1, 6, 1, True, False),    # more channels than columns
            (2, 3, 4, 3, 3, 0, 7, 1, False, True)):    # stride 3 without padding
        _float32_case_against_float64(rng, n, cin, cout, k, s, p, hw, g, relu, acc)


def test_blocked_path_reuses_scratch_across_shapes(threads):
    # the per-thread scratch buffers grow to the largest call and are re-carved for smaller
    # ones: results must not depend on what ran before
    threads(2)
    rng = np.random.default_rng(7)
    shapes = ((4, 16, 32, 5, 1, 2, 20, 1), (2, 3, 4, 3, 1, 1, 5, 1), (4, 16, 32, 5, 1, 2, 20, 1))
    for n, cin, cout, k, s, p, hw, g in shapes:
        _float32_case_against_float64(rng, n, cin, cout, k, s, p, hw, g, True, False)


def test_blocked_backward_writes_through_non_contiguous_and_float64_grads(threads):
    threads(2)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 4, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((4, 6, 9, 9)).astype(np.float32)
    dw_want = np.zeros_like(w)
    db_want = np.zeros(6, np.float32)
    dx_want = conv2d_backward(dy, x, w, dw_want, db_want, 1, 1, 1)
    dwt = np.full(w.shape[::-1], 3.0, dtype=np.float32).T
    dw64, db64 = np.full(w.shape, 3.0), np.full(6, 3.0)
    for acc in (True, False):
        dwt[...] = 3.0
        dw64[...] = 3.0
        db64[...] = 3.0
        conv2d_backward(dy, x, w, dwt, None, 1, 1, 1, need_dx=False, accumulate=acc)
        dx = conv2d_backward(dy, x, w, dw64, db64, 1, 1, 1, accumulate=acc)
        base = 3.0 if acc else 0.0
        np.testing.assert_allclose(dwt, dw_want + base, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(dw64, dw_want + base, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(db64, db_want + base, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(dx, dx_want)
