"""gemm against its NumPy twin: shapes around every tile/block edge, transposes,
strided views, accumulation, both dtypes, one and two threads, AlexNet shapes."""
import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from numba import njit

from minialex.kernels import gemm as gemm_mod
from minialex.kernels.gemm import gemm, gemm_ref
from minialex.kernels.simd import vhsum, vload, vmul, vsplat, vstore, vtranspose_8x16

RTOL = {np.float32: 1e-4, np.float64: 1e-12}


def _operand(rng, shape, dtype, layout):
    """A 2-D array of `shape` in one of the memory layouts callers hand to gemm."""
    r, c = shape
    if layout == "C":
        return rng.standard_normal((r, c)).astype(dtype)
    if layout == "F":  # x.T of a C-contiguous array
        return rng.standard_normal((c, r)).astype(dtype).T
    if layout == "rows":  # row-strided view, unit inner stride (a slice of a wider matrix)
        return rng.standard_normal((r, c + 5)).astype(dtype)[:, 2:2 + c]
    if layout == "none":  # no unit-stride axis at all
        return rng.standard_normal((2 * r, 2 * c)).astype(dtype)[::2, ::2]
    raise ValueError(layout)


def _check(a, b, trans_a, trans_b, accumulate, dtype, rng):
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    a0, b0 = a.copy(), b.copy()
    out = rng.standard_normal((m, n)).astype(dtype)
    c0 = out.copy()
    got = gemm(a, b, out, trans_a=trans_a, trans_b=trans_b, accumulate=accumulate)
    assert got is out
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    want = gemm_ref(a64, b64, c0.astype(np.float64), trans_a, trans_b, accumulate)
    # per-element error bound relative to the magnitude of the terms summed
    mag = gemm_ref(np.abs(a64), np.abs(b64), None, trans_a, trans_b)
    if accumulate:
        mag = mag + np.abs(c0)
    err = np.abs(out - want)
    bound = RTOL[dtype] * mag + 1e-30
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"
    # operands untouched
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


dims = st.one_of(st.integers(1, 12), st.integers(13, 70), st.sampled_from([7, 8, 9, 15, 16, 17, 31, 32, 33]))


@settings(max_examples=120, deadline=None)
@given(m=dims, n=dims, k=dims, trans_a=st.booleans(), trans_b=st.booleans(),
       accumulate=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       layout_a=st.sampled_from(["C", "F", "rows", "none"]),
       layout_b=st.sampled_from(["C", "F", "rows", "none"]), seed=st.integers(0, 2**31 - 1))
def test_small_shapes_match_reference(m, n, k, trans_a, trans_b, accumulate, dtype,
                                      layout_a, layout_b, seed):
    rng = np.random.default_rng(seed)
    a = _operand(rng, (k, m) if trans_a else (m, k), dtype, layout_a)
    b = _operand(rng, (n, k) if trans_b else (k, n), dtype, layout_b)
    _check(a, b, trans_a, trans_b, accumulate, dtype, rng)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    old = numba.get_num_threads()
    numba.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    yield request.param
    numba.set_num_threads(old)


# Shapes crossing the packing blocks (MC=192, KC=384, NC=1024), with ragged tiles;
# M <= SMALL_M with plain B takes the read-B-in-place path, the others pack B.
BLOCK_SHAPES = [
    (200, 1060, 390),   # every block edge, M > 192
    (37, 1500, 401),    # small M, in place, N split across threads
    (390, 45, 770),     # M above SMALL_M, split along M
    (8, 2100, 900),     # FC-like: one row panel
    (5, 1001, 4103),    # dot kernel (trans_b): aliased rows, columns in 3s but the last 2, k tail
    (7, 1000, 40),      # dot kernel: the last column alone in its group of 3
    (8, 3, 17),         # dot kernel, serial
    (1, 4097, 1031),    # one-row dot kernel: columns in 4s but the last one, k tail past 32s
    (1, 6, 70),         # one-row dot kernel, serial
]


@pytest.mark.parametrize("m,n,k", BLOCK_SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_block_edges(threads, m, n, k, trans_a, trans_b):
    rng = np.random.default_rng(m * 7 + n)
    a = _operand(rng, (k, m) if trans_a else (m, k), np.float32, "C")
    b = _operand(rng, (n, k) if trans_b else (k, n), np.float32, "rows")
    _check(a, b, trans_a, trans_b, True, np.float32, rng)


# (name, M, N, K, trans_a, trans_b) as the layers call it, batch 8
ALEXNET = [
    ("conv1 forward", 64, 8 * 3025, 363, False, False),
    ("conv3 backward-data", 1728, 8 * 169, 384, True, False),
    ("conv5 backward-weight", 256, 2304, 8 * 169, False, True),
    ("fc6 forward", 8, 4096, 9216, False, True),
    ("fc6 forward, batch 1", 1, 4096, 9216, False, True),
    ("fc7 backward-weight", 4096, 4096, 8, True, False),
    ("fc8 backward-data", 8, 4096, 1000, False, False),
]


@pytest.mark.parametrize("name,m,n,k,trans_a,trans_b", ALEXNET, ids=[s[0] for s in ALEXNET])
def test_alexnet_shapes(name, m, n, k, trans_a, trans_b):
    rng = np.random.default_rng(k)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    out = gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    want = gemm_ref(a.astype(np.float64), b.astype(np.float64), None, trans_a, trans_b)
    mag = gemm_ref(np.abs(a).astype(np.float64), np.abs(b).astype(np.float64), None, trans_a, trans_b)
    assert out.dtype == np.float32 and out.shape == (m, n)
    assert np.all(np.abs(out - want) <= 1e-4 * mag)


def test_power_of_two_leading_dimensions_and_weight_view():
    # conv weights arrive as w.reshape(Cout, -1); linear weights as (out, in) with in = 2^k
    rng = np.random.default_rng(3)
    w = rng.standard_normal((96, 3, 11, 11)).astype(np.float32)
    cols = rng.standard_normal((363, 1024)).astype(np.float32)
    np.testing.assert_allclose(gemm(w.reshape(96, -1), cols), w.reshape(96, -1) @ cols, rtol=1e-4, atol=1e-3)
    x = rng.standard_normal((16, 2048)).astype(np.float32)
    wl = rng.standard_normal((512, 2048)).astype(np.float32)
    np.testing.assert_allclose(gemm(x, wl, trans_b=True), x @ wl.T, rtol=1e-4, atol=1e-3)


def test_degenerate_sizes():
    a = np.ones((3, 0), np.float32)
    b = np.ones((0, 4), np.float32)
    np.testing.assert_array_equal(gemm(a, b), np.zeros((3, 4), np.float32))
    out = np.full((3, 4), 2.0, np.float32)
    gemm(a, b, out, accumulate=True)
    np.testing.assert_array_equal(out, 2.0)
    assert gemm(np.ones((0, 5)), np.ones((5, 6))).shape == (0, 6)
    one = gemm(np.array([[3.0]], np.float32), np.array([[4.0]], np.float32))
    assert one.dtype == np.float32 and one[0, 0] == 12.0


def test_out_none_ignores_accumulate_and_new_array_returned():
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    r = gemm(a, a, trans_b=True, accumulate=True)
    np.testing.assert_array_equal(r, a @ a.T)


def test_read_only_inputs():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((40, 50)).astype(np.float32)
    b = rng.standard_normal((50, 70)).astype(np.float32)
    a.flags.writeable = False
    b.flags.writeable = False
    np.testing.assert_allclose(gemm(a, b), a @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", ["dtype", "mixed", "shape", "out_shape", "out_dtype", "out_strided", "ndim"])
def test_rejects_bad_arguments(bad):
    a = np.ones((4, 5), np.float32)
    b = np.ones((5, 6), np.float32)
    kwargs = {}
    if bad == "dtype":
        a, b = a.astype(np.int32), b.astype(np.int32)
    elif bad == "mixed":
        b = b.astype(np.float64)
    elif bad == "shape":
        b = np.ones((6, 5), np.float32)
    elif bad == "out_shape":
        kwargs["out"] = np.empty((6, 4), np.float32)
    elif bad == "out_dtype":
        kwargs["out"] = np.empty((4, 6), np.float64)
    elif bad == "out_strided":
        kwargs["out"] = np.empty((4, 12), np.float32)[:, ::2]
    elif bad == "ndim":
        a = np.ones(5, np.float32)
    with pytest.raises((TypeError, ValueError)):
        gemm(a, b, **kwargs)


def test_packed_buffers_are_64_byte_aligned():
    for n in (1, 7, 100, 3000):
        buf = gemm_mod.aligned_f32(n)
        assert buf.shape == (n,) and buf.ctypes.data % 64 == 0


@njit(cache=True)
def _hsum(x):
    return vhsum(vload(x, 0))


@njit(cache=True)
def _scale(x, s, out):
    vstore(out, 1, vmul(vload(x, 0), vsplat(s)))


@njit(cache=True)
def _transpose(src, off, ld, dst, doff, dld):
    vtranspose_8x16(src, off, ld, dst, doff, dld)


def test_simd_helpers():
    x = np.arange(1, 17, dtype=np.float32)
    assert _hsum(x) == np.float32(136.0)
    out = np.zeros(18, np.float32)
    _scale(x, np.float32(0.5), out)
    np.testing.assert_array_equal(out, np.concatenate([[0.0], x * 0.5, [0.0]]).astype(np.float32))
    src = np.random.default_rng(0).standard_normal((11, 21)).astype(np.float32)
    for dld in (8, 32):
        dst = np.zeros(16 * dld, np.float32)
        _transpose(src.reshape(-1), 2 * 21 + 3, 21, dst, 0, dld)
        np.testing.assert_array_equal(dst.reshape(16, dld)[:, :8], src[2:10, 3:19].T)
        assert not dst.reshape(16, dld)[:, 8:].any()


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 70), k=st.integers(1, 900), panels=st.integers(1, 4), pad=st.integers(0, 20),
       ta=st.booleans(), seed=st.integers(0, 2**31))
def test_gemm32_panels_matches_reference(m, k, panels, pad, ta, seed):
    # A read in place with a row stride; B given as 32-column panels; C rows rounded up to 8,
    # depth across KC blocks
    rng = np.random.default_rng(seed)
    n, lda, ldc = 32 * panels, (m if ta else k) + pad, 32 * panels + pad
    a = rng.standard_normal((k, lda) if ta else (m, lda)).astype(np.float32)   # A or Aᵀ, row stride lda
    b = rng.standard_normal((k, n)).astype(np.float32)
    bp = np.ascontiguousarray(b.reshape(k, panels, 32).transpose(1, 0, 2)).reshape(-1)
    m8 = (m + 7) // 8 * 8
    c = np.full((m8, ldc), np.nan, dtype=np.float32)
    abuf = gemm_mod.aligned_f32(m8 * min(k, gemm_mod.KC))
    gemm_mod.gemm32_panels(a.reshape(-1), lda, ta, m, k, bp, n, c.reshape(-1), ldc, abuf)
    ref = gemm_ref((a[:, :m].T if ta else a[:, :k]).astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(c[:m, :n], ref, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    assert not c[m:, :n].any()                       # the rows past m are zero
    assert np.isnan(c[:, n:]).all()                  # nothing written past n


@settings(max_examples=25, deadline=None)
@given(rows8=st.integers(1, 9), k=st.integers(1, 900), panels=st.integers(1, 4), pad=st.integers(0, 20),
       seed=st.integers(0, 2**31))
def test_gemm32_packed_matches_reference(rows8, k, panels, pad, seed):
    # both operands packed by the caller: A as 8-row panels along k, B as 32-column panels;
    # depth across KC blocks, nothing written past n
    rng = np.random.default_rng(seed)
    m, n, ldc = 8 * rows8, 32 * panels, 32 * panels + pad
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    ap = np.ascontiguousarray(a.reshape(rows8, 8, k).transpose(0, 2, 1)).reshape(-1)
    bp = np.ascontiguousarray(b.reshape(k, panels, 32).transpose(1, 0, 2)).reshape(-1)
    c = np.full((m, ldc), np.nan, dtype=np.float32)
    gemm_mod.gemm32_packed(ap, m, k, bp, n, c.reshape(-1), ldc)
    ref = gemm_ref(a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(c[:, :n], ref, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    assert np.isnan(c[:, n:]).all()
