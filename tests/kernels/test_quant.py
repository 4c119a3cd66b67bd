"""The int8 model's data movement (kernels.quant): every fast kernel bit-exact against its NumPy
twin at drawn shapes and at every AlexNet layer shape, and the twins themselves against an
independent float64 computation on dequantised values."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from minialex.kernels import quant as Q
from minialex.kernels.gemm_int8 import padded_k
from minialex.kernels.simd_int8 import has_avx512_vnni
from minialex.models.alexnet import SPECS

FAST = settings(max_examples=30, deadline=None)


def _same_bits(a, b):
    """Equal dtype, shape and bytes (float32 compared bit for bit)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _float_input(rng, shape, inv_scale):
    """Normal values around the quantiser's range, with NaN, infinities, signed zeros and
    exact rounding ties (k + 0.5) / inv_scale sprinkled in."""
    x = (rng.standard_normal(shape) * 150.0 / inv_scale).astype(np.float32)
    flat = x.reshape(-1)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30], dtype=np.float32)
    pick = rng.random(flat.size)
    flat[pick < 0.05] = rng.choice(specials, int((pick < 0.05).sum()))
    ties = (pick >= 0.05) & (pick < 0.3)
    flat[ties] = ((rng.integers(-300, 300, int(ties.sum())) + 0.5) / np.float32(inv_scale)).astype(np.float32)
    return x


def _conv_case(rng, n, cin, cout, k, h, w, groups):
    """Random uint8 input, int8 weights in -127..127, int32 bias and per-channel scales that
    spread the requantised outputs over 0..255 with some saturating at both ends."""
    x = rng.integers(0, 256, (n, h, w, cin), dtype=np.uint8)
    wq = rng.integers(-127, 128, (cout, cin // groups, k, k), dtype=np.int8)
    kk = k * k * cin // groups
    bias = rng.integers(-40 * kk, 40 * kk + 1, cout).astype(np.int32)
    scale = (rng.uniform(0.3, 3.0, cout) * 100.0 / (math.sqrt(kk) * 127 * 150)).astype(np.float32)
    return x, wq, bias, scale


# ---- drawn shapes, fast against twin ----

@FAST
@given(st.integers(1, 3), st.one_of(st.just(3), st.integers(1, 70)), st.integers(1, 9),
       st.integers(1, 9), st.floats(1e-3, 1e3), st.integers(0, 255), st.integers(0, 2 ** 32 - 1))
def test_quantize_matches_twin(n, c, h, w, inv_scale, zero_point, seed):
    x = _float_input(np.random.default_rng(seed), (n, c, h, w), inv_scale)
    _same_bits(Q.quantize(x, inv_scale, zero_point), Q.quantize_ref(x, inv_scale, zero_point))


@FAST
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 70),
       st.floats(1e-6, 1e3), st.integers(0, 255), st.integers(0, 2 ** 32 - 1))
def test_dequantize_matches_twin(n, h, w, c, scale, zero_point, seed):
    q = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    _same_bits(Q.dequantize(q, scale, zero_point), Q.dequantize_ref(q, scale, zero_point))


@FAST
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12), st.integers(1, 70),
       st.integers(1, 4), st.integers(1, 4), st.integers(0, 2 ** 32 - 1))
def test_maxpool_u8_matches_twin(n, h, w, c, k, stride, seed):
    assume(k <= h and k <= w)
    x = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    _same_bits(Q.maxpool_u8(x, k, stride), Q.maxpool_u8_ref(x, k, stride))


@FAST
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 20),
       st.integers(1, 5), st.integers(1, 5), st.tuples(st.integers(1, 4), st.integers(1, 4)),
       st.tuples(st.integers(0, 3), st.integers(0, 3)), st.integers(0, 255), st.data())
def test_im2col_u8_matches_twin(n, h, w, c, kh, kw, stride, padding, pad_value, data):
    assume(h + 2 * padding[0] >= kh and w + 2 * padding[1] >= kw)
    c0 = data.draw(st.integers(0, c - 1))
    c1 = data.draw(st.integers(c0 + 1, c))
    x = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1))).integers(
        0, 256, (n, h, w, c), dtype=np.uint8)
    cols = Q.im2col_u8(x, kh, kw, stride, padding, pad_value, c0, c1)
    assert cols.shape[1] == padded_k(kh * kw * (c1 - c0))
    _same_bits(cols, Q.im2col_u8_ref(x, kh, kw, stride, padding, pad_value, c0, c1))


@FAST
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9),
       st.integers(1, 9), st.integers(1, 5), st.integers(1, 3), st.integers(0, 2),
       st.integers(0, 255), st.sampled_from([np.uint8, np.float32]),
       st.sampled_from([64, 300, 1 << 20]), st.integers(0, 2 ** 32 - 1))
def test_conv2d_int8_matches_twin(n, groups, cin_g, cout_g, hw, k, stride, pad, pad_value,
                                  out_dtype, block_bytes, seed):
    # block_bytes 64 and 300 cut the batch into blocks of a few rows that straddle images
    assume(hw + 2 * pad >= k)
    x, wq, bias, scale = _conv_case(np.random.default_rng(seed), n, cin_g * groups,
                                    cout_g * groups, k, hw, hw, groups)
    before = Q.BLOCK_BYTES
    Q.BLOCK_BYTES = block_bytes
    try:
        y = Q.conv2d_int8(x, Q.pack_conv_weights(wq, groups), bias, scale, k, stride, pad,
                          pad_value, out_dtype)
    finally:
        Q.BLOCK_BYTES = before
    _same_bits(y, Q.conv2d_int8_ref(x, wq, bias, scale, stride, pad, groups, pad_value, out_dtype))


# the int8 GEMM's two paths, chosen through the environment variable
PATHS = [pytest.param("", marks=pytest.mark.skipif(not has_avx512_vnni(), reason="no avx512_vnni")),
         "emulate"]


@pytest.mark.parametrize("path", PATHS)
@FAST
@given(st.integers(1, 3), st.one_of(st.just(3), st.integers(1, 9)), st.integers(1, 40),
       st.integers(1, 12), st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.integers(0, 3),
       st.integers(0, 255), st.sampled_from([np.uint8, np.float32]), st.integers(0, 2 ** 32 - 1))
def test_implicit_conv2d_int8_matches_twin(path, n, cin, cout, h, w, k, stride, pad, pad_value,
                                           out_dtype, seed):
    # window rows read in place from the padded copy: any Cin (3 pads each row to 4-byte groups),
    # rows of 8 output pixels that straddle output rows and images, 32-channel panel edges
    assume(h + 2 * pad >= k and w + 2 * pad >= k)
    x, wq, bias, scale = _conv_case(np.random.default_rng(seed), n, cin, cout, k, h, w, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIALEX_INT8", path)
        y = Q.conv2d_int8(x, Q.pack_conv_weights_implicit(wq), bias, scale, k, stride, pad,
                          pad_value, out_dtype)
    _same_bits(y, Q.conv2d_int8_ref(x, wq, bias, scale, stride, pad, 1, pad_value, out_dtype))


@pytest.mark.parametrize("path", PATHS)
def test_prepared_conv_reuses_its_buffers_for_new_inputs_of_its_shape(path):
    """prepare_conv2d_int8 (an int8 model's per-batch-size plan): every call on new data gives the
    twin's result, and an input of another shape is refused."""
    rng = np.random.default_rng(7)
    x, wq, bias, scale = _conv_case(rng, 2, 5, 40, 3, 9, 8, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIALEX_INT8", path)
        run = Q.prepare_conv2d_int8(x.shape, Q.pack_conv_weights_implicit(wq), bias, scale, 2, 1, 7, np.uint8)
        for _ in range(3):
            x = rng.integers(0, 256, x.shape, dtype=np.uint8)
            _same_bits(run(x).copy(), Q.conv2d_int8_ref(x, wq, bias, scale, 2, 1, 1, 7, np.uint8))
        with pytest.raises(ValueError, match="prepared for inputs"):
            run(x[:1])


def test_implicit_weights_pad_each_kernel_row_to_four_byte_groups():
    wq = np.arange(1, 2 * 3 * 2 * 3 + 1, dtype=np.int8).reshape(2, 3, 2, 3)    # Cout 2, Cin 3, 2x3
    w = Q.pack_conv_weights_implicit(wq)
    assert (w.kh, w.kw, w.cin, w.run, w.packed.n, w.packed.k) == (2, 3, 3, 12, 2, 24)
    rows = np.zeros((2, 2, 12), np.int8)
    rows[:, :, :9] = wq.transpose(0, 2, 3, 1).reshape(2, 2, 9)       # 9 weights, 3 zeros per row
    from minialex.kernels.gemm_int8 import pack_weights
    np.testing.assert_array_equal(w.packed.data, pack_weights(rows.reshape(2, 24)).data)


def test_one_pixel_images_and_odd_channel_counts():
    rng = np.random.default_rng(1)
    x, wq, bias, scale = _conv_case(rng, 2, 6, 10, 1, 1, 1, 2)
    y = Q.conv2d_int8(x, Q.pack_conv_weights(wq, 2), bias, scale, 1, 1, 0, 0, np.uint8)
    _same_bits(y, Q.conv2d_int8_ref(x, wq, bias, scale, 1, 0, 2, 0, np.uint8))
    x, wq, bias, scale = _conv_case(rng, 1, 5, 7, 3, 1, 1, 1)      # 3x3 kernel, 1x1 image, pad 1
    y = Q.conv2d_int8(x, Q.pack_conv_weights(wq, 1), bias, scale, 3, 1, 1, 128, np.float32)
    _same_bits(y, Q.conv2d_int8_ref(x, wq, bias, scale, 1, 1, 1, 128, np.float32))
    q = rng.integers(0, 256, (1, 1, 1, 67), dtype=np.uint8)
    _same_bits(Q.maxpool_u8(q, 1, 1), q)
    _same_bits(Q.dequantize(q, 0.5, 7), Q.dequantize_ref(q, 0.5, 7))


# ---- AlexNet's layers at batch 1 ----

def _layers(variant, size):
    """(conv layers as (cin, cout, k, stride, pad, groups, input size), pools as (channels,
    input size)) of a variant, walked from SPECS."""
    convs, pools, c = [], [], 3
    for item in SPECS[variant]:
        if item[0] == "conv":
            _, cin, cout, k, s, p, g = item
            convs.append((cin, cout, k, s, p, g, size))
            size, c = (size + 2 * p - k) // s + 1, cout
        elif item[0] == "pool":
            pools.append((c, size))
            size = (size - 3) // 2 + 1
    return convs, pools


ALEXNET = [("torchvision", 224), ("paper", 227), ("cifar", 32)]
CONVS = [(v,) + layer for v, size in ALEXNET for layer in _layers(v, size)[0]]
POOLS = [(v,) + layer for v, size in ALEXNET for layer in _layers(v, size)[1]]


def test_layer_walk_sees_the_shapes_the_task_names():
    assert CONVS[0] == ("torchvision", 3, 64, 11, 4, 2, 1, 224)
    assert ("paper", 96, 256, 5, 1, 2, 2, 27) in CONVS and ("paper", 384, 384, 3, 1, 1, 2, 13) in CONVS
    assert [p[2] for p in POOLS if p[0] == "torchvision"] == [55, 27, 13]


@pytest.mark.parametrize("variant,cin,cout,k,stride,pad,groups,size", CONVS)
def test_alexnet_conv_layer_matches_twin(variant, cin, cout, k, stride, pad, groups, size):
    rng = np.random.default_rng(cin * 1000 + cout)
    x, wq, bias, scale = _conv_case(rng, 1, cin, cout, k, size, size, groups)
    pad_value = 128 if cin == 3 else 0          # the input image's zero point, else after a ReLU
    packed = Q.pack_conv_weights(wq, groups)
    for out_dtype in (np.uint8, np.float32) if cin == 3 else (np.uint8,):
        y = Q.conv2d_int8(x, packed, bias, scale, k, stride, pad, pad_value, out_dtype)
        _same_bits(y, Q.conv2d_int8_ref(x, wq, bias, scale, stride, pad, groups, pad_value, out_dtype))
        if out_dtype == np.uint8:      # the scales spread the outputs: not all clamped
            assert 0 < np.mean(y == 0) < 0.9 and np.mean(y == 255) < 0.5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant,cin,cout,k,stride,pad,groups,size",
                         [c for c in CONVS if c[6] == 1])
def test_alexnet_conv_layer_read_in_place_matches_twin(path, variant, cin, cout, k, stride, pad,
                                                       groups, size, monkeypatch):
    monkeypatch.setenv("MINIALEX_INT8", path)
    rng = np.random.default_rng(cin * 1000 + cout + 1)
    x, wq, bias, scale = _conv_case(rng, 2 if size < 100 else 1, cin, cout, k, size, size, 1)
    pad_value = 128 if cin == 3 else 0
    y = Q.conv2d_int8(x, Q.pack_conv_weights_implicit(wq), bias, scale, k, stride, pad, pad_value,
                      np.uint8)
    _same_bits(y, Q.conv2d_int8_ref(x, wq, bias, scale, stride, pad, 1, pad_value, np.uint8))
    assert 0 < np.mean(y == 0) < 0.9 and np.mean(y == 255) < 0.5


@pytest.mark.parametrize("variant,channels,size", POOLS)
def test_alexnet_pool_matches_twin(variant, channels, size):
    x = np.random.default_rng(size).integers(0, 256, (1, size, size, channels), dtype=np.uint8)
    _same_bits(Q.maxpool_u8(x, 3, 2), Q.maxpool_u8_ref(x, 3, 2))


@pytest.mark.parametrize("size", [224, 227, 32])
def test_alexnet_input_quantize_and_logits_dequantize(size):
    rng = np.random.default_rng(size)
    x = _float_input(rng, (1, 3, size, size), 40.0)
    _same_bits(Q.quantize(x, 40.0, 128), Q.quantize_ref(x, 40.0, 128))
    q = rng.integers(0, 256, (1, 6, 6, 256), dtype=np.uint8)
    _same_bits(Q.dequantize(q, 0.02), Q.dequantize_ref(q, 0.02))


# ---- the twins against independent float64 arithmetic ----

def _conv_float64(xr, wr, pad_real, stride, pad, groups):
    """Direct float64 convolution (einsum over windows) of NHWC xr with (Cout, Cin/g, k, k) wr,
    padded with the real value pad_real."""
    n, h, w, cin = xr.shape
    cout, cin_g, k, _ = wr.shape
    xp = np.full((n, h + 2 * pad, w + 2 * pad, cin), pad_real)
    xp[:, pad:pad + h, pad:pad + w] = xr
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    cg = cout // groups
    return np.concatenate([np.einsum("nhwcij,ocij->nhwo", win[:, :, :, g * cin_g:(g + 1) * cin_g],
                                     wr[g * cg:(g + 1) * cg]) for g in range(groups)], axis=3)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 6), st.integers(1, 6),
       st.integers(1, 9), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2),
       st.sampled_from([0, 128]), st.integers(0, 2 ** 32 - 1))
def test_conv_twin_agrees_with_a_float64_convolution(n, groups, cin_g, cout_g, hw, k, stride,
                                                     pad, zero_point, seed):
    assume(hw + 2 * pad >= k)
    rng = np.random.default_rng(seed)
    x, wq, bias, _ = _conv_case(rng, n, cin_g * groups, cout_g * groups, k, hw, hw, groups)
    s_x = 0.05
    s_w = rng.uniform(1e-3, 1e-2, cout_g * groups)
    s_out = 0.1
    real = _conv_float64(s_x * (x - float(zero_point)), wq * s_w[:, None, None, None], 0.0,
                         stride, pad, groups) + bias * s_x * s_w
    # the kernels multiply the bytes as they are: the zero point's share, z * sum(w[o]), is
    # folded into the bias (exact at the border too, since the padding is z)
    bias = (bias - zero_point * wq.astype(np.int64).sum(axis=(1, 2, 3))).astype(np.int32)
    # float32 out: scale = s_x * s_w, the layer's real output up to float32 rounding
    y = Q.conv2d_int8_ref(x, wq, bias, (s_x * s_w).astype(np.float32), stride, pad, groups,
                          zero_point, np.float32)
    np.testing.assert_allclose(y, real, rtol=1e-6, atol=1e-6 * np.abs(real).max())
    # uint8 out: requantised to s_out with the ReLU; a tie may round either way
    # (float32 vs float64), so at most one step apart and equal away from ties
    q = Q.conv2d_int8_ref(x, wq, bias, (s_x * s_w / s_out).astype(np.float32), stride, pad, groups,
                          zero_point, np.uint8)
    want = np.clip(np.rint(real / s_out), 0, 255)
    near_tie = np.abs(np.abs(real / s_out - np.floor(real / s_out)) - 0.5) < 1e-4
    assert np.all(np.abs(q - want) <= 1)
    np.testing.assert_array_equal(q[~near_tie], want[~near_tie])


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 2), st.integers(1, 10), st.integers(1, 10), st.integers(1, 20),
       st.integers(1, 4), st.integers(1, 3), st.integers(0, 255), st.integers(0, 2 ** 32 - 1))
def test_pool_and_dequantize_twins_agree_with_float64(n, h, w, c, k, stride, zero_point, seed):
    assume(k <= h and k <= w)
    q = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    real = 0.25 * (q.astype(np.float64) - zero_point)
    win = np.lib.stride_tricks.sliding_window_view(real, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    pooled = Q.dequantize_ref(Q.maxpool_u8_ref(q, k, stride), 0.25, zero_point)
    np.testing.assert_array_equal(pooled, win.max(axis=(4, 5)).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(Q.dequantize_ref(q, 0.25, zero_point), real.transpose(0, 3, 1, 2))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 40), st.floats(1e-2, 1e2), st.integers(0, 255), st.integers(0, 2 ** 32 - 1))
def test_quantize_twin_agrees_with_python_rounding(count, inv_scale, zero_point, seed):
    x = _float_input(np.random.default_rng(seed), (1, count, 2, 1), inv_scale)
    want = []
    for v in x.transpose(0, 2, 3, 1).reshape(-1):
        t = float(np.float32(v) * np.float32(inv_scale))    # the float32 product
        if math.isnan(t):
            want.append(zero_point)
        elif math.isinf(t):
            want.append(255 if t > 0 else 0)
        else:
            want.append(min(max(round(t) + zero_point, 0), 255))  # round(): half to even
    np.testing.assert_array_equal(Q.quantize_ref(x, inv_scale, zero_point).reshape(-1), want)


# ---- arguments ----

def test_bad_arguments_are_refused_with_a_clear_message():
    x = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        Q.maxpool_u8(x.astype(np.int8), 2, 2)
    with pytest.raises(TypeError, match="4-D"):
        Q.dequantize(x[0], 1.0)
    with pytest.raises(TypeError, match="float32"):
        Q.quantize(np.zeros((1, 3, 4, 4)), 1.0, 0)
    with pytest.raises(ValueError, match="zero_point"):
        Q.quantize(np.zeros((1, 3, 4, 4), np.float32), 1.0, 256)
    with pytest.raises(ValueError, match="inv_scale"):
        Q.quantize(np.zeros((1, 3, 4, 4), np.float32), float("nan"), 0)
    with pytest.raises(ValueError, match="too small"):
        Q.maxpool_u8(x, 5, 1)
    with pytest.raises(ValueError, match="channels"):
        Q.im2col_u8(x, 3, 3, 1, 1, 0, 2, 5)
    wq = np.ones((4, 3, 3, 3), np.int8)
    packed = Q.pack_conv_weights(wq, 1)
    b, s = np.zeros(4, np.int32), np.ones(4, np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        Q.conv2d_int8(x, packed, b, s, 5, 1, 2, 0, np.uint8)
    with pytest.raises(ValueError, match="do not fit"):
        Q.conv2d_int8(np.zeros((1, 4, 4, 6), np.uint8), packed, b, s, 3, 1, 1, 0, np.uint8)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        Q.conv2d_int8(x, packed, b[:3], s, 3, 1, 1, 0, np.uint8)
    with pytest.raises(TypeError, match="int32"):
        Q.conv2d_int8(x, packed, b.astype(np.int64), s, 3, 1, 1, 0, np.uint8)
    with pytest.raises(ValueError, match="out_dtype"):
        Q.conv2d_int8(x, packed, b, s, 3, 1, 1, 0, np.int32)
    with pytest.raises(ValueError, match="pad_value"):
        Q.conv2d_int8(x, packed, b, s, 3, 1, 1, -1, np.uint8)
    with pytest.raises(TypeError, match="pack_conv_weights"):
        Q.conv2d_int8(x, wq, b, s, 3, 1, 1, 0, np.uint8)
    implicit = Q.pack_conv_weights_implicit(wq)
    with pytest.raises(ValueError, match="do not fit"):
        Q.conv2d_int8(x, implicit, b, s, 5, 1, 2, 0, np.uint8)
    with pytest.raises(ValueError, match="do not fit"):
        Q.conv2d_int8(np.zeros((1, 4, 4, 6), np.uint8), implicit, b, s, 3, 1, 1, 0, np.uint8)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        Q.conv2d_int8(x, implicit, b, s[:3], 3, 1, 1, 0, np.uint8)
    with pytest.raises(ValueError, match="larger than padded input"):
        Q.conv2d_int8(np.zeros((1, 2, 2, 3), np.uint8), implicit, b, s, 3, 1, 0, 0, np.uint8)
    with pytest.raises(ValueError, match="larger than padded input"):
        Q.conv2d_int8(np.zeros((1, 2, 2, 3), np.uint8), packed, b, s, 3, 1, 0, 0, np.uint8)


def test_non_contiguous_input_is_read_as_its_values():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (2, 9, 9, 8), dtype=np.uint8)[:, ::2, :, 1:6]
    _same_bits(Q.maxpool_u8(x, 2, 2), Q.maxpool_u8_ref(x, 2, 2))
    f = rng.standard_normal((3, 2, 5, 5)).astype(np.float32).transpose(1, 0, 3, 2)
    _same_bits(Q.quantize(f, 10.0, 128), Q.quantize_ref(f, 10.0, 128))
