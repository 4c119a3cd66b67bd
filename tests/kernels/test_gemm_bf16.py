"""gemm_bf16 (native vdpbf16ps and emulated) against its NumPy twin: shapes around every tile and
block edge, transposes, strided views, accumulation, AlexNet shapes, rounding of special values.

Tolerance, from the arithmetic: both paths multiply the same bf16 values, whose products are
exact in float32, and differ from the float64 sum of the reference only by the float32 roundings
of the sum: each product goes through at most k + 1 additions rounded to 2^-24 relative (k within
the micro-kernel or the float32 GEMM, one per packed block added into C, one adding the old C),
plus the reference's final cast, so |err| <= (k + 2) * 2^-24 * (sum_p |a_ip b_pj| + |c_ij|).
vdpbf16ps also flushes to zero every partial sum or product below 2^-126: at most k + 2 such
losses, each under 2^-126, an absolute term that only shows for tiny values.
"""
import contextlib

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minialex.errors import MinialexError
from minialex.kernels import gemm_bf16 as mod
from minialex.kernels.gemm_bf16 import KC, MC, NC, bf16_operand_ref, bf16_path, gemm_bf16, gemm_bf16_ref
from minialex.kernels.simd_bf16 import has_avx512_bf16

U = 2.0 ** -24          # unit roundoff of float32
FLT_MIN = 2.0 ** -126   # below this vdpbf16ps flushes to zero
NO_BF16 = "this CPU has no avx512_bf16: the native kernel would fault"
PATHS = ["native", "emulated"]


@contextlib.contextmanager
def _path(name):
    """Run gemm_bf16 on the named path (skip native without the CPU flag)."""
    if name == "native" and not has_avx512_bf16():
        pytest.skip(NO_BF16)
    with pytest.MonkeyPatch.context() as mp:
        if name == "emulated":
            mp.setenv("MINIALEX_BF16", "emulate")
        else:
            mp.delenv("MINIALEX_BF16", raising=False)
        assert bf16_path() == name
        yield


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    old = numba.get_num_threads()
    numba.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    yield request.param
    numba.set_num_threads(old)


def _operand(rng, shape, layout):
    """A float32 array of `shape` in one of the memory layouts callers hand to gemm."""
    r, c = shape
    if layout == "C":
        return rng.standard_normal((r, c)).astype(np.float32)
    if layout == "F":  # x.T of a C-contiguous array
        return rng.standard_normal((c, r)).astype(np.float32).T
    if layout == "rows":  # row-strided view, unit inner stride
        return rng.standard_normal((r, c + 5)).astype(np.float32)[:, 2:2 + c]
    if layout == "none":  # no unit-stride axis at all
        return rng.standard_normal((2 * r, 2 * c)).astype(np.float32)[::2, ::2]
    raise ValueError(layout)


def _bound(a, b, trans_a, trans_b, c0, k):
    """(k + 2) * 2^-24 * (|bf16(A)| |bf16(B)| + |C0|) + (k + 2) * 2^-126, per entry."""
    ra, rb = np.abs(bf16_operand_ref(a)), np.abs(bf16_operand_ref(b))
    mag = (ra.T if trans_a else ra) @ (rb.T if trans_b else rb)
    if c0 is not None:
        mag = mag + np.abs(c0.astype(np.float64))
    return (k + 2) * U * mag + (k + 2) * FLT_MIN


def _run(path, a, b, trans_a, trans_b, accumulate, c0):
    out = c0.copy()
    with _path(path):
        got = gemm_bf16(a, b, out, trans_a=trans_a, trans_b=trans_b, accumulate=accumulate)
    assert got is out and out.dtype == np.float32
    return out


def _check(path, a, b, trans_a, trans_b, accumulate, rng):
    m = a.shape[1] if trans_a else a.shape[0]
    k = a.shape[0] if trans_a else a.shape[1]
    n = b.shape[0] if trans_b else b.shape[1]
    a0, b0 = a.copy(), b.copy()
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    out = _run(path, a, b, trans_a, trans_b, accumulate, c0)
    want = gemm_bf16_ref(a, b, c0.copy(), trans_a, trans_b, accumulate)
    bound = _bound(a, b, trans_a, trans_b, c0 if accumulate else None, k)
    err = np.abs(out.astype(np.float64) - want)
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
    return out, bound


dims = st.one_of(st.integers(0, 12), st.integers(13, 70),
                 st.sampled_from([0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65]))


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=120, deadline=None)
@given(m=dims, n=dims, k=dims, trans_a=st.booleans(), trans_b=st.booleans(), accumulate=st.booleans(),
       layout_a=st.sampled_from(["C", "F", "rows", "none"]),
       layout_b=st.sampled_from(["C", "F", "rows", "none"]), seed=st.integers(0, 2**31 - 1))
def test_small_shapes_match_reference(path, m, n, k, trans_a, trans_b, accumulate, layout_a, layout_b, seed):
    rng = np.random.default_rng(seed)
    a = _operand(rng, (k, m) if trans_a else (m, k), layout_a)
    b = _operand(rng, (n, k) if trans_b else (k, n), layout_b)
    _check(path, a, b, trans_a, trans_b, accumulate, rng)


# Shapes crossing the packed blocks (MC rows, KC depth, NC columns) with ragged tiles, odd k in
# the last block (a lone k in a pair), and the m x n splits of two threads.
BLOCK_SHAPES = [
    (MC + 8, NC + 36, KC + 6),
    (37, 2 * NC + 5, KC + 1),
    (2 * MC + 6, 45, 2 * KC - 1),
    (8, NC + 3, 2 * KC + 33),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,n,k", BLOCK_SHAPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_block_edges(threads, path, m, n, k, trans_a, trans_b):
    rng = np.random.default_rng(m * 7 + n)
    a = _operand(rng, (k, m) if trans_a else (m, k), "C")
    b = _operand(rng, (n, k) if trans_b else (k, n), "rows")
    _check(path, a, b, trans_a, trans_b, True, rng)


# (name, M, N, K, trans_a, trans_b) at batch 8, torchvision's AlexNet as benchmarks/_common.py lists
# it: convolutions as im2col GEMMs (forward, and conv4's backward forms), fc6 forward x · Wᵀ
ALEXNET = [
    ("conv3 forward", 384, 8 * 169, 192 * 9, False, False),
    ("conv4 forward", 256, 8 * 169, 384 * 9, False, False),
    ("conv5 forward", 256, 8 * 169, 256 * 9, False, False),
    ("conv4 backward-data", 384 * 9, 8 * 169, 256, True, False),
    ("conv4 backward-weight", 256, 384 * 9, 8 * 169, False, True),
    ("fc6 forward", 8, 4096, 9216, False, True),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,m,n,k,trans_a,trans_b", ALEXNET, ids=[s[0] for s in ALEXNET])
def test_alexnet_shapes(path, name, m, n, k, trans_a, trans_b):
    rng = np.random.default_rng(k)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    with _path(path):
        out = gemm_bf16(a, b, trans_a=trans_a, trans_b=trans_b)
    assert out.shape == (m, n) and out.dtype == np.float32
    err = np.abs(out - gemm_bf16_ref(a, b, None, trans_a, trans_b).astype(np.float64))
    assert np.all(err <= _bound(a, b, trans_a, trans_b, None, k))


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_native_and_emulated_agree(threads, trans_a, trans_b):
    if not has_avx512_bf16():
        pytest.skip(NO_BF16)
    rng = np.random.default_rng(11)
    m, n, k = 203, 171, 801
    a = _operand(rng, (k, m) if trans_a else (m, k), "C")
    b = _operand(rng, (n, k) if trans_b else (k, n), "F")
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    nat = _run("native", a, b, trans_a, trans_b, True, c0)
    emu = _run("emulated", a, b, trans_a, trans_b, True, c0)
    # each within the bound of the exact sum, so within twice it of each other
    assert np.all(np.abs(nat.astype(np.float64) - emu) <= 2 * _bound(a, b, trans_a, trans_b, c0, k))


# float32 bit pattern -> the bf16 pattern gemm_bf16 multiplies with (after reading it as
# vdpbf16ps does: a bf16 denormal counts as zero); None: any NaN.
SPECIALS = [
    (0x3F800000, 0x3F80),   # 1.0 exact
    (0x3F808000, 0x3F80),   # tie, rounds down to the even 0x3F80
    (0x3F818000, 0x3F82),   # tie, rounds up to the even 0x3F82
    (0xBF808000, 0xBF80),   # the same ties, negative
    (0xBF818000, 0xBF82),
    (0x3F808001, 0x3F81),   # just above half an ulp: up
    (0x3F807FFF, 0x3F80),   # just below: down
    (0x7F800000, 0x7F80),   # +inf stays inf
    (0xFF800000, 0xFF80),   # -inf
    (0x7F7FFFFF, 0x7F80),   # float32's largest rounds up to inf
    (0xFF7FFFFF, 0xFF80),
    (0x7F7F8000, 0x7F80),   # tie at the top: 0x7F7F is odd, so up to inf
    (0x7F7F7FFF, 0x7F7F),   # bf16's largest finite
    (0x7FC00000, None),     # quiet NaN
    (0x7F800001, None),     # NaN whose payload is all in the dropped half: still NaN, not inf
    (0xFF800001, None),
    (0x00010000, 0x0000),   # float32 denormal, bf16 denormal: read as zero
    (0x80400000, 0x8000),
    (0x007FFFFF, 0x0080),   # largest float32 denormal rounds up to bf16's smallest normal
    (0x00800000, 0x0080),   # 2^-126
    (0x00000000, 0x0000),
]


def _special_values():
    x = np.array([s for s, _ in SPECIALS], np.uint32).view(np.float32)
    want = np.array([np.nan if q is None else np.uint32(q << 16).view(np.float32) for _, q in SPECIALS],
                    np.float32)
    return x, want


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [1, 32, 33, 64])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("side", ["a", "b"])
def test_special_values_round_as_specified(path, k, trans_a, trans_b, side):
    # one special value per row of op(A) (or column of op(B)), everything else 0 there and the
    # other operand all ones: C holds the rounded value itself (k >= 32 packs with the vector code)
    x, want = _special_values()
    s = len(x)
    size = -(-s // 32) * 32          # whole 32-column panels (and 8-row panels)
    special = np.zeros((size, k), np.float32)
    special[np.arange(s), np.arange(s) % k] = x
    special[s:, 0] = 1.0
    ones = np.ones((k, 5), np.float32)
    if side == "a":
        a, b = special, ones
    else:
        a, b = ones.T, special.T     # op(B) = special.T: column j holds value j
    a = np.ascontiguousarray(a.T) if trans_a else a
    b = np.ascontiguousarray(b.T) if trans_b else b
    with _path(path):
        out = gemm_bf16(a, b, trans_a=trans_a, trans_b=trans_b)
    got = (out[:s, :] if side == "a" else out[:, :s].T)       # one row per special value
    ref = gemm_bf16_ref(a, b, None, trans_a, trans_b)
    ref = (ref[:s, :] if side == "a" else ref[:, :s].T)
    for g in (got, ref):   # values only: the sign of a zero sum is not specified
        assert np.array_equal(g, np.broadcast_to(want[:, None], g.shape), equal_nan=True)


@pytest.mark.parametrize("path", PATHS)
def test_tiny_products_and_inputs_flush_to_zero(path):
    # vdpbf16ps reads bf16 denormals as zero and flushes denormal results: 2^-130 * 2^100 is 0,
    # not 2^-30; 2^-70 * 2^-70 = 2^-140 is 0; 2^-63 * 2^-63 = 2^-126 is the smallest normal, kept
    a = np.array([[2.0 ** -130], [2.0 ** -70], [2.0 ** -63], [3.0]], np.float32)
    b = np.array([[2.0 ** 100, 2.0 ** -70, 2.0 ** -63]], np.float32)
    want = np.array([[0, 0, 0], [2.0 ** 30, 0, 2.0 ** -133], [2.0 ** 37, 2.0 ** -133, 2.0 ** -126],
                     [3 * 2.0 ** 100, 3 * 2.0 ** -70, 3 * 2.0 ** -63]])
    want[np.abs(want) < FLT_MIN] = 0
    with _path(path):
        out = gemm_bf16(a, b)
    np.testing.assert_array_equal(out, want.astype(np.float32))
    np.testing.assert_array_equal(gemm_bf16_ref(a, b), want.astype(np.float32))


@pytest.mark.parametrize("path", PATHS)
def test_nan_and_inf_propagate_through_sums(path):
    a = np.ones((8, 40), np.float32)
    a[1, 3] = np.nan
    a[2, 39] = np.inf
    a[3, 0], a[3, 1] = np.inf, -np.inf      # inf - inf
    b = np.ones((40, 32), np.float32)
    b[5, 7] = 0.0
    a[4, 5] = np.inf                        # inf * 0 in column 7 only
    with _path(path):
        out = gemm_bf16(a, b)
    ref = gemm_bf16_ref(a, b)
    np.testing.assert_array_equal(out, ref)
    assert np.isnan(out[1]).all() and np.isposinf(out[2]).all() and np.isnan(out[3]).all()
    assert np.isnan(out[4, 7]) and np.isposinf(np.delete(out[4], 7)).all()
    plain = np.full(32, 40.0, np.float32)
    plain[7] = 39.0                         # the zero in B
    assert (out[[0, 5, 6, 7]] == plain).all()


@pytest.mark.parametrize("path", PATHS)
def test_degenerate_sizes(path):
    with _path(path):
        out = np.full((3, 4), 2.0, np.float32)
        gemm_bf16(np.ones((3, 0), np.float32), np.ones((0, 4), np.float32), out, accumulate=True)
        np.testing.assert_array_equal(out, 2.0)
        gemm_bf16(np.ones((3, 0), np.float32), np.ones((0, 4), np.float32), out)
        np.testing.assert_array_equal(out, 0.0)
        assert gemm_bf16(np.ones((0, 5), np.float32), np.ones((5, 6), np.float32)).shape == (0, 6)
        assert gemm_bf16(np.ones((2, 5), np.float32), np.ones((5, 0), np.float32)).shape == (2, 0)
        one = gemm_bf16(np.array([[3.0]], np.float32), np.array([[1.00390625]], np.float32))  # 1 + 2^-8
        assert one.dtype == np.float32 and one[0, 0] == 3.0   # the tie rounded to 1.0, times 3
        r = gemm_bf16(np.ones((2, 3), np.float32), np.ones((3, 2), np.float32), accumulate=True)
        np.testing.assert_array_equal(r, 3.0)   # out None: a new array, accumulate ignored


@pytest.mark.parametrize("bad", ["float64", "mixed", "shape", "out_dtype", "out_strided", "ndim"])
def test_rejects_bad_arguments(bad):
    a = np.ones((4, 5), np.float32)
    b = np.ones((5, 6), np.float32)
    kwargs = {}
    if bad == "float64":
        a, b = a.astype(np.float64), b.astype(np.float64)
    elif bad == "mixed":
        b = b.astype(np.float64)
    elif bad == "shape":
        b = np.ones((6, 5), np.float32)
    elif bad == "out_dtype":
        kwargs["out"] = np.empty((4, 6), np.float64)
    elif bad == "out_strided":
        kwargs["out"] = np.empty((4, 12), np.float32)[:, ::2]
    elif bad == "ndim":
        a = np.ones(5, np.float32)
    with pytest.raises((TypeError, ValueError)):
        gemm_bf16(a, b, **kwargs)


def test_path_follows_cpu_flag_and_environment(monkeypatch):
    monkeypatch.delenv("MINIALEX_BF16", raising=False)
    assert bf16_path() == ("native" if has_avx512_bf16() else "emulated")
    monkeypatch.setenv("MINIALEX_BF16", "emulate")
    assert bf16_path() == "emulated"
    monkeypatch.setenv("MINIALEX_BF16", "fast")
    with pytest.raises(MinialexError, match="MINIALEX_BF16"):
        gemm_bf16(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))


def test_cpu_without_the_flag_never_runs_the_native_kernel(monkeypatch):
    monkeypatch.delenv("MINIALEX_BF16", raising=False)
    monkeypatch.setattr(mod, "_cpu_has_bf16", lambda: False)

    def fault(*args):
        raise AssertionError("native kernel called on a CPU without avx512_bf16")

    monkeypatch.setattr(mod, "_native", fault)
    assert bf16_path() == "emulated"
    a = np.random.default_rng(0).standard_normal((20, 30)).astype(np.float32)
    assert np.all(np.abs(gemm_bf16(a, a.T) - gemm_bf16_ref(a, a.T)) <= _bound(a, a.T, False, False, None, 30))
