import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import check_grads, distinct, to_torch
from minialex.kernels.maxpool import maxpool2d_backward, maxpool2d_backward_ref, maxpool2d_forward, maxpool2d_forward_ref
from minialex.shapes import pool_output_size


@st.composite
def cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 9))
    w = draw(st.integers(max(1, kw - 2 * pw), 9))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w, (kh, kw),
            (draw(st.integers(1, 4)), draw(st.integers(1, 4))), (ph, pw), draw(st.booleans()))


def _x(rng, shape, dtype, kind):
    if kind == "ties":  # few distinct values: exercises first-maximum routing
        return rng.integers(-2, 2, shape).astype(dtype)
    if kind == "negative":  # every value below zero: padding must act as -inf, not 0
        return -rng.uniform(1, 2, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@settings(max_examples=25, deadline=None)
@given(cases(), st.sampled_from([np.float64, np.float32]), st.sampled_from(["normal", "ties", "negative"]),
       st.integers(0, 2**31))
def test_matches_reference(c, dtype, kind, seed):
    n, ch, h, w, k, s, p, ceil = c
    rng = np.random.default_rng(seed)
    x = _x(rng, (n, ch, h, w), dtype, kind)
    y, arg = maxpool2d_forward(x, k, s, p, ceil)
    y_r, arg_r = maxpool2d_forward_ref(x, k, s, p, ceil)
    assert y.dtype == dtype and arg.dtype == np.int64
    np.testing.assert_array_equal(y, y_r)
    np.testing.assert_array_equal(arg, arg_r)
    assert np.isfinite(y).all()
    dy = rng.standard_normal(y.shape).astype(dtype)
    np.testing.assert_allclose(maxpool2d_backward(dy, arg, x.shape),
                               maxpool2d_backward_ref(dy, arg_r, x.shape), rtol=1e-6, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(cases(), st.integers(0, 2**31))
def test_gradient_matches_finite_differences(c, seed):
    n, ch, h, w, k, s, p, ceil = c
    rng = np.random.default_rng(seed)
    x = distinct(rng, (n, ch, h, w))
    for fwd, bwd in ((maxpool2d_forward, maxpool2d_backward), (maxpool2d_forward_ref, maxpool2d_backward_ref)):
        y, arg = fwd(x, k, s, p, ceil)
        gy = rng.standard_normal(y.shape)
        check_grads(lambda a: float(np.sum(fwd(a, k, s, p, ceil)[0] * gy)), [x], [bwd(gy, arg, x.shape)])


def test_output_size_ceil_mode_rule():
    # torch: with ceil_mode the last window must start inside the input or the left padding
    assert pool_output_size(55, 3, 2, 0, False) == 27
    assert pool_output_size(6, 3, 2, 0, False) == 2
    assert pool_output_size(6, 3, 2, 0, True) == 3
    assert pool_output_size(5, 2, 2, 1, True) == 3
    assert pool_output_size(4, 2, 2, 1, True) == 3
    with pytest.raises(ValueError):
        maxpool2d_forward(np.zeros((1, 1, 5, 5)), 2, 2, 2, False)


@settings(max_examples=20, deadline=None)
@given(cases(), st.sampled_from(["normal", "ties", "negative", "nan"]), st.integers(0, 2**31))
def test_matches_torch_max_pool2d(torch, c, kind, seed):
    n, ch, h, w, k, s, p, ceil = c
    rng = np.random.default_rng(seed)
    x = _x(rng, (n, ch, h, w), np.float32, "normal" if kind == "nan" else kind)
    if kind == "nan":
        x[rng.random(x.shape) < 0.2] = np.nan
    xt = to_torch(torch, x, True)
    yt, it = torch.nn.functional.max_pool2d(xt, k, s, p, ceil_mode=ceil, return_indices=True)
    y, arg = maxpool2d_forward(x, k, s, p, ceil)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(arg, it.numpy())
    dy = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(maxpool2d_backward(dy, arg, x.shape), xt.grad.numpy(), rtol=1e-5, atol=1e-6)


@st.composite
def alexnet_windows(draw):
    # 3x3 windows with column stride 2 take the vectorised row path; rows long enough to have a
    # vector body and a remainder, padding and ceil_mode for the edge windows around it
    h, w = draw(st.integers(3, 12)), draw(st.integers(3, 45))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w, (3, 3), (draw(st.integers(1, 3)), 2),
            (draw(st.integers(0, 1)), draw(st.integers(0, 1))), draw(st.booleans()))


@settings(max_examples=30, deadline=None)
@given(alexnet_windows(), st.sampled_from([np.float64, np.float32]),
       st.sampled_from(["normal", "ties", "negative", "-inf"]), st.integers(0, 2**31))
def test_3x3_stride_2_rows_match_reference(c, dtype, kind, seed):
    n, ch, h, w, k, s, p, ceil = c
    rng = np.random.default_rng(seed)
    x = _x(rng, (n, ch, h, w), dtype, "normal" if kind == "-inf" else kind)
    if kind == "-inf":  # whole windows of -inf: the index must stay on the window's first element
        x[rng.random(x.shape) < 0.7] = -np.inf
    y, arg = maxpool2d_forward(x, k, s, p, ceil)
    y_r, arg_r = maxpool2d_forward_ref(x, k, s, p, ceil)
    np.testing.assert_array_equal(y, y_r)
    np.testing.assert_array_equal(arg, arg_r)


@settings(max_examples=15, deadline=None)
@given(alexnet_windows(), st.integers(0, 2**31))
def test_3x3_stride_2_rows_with_nan_match_torch(torch, c, seed):
    n, ch, h, w, k, s, p, ceil = c
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, ch, h, w)).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = np.nan
    yt, it = torch.nn.functional.max_pool2d(torch.from_numpy(x), k, s, p, ceil_mode=ceil, return_indices=True)
    y, arg = maxpool2d_forward(x, k, s, p, ceil)
    np.testing.assert_array_equal(y, yt.numpy())
    np.testing.assert_array_equal(arg, it.numpy())


GUARDED = """
import ctypes, mmap, sys
import numpy as np
from minialex.kernels.maxpool import _maxpool_fwd, maxpool2d_forward_ref

libc = ctypes.CDLL(None)
maps = []

def guarded(shape, dtype):
    # an array whose last byte lies just before a page that may not be read or written
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    pages = -(-nbytes // mmap.PAGESIZE) + 1
    m = mmap.mmap(-1, pages * mmap.PAGESIZE)
    maps.append(m)
    start = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert libc.mprotect(ctypes.c_void_p(start + (pages - 1) * mmap.PAGESIZE), mmap.PAGESIZE, 0) == 0
    return np.frombuffer(m, dtype, int(np.prod(shape)), (pages - 1) * mmap.PAGESIZE - nbytes).reshape(shape)

rng = np.random.default_rng(0)
for c, h, w in [(3, 27, 27), (1, 13, 13), (2, 9, 35), (1, 5, 33), (1, 55, 55), (4, 5, 7)]:
    oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    x = guarded((c, h, w), np.float32)
    x[...] = rng.standard_normal((c, h, w))
    y, arg = guarded((c, oh, ow), np.float32), guarded((c, oh, ow), np.int64)
    _maxpool_fwd(x, y, arg, 3, 3, 2, 2, 0, 0)
    y_r, arg_r = maxpool2d_forward_ref(x[None], 3, 2, 0, False)
    assert np.array_equal(y, y_r[0]) and np.array_equal(arg, arg_r[0]), (c, h, w)
print("ok")
"""


def test_3x3_stride_2_rows_touch_nothing_past_their_arrays():
    # the vector rows read up to 34 floats past a window and write 16 outputs at a time: with
    # x, y and argmax each ending where an inaccessible page begins, a stray access faults
    # (run in a child process, which the fault ends)
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", GUARDED], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
