import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from helpers import assert_close, check_grads
from minialex.kernels.conv.im2col import col2im, col2im_ref, im2col, im2col_ref
from minialex.shapes import conv_output_size

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


@settings(max_examples=25, deadline=None)
@given(geom, st.integers(0, 2**31), st.data())
def test_row_block_im2col_and_col2im_match_reference(g, seed, data):
    # one image's output rows oh0..oh1 placed at column offset off of a block whose leading
    # dimension leaves room for the 16-lane overrun im2col_rows documents
    from minialex.kernels.conv.im2col import col2im_rows, im2col_rows
    from minialex.kernels.conv.layout import padded_to_image
    _, c, h, w, kh, kw, s, p = g
    assume(_ok(h, w, kh, kw, p))
    oh_n, ow_n = conv_output_size(h, w, kh, kw, s, p)
    oh0 = data.draw(st.integers(0, oh_n - 1))
    oh1 = data.draw(st.integers(oh0 + 1, oh_n))
    off = data.draw(st.integers(0, 5))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    width = (oh1 - oh0) * ow_n
    ld = off + width + 16
    k_rows = c * kh * kw
    wq = (w + 2 * p[1] + s[1] - 1) // s[1] + kw
    cols = np.full(k_rows * ld + 16, np.nan, dtype=np.float32)
    buf = np.empty(((oh1 - oh0 - 1) * s[0] + kh) * s[1] * wq + 16, dtype=np.float32)
    im2col_rows(x[0], buf, cols, ld, off, oh0, oh1, kh, kw, s[0], s[1], p[0], p[1], ow_n)
    block = cols[:k_rows * ld].reshape(k_rows, ld)
    want = im2col_ref(x, kh, kw, s, p)[:, oh0 * ow_n:oh1 * ow_n]
    np.testing.assert_array_equal(block[:, off:off + width], want)
    assert np.isnan(block[:, :off]).all()  # nothing before the block's columns is touched

    # the adjoint, accumulated over two row blocks as the backward pass does
    gcols = rng.standard_normal((k_rows, oh_n * ow_n)).astype(np.float32)
    hp = h + 2 * p[0]
    acc = np.zeros(c * hp * s[1] * wq + 16, dtype=np.float32)
    ld = off + oh_n * ow_n + 16
    for r0, r1 in ((0, oh0), (oh0, oh_n)):
        if r1 > r0:
            blk = np.zeros((k_rows, ld), dtype=np.float32)
            blk[:, off:off + (r1 - r0) * ow_n] = gcols[:, r0 * ow_n:r1 * ow_n]
            col2im_rows(np.append(blk.reshape(-1), np.zeros(16, np.float32)), ld, off, acc,
                        r0, r1, c, kh, kw, s[0], s[1], hp, wq, ow_n)
    dx = np.empty((c, h, w), dtype=np.float32)
    padded_to_image(acc, dx, p[0], p[1], s[1], wq)
    np.testing.assert_allclose(dx, col2im_ref(gcols, (1, c, h, w), kh, kw, s, p)[0], rtol=1e-5, atol=1e-5)
