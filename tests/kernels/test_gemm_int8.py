"""The int8 GEMM against its NumPy twin, bit for bit, on both paths: hypothesis-drawn shapes
(tile edges, K from 0), AlexNet's layer shapes at small M, rounding ties and saturation, out as a
column slice, both ways of splitting the work between threads; the path switch."""
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minialex.errors import MinialexError
from minialex.kernels import gemm_int8
from minialex.kernels.gemm_int8 import (MR, NR, PAR_MIN_OPS, Rows, _gemm, _run_rows, gemm_u8s8, gemm_u8s8_ref,
                                        gemm_u8s8_rows, int8_path, pack_weights, padded_k)
from minialex.kernels.simd_int8 import has_avx512_vnni

PATHS = [pytest.param("vnni", marks=pytest.mark.skipif(not has_avx512_vnni(), reason="no avx512_vnni")),
         "emulated"]


def _operands(rng, m, n, k, spread=1.0):
    """a (M, padded_k(K)) with zero pad columns, w, bias and per-channel scales that put the
    requantised values around 0..255, so both clamps and the values between them occur."""
    a = np.zeros((m, padded_k(k)), np.uint8)
    a[:, :k] = rng.integers(0, 256, (m, k))
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    bias = rng.integers(-20000, 20000, n).astype(np.int32)
    scale = (rng.uniform(0.2, 2.0, n) * spread * 128 / (128 * 127 * np.sqrt(max(k, 1)) + 20000)).astype(np.float32)
    return a, w, bias, scale


def _check(a, w, bias, scale, path, out_dtype, pad=(0, 0)):
    """Run the kernel into a column slice of a wider array (pad columns left and right) and
    compare bit for bit; the pad columns must stay untouched."""
    m, n = a.shape[0], w.shape[0]
    ref = gemm_u8s8_ref(a[:, :w.shape[1]], w, bias, scale, out_dtype)
    fill = 77
    wide = np.full((m, pad[0] + n + pad[1]), fill, out_dtype)
    out = wide[:, pad[0]:pad[0] + n]
    assert _gemm(a, pack_weights(w), bias, scale, out, path) is out
    np.testing.assert_array_equal(out.view(np.uint8), ref.view(np.uint8))
    assert (wide[:, :pad[0]] == fill).all() and (wide[:, pad[0] + n:] == fill).all()
    return ref


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 3 * MR + 1), n=st.integers(1, 3 * NR + 3), k=st.integers(0, 70),
       out_dtype=st.sampled_from([np.uint8, np.float32]), left=st.integers(0, 3), right=st.integers(0, 3),
       seed=st.integers(0, 2 ** 32 - 1))
def test_drawn_shapes_are_bit_exact_with_the_twin(path, m, n, k, out_dtype, left, right, seed):
    a, w, bias, scale = _operands(np.random.default_rng(seed), m, n, k)
    _check(a, w, bias, scale, path, out_dtype, (left, right))


def _gathered(buf, rows, m):
    """The (M, K) matrix whose rows Rows places in buf, gathered byte by byte in Python."""
    k = rows.kh * 4 * rows.qpr
    a = np.empty((m, k), np.uint8)
    for r in range(m):
        n, p = divmod(r, rows.oh_n * rows.ow_n)
        oh, ow = divmod(p, rows.ow_n)
        start = n * rows.image + oh * rows.row + ow * rows.col
        for i in range(rows.kh):
            a[r, i * 4 * rows.qpr:(i + 1) * 4 * rows.qpr] = buf[start + i * rows.seg:][:4 * rows.qpr]
    return a


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=40, deadline=None)
@given(images=st.integers(1, 3), oh_n=st.integers(1, 5), ow_n=st.integers(1, 11), kh=st.integers(1, 4),
       qpr=st.integers(1, 12), n=st.integers(1, 2 * NR + 3), strides=st.tuples(*[st.integers(0, 60)] * 4),
       out_dtype=st.sampled_from([np.uint8, np.float32]), seed=st.integers(0, 2 ** 32 - 1))
def test_rows_read_in_place_are_bit_exact_with_the_twin(path, images, oh_n, ow_n, kh, qpr, n, strides,
                                                        out_dtype, seed):
    # rows (n, oh, ow) at drawn strides, overlapping or not, runs of 4*qpr bytes seg apart:
    # the twin multiplies the same bytes gathered into a matrix
    rng = np.random.default_rng(seed)
    rows = Rows(oh_n, ow_n, *strides[:3], kh, qpr, strides[3])
    m = images * oh_n * ow_n
    size = (images - 1) * rows.image + (oh_n - 1) * rows.row + (ow_n - 1) * rows.col \
        + (kh - 1) * rows.seg + 4 * qpr
    buf = rng.integers(0, 256, size, dtype=np.uint8)
    a = _gathered(buf, rows, m)
    _, w, bias, scale = _operands(rng, 0, n, a.shape[1])
    out = np.empty((m, n), out_dtype)
    assert _run_rows(buf, rows, m, pack_weights(w), bias, scale, out, path) is out
    np.testing.assert_array_equal(out.view(np.uint8), gemm_u8s8_ref(a, w, bias, scale, out_dtype).view(np.uint8))
    with pytest.raises(ValueError, match="read up to byte"):
        _run_rows(buf[:-1], rows, m, pack_weights(w), bias, scale, out, path)
    with pytest.raises(ValueError, match="do not fit"):
        gemm_u8s8_rows(buf, rows._replace(qpr=qpr + 1), m, pack_weights(w), bias, scale, out)


ALEXNET = [("conv1", 64, 363), ("conv2", 192, 1600), ("conv3", 384, 1728), ("conv4", 256, 3456),
           ("conv5", 256, 2304), ("fc6", 4096, 9216), ("fc7", 4096, 4096), ("fc8", 1000, 4096)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name, n, k", ALEXNET, ids=[s[0] for s in ALEXNET])
def test_alexnet_layer_shapes_at_small_m(path, name, n, k):
    rng = np.random.default_rng(len(name) + n + k)
    for m, out_dtype in ((1, np.uint8), (MR + 3, np.float32)):
        a, w, bias, scale = _operands(rng, m, n, k)
        ref = _check(a, w, bias, scale, path, out_dtype, (0, 5))
    assert ref.dtype == np.float32


@pytest.mark.parametrize("path", PATHS)
def test_rint_ties_go_to_even_and_both_clamps_saturate(path):
    # scale 0.5 on odd sums gives exact halves; large sums clamp at 255, negative ones at 0
    m, n, k = MR + 1, NR + 5, 8
    a = np.zeros((m, k), np.uint8)
    a[:, 0] = np.arange(m)                                  # row i: sum = i * w[n, 0]
    w = np.zeros((n, k), np.int8)
    w[:, 0] = np.arange(n) - n // 2
    bias = np.arange(n, dtype=np.int32) * 2 + 1             # odd at row 0
    scale = np.full(n, 0.5, np.float32)
    ref = _check(a, w, bias, scale, path, np.uint8)
    t = (a[:, :1].astype(np.int64) @ w[:, :1].T.astype(np.int64) + bias) * 0.5
    halves = t % 1 == 0.5
    assert halves.any() and (ref[halves] % 2 == 0).all()    # ties went to even
    scale[:] = 300.0
    ref = _check(a, w, bias, scale, path, np.uint8)
    assert (ref == 0).any() and (ref == 255).any()
    a[:] = 255
    w[:] = -127
    _check(a, w, bias, scale, path, np.uint8)               # the most negative products
    _check(a, w, bias, scale, path, np.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m, n, k", [(300, 70, 120), (3, 4 * NR + 7, 5000)], ids=["rows", "panels"])
def test_both_ways_of_splitting_between_threads(path, m, n, k, monkeypatch):
    # above PAR_MIN_OPS: many rows split by rows, few rows by the weights' panels
    assert 2 * m * n * padded_k(k) >= PAR_MIN_OPS
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread")
    numba.set_num_threads(2)
    splits = []
    par = gemm_int8._vnni_par
    monkeypatch.setattr(gemm_int8, "_vnni_par", lambda *args: (splits.append(args[-1]), par(*args)))
    a, w, bias, scale = _operands(np.random.default_rng(m), m, n, k)
    for out_dtype in (np.uint8, np.float32):
        _check(a, w, bias, scale, path, out_dtype, (1, 2))
    assert splits == ([] if path == "emulated" else [m < 100] * 2)


def test_the_environment_variable_chooses_the_path(monkeypatch):
    monkeypatch.delenv("MINIALEX_INT8", raising=False)
    native = "vnni" if has_avx512_vnni() else "emulated"
    assert int8_path() == native
    monkeypatch.setenv("MINIALEX_INT8", "auto")
    assert int8_path() == native
    monkeypatch.setenv("MINIALEX_INT8", "emulate")
    assert int8_path() == "emulated"
    rng = np.random.default_rng(5)
    a, w, bias, scale = _operands(rng, 5, 40, 30)
    out = np.empty((5, 40), np.uint8)
    gemm_u8s8(a, pack_weights(w), bias, scale, out)        # read at every call
    np.testing.assert_array_equal(out, gemm_u8s8_ref(a[:, :30], w, bias, scale, np.uint8))
    monkeypatch.setenv("MINIALEX_INT8", "vnni")
    with pytest.raises(MinialexError, match="MINIALEX_INT8 must be 'emulate', 'auto' or unset, not 'vnni'"):
        gemm_u8s8(a, pack_weights(w), bias, scale, out)


def test_a_cpu_without_the_flag_takes_the_emulated_path(monkeypatch):
    monkeypatch.delenv("MINIALEX_INT8", raising=False)
    monkeypatch.setattr(gemm_int8, "_cpu_has_vnni", lambda: False)
    assert int8_path() == "emulated"


def test_packing_is_zero_padded_panels_of_four_byte_groups():
    w = np.arange(35 * 6).reshape(35, 6).astype(np.int8)
    p = pack_weights(w)
    assert (p.n, p.k) == (35, 6) and p.data.ctypes.data % 64 == 0
    d = p.data.reshape(2, 2, NR, 4)                         # [panel][group][column][byte]
    np.testing.assert_array_equal(d[0, 1, 3, :2], w[3, 4:6])
    np.testing.assert_array_equal(d[1, 0, 2], w[34, :4])
    assert (d[0, 1, :, 2:] == 0).all() and (d[1, :, 3:] == 0).all()


def test_operands_of_the_wrong_kind_are_refused():
    a, w, bias, scale = _operands(np.random.default_rng(0), 4, 8, 10)
    p = pack_weights(w)
    out = np.empty((4, 8), np.uint8)
    with pytest.raises(ValueError, match="a must be"):
        gemm_u8s8(a[:, :8], p, bias, scale, out)
    with pytest.raises(ValueError, match="a must be"):
        gemm_u8s8(a.astype(np.int8), p, bias, scale, out)
    with pytest.raises(ValueError, match="out must be"):
        gemm_u8s8(a, p, bias, scale, np.empty((4, 8), np.int32))
    with pytest.raises(ValueError, match="out must be"):
        gemm_u8s8(a, p, bias, scale, np.empty((8, 4), np.uint8).T)
    with pytest.raises(ValueError, match="bias and scale"):
        gemm_u8s8(a, p, bias.astype(np.int64), scale, out)
    # the plain (N, K) matrix of the same size is not the packed layout
    with pytest.raises(ValueError, match="packed must come from pack_weights"):
        gemm_u8s8(a, p._replace(data=np.zeros((32, 12), np.int8)), bias, scale, out)
    with pytest.raises(ValueError, match="packed must come from pack_weights"):
        gemm_u8s8(a, p._replace(data=p.data[:-1]), bias, scale, out)
    with pytest.raises(ValueError, match="weights must be"):
        pack_weights(w.astype(np.int16))
