import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from helpers import assert_close, check_grads
from minialex.kernels.im2col import col2im, col2im_ref, conv_output_size, im2col, im2col_ref

geom = st.tuples(
    st.integers(1, 3), st.integers(1, 3),          # n, c
    st.integers(1, 10), st.integers(1, 10),        # h, w
    st.integers(1, 4), st.integers(1, 4),          # kh, kw
    st.tuples(st.integers(1, 4), st.integers(1, 4)),  # stride
    st.tuples(st.integers(0, 3), st.integers(0, 3)),  # padding
)


def _ok(h, w, kh, kw, p):
    return h + 2 * p[0] >= kh and w + 2 * p[1] >= kw


@settings(max_examples=25, deadline=None)
@given(geom, st.sampled_from([np.float64, np.float32]), st.integers(0, 2**31))
def test_im2col_and_col2im_match_reference(g, dtype, seed):
    n, c, h, w, kh, kw, s, p = g
    assume(_ok(h, w, kh, kw, p))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    cols = im2col(x, kh, kw, s, p)
    assert cols.dtype == dtype
    np.testing.assert_array_equal(cols, im2col_ref(x, kh, kw, s, p))
    dc = rng.standard_normal(cols.shape).astype(dtype)
    dx = col2im(dc, x.shape, kh, kw, s, p)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_close(dx, col2im_ref(dc, x.shape, kh, kw, s, p))


@settings(max_examples=10, deadline=None)
@given(geom, st.integers(0, 2**31))
def test_col2im_is_the_gradient_of_im2col(g, seed):
    n, c, h, w, kh, kw, s, p = g
    assume(_ok(h, w, kh, kw, p))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    gcols = rng.standard_normal(im2col_ref(x, kh, kw, s, p).shape)
    for fwd, bwd in ((im2col, col2im), (im2col_ref, col2im_ref)):
        check_grads(lambda a: float(np.sum(fwd(a, kh, kw, s, p) * gcols)), [x],
                    [bwd(gcols, x.shape, kh, kw, s, p)])


def test_im2col_writes_into_out_buffer_and_rejects_a_wrong_one():
    x = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
    out = np.full((3 * 9, 2 * 9), np.nan, dtype=np.float32)
    r = im2col(x, 3, 3, (2, 2), (1, 1), out=out)
    assert r is out
    np.testing.assert_array_equal(out, im2col_ref(x, 3, 3, (2, 2), (1, 1)))
    with pytest.raises(ValueError):
        im2col(x, 3, 3, (2, 2), (1, 1), out=np.empty((27, 18), dtype=np.float64))


def test_conv_output_size_follows_pytorch():
    assert conv_output_size(224, 224, 11, 11, (4, 4), (2, 2)) == (55, 55)
    assert conv_output_size(27, 27, 5, 5, (1, 1), (2, 2)) == (27, 27)
    assert conv_output_size(7, 9, 3, 2, (2, 3), (0, 1)) == (3, 4)
    with pytest.raises(ValueError):
        conv_output_size(2, 2, 5, 5, (1, 1), (1, 1))
