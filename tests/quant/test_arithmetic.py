"""Each arithmetic rule of the int8 model checked on its own, against float64 or integer NumPy:
BatchNorm folding, per-channel weight scales, bias rounding and clipping, the input's zero-point
correction, the epilogue scales and the flatten permutation."""
import numpy as np
import pytest

from minialex import models
from minialex.kernels import quant
from minialex.models.quantized import (INPUT_ZERO_POINT, WEIGHT_MAX, bias_limit, fold_batchnorm,
                                       permute_flatten_columns, quantisation_points, quantize_alexnet,
                                       quantize_bias, quantize_weights, requant_scale, zero_point_correction)


def conv_nchw(x, w, b, stride=1, padding=0):
    """Plain float64 / int64 convolution (groups 1) by explicit windows: the reference."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    k = w.shape[2]
    oh, ow = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    out = np.zeros((n, w.shape[0], oh, ow), dtype=np.result_type(x, w))
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", win, w)
    return out + b[None, :, None, None]


def test_batchnorm_folding_is_exact_in_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 7))
    w, b = rng.standard_normal((5, 3, 3, 3)), rng.standard_normal(5)
    gamma, beta = rng.standard_normal(5), rng.standard_normal(5)
    mean, var, eps = rng.standard_normal(5), rng.uniform(0.1, 3, 5), 1e-5
    y = conv_nchw(x, w, b, padding=1)
    bn = ((y - mean[None, :, None, None]) / np.sqrt(var + eps)[None, :, None, None] * gamma[None, :, None, None]
          + beta[None, :, None, None])
    wf, bf = fold_batchnorm(w, b, gamma, beta, mean, var, eps)
    np.testing.assert_allclose(conv_nchw(x, wf, bf, padding=1), bn, rtol=1e-12, atol=1e-12)


def test_per_channel_weight_scales():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 2, 3, 3)) * np.array([1e-3, 1.0, 30.0, 0.0])[:, None, None, None]
    wq, s = quantize_weights(w)
    assert wq.dtype == np.int8 and s.dtype == np.float32
    peaks = np.abs(w).reshape(4, -1).max(axis=1)
    np.testing.assert_array_equal(s[:3], (peaks[:3] / 127).astype(np.float32))
    assert s[3] == 1.0 and not wq[3].any()                       # an all-zero row: scale 1
    assert (np.abs(wq[:3]).reshape(3, -1).max(axis=1) == WEIGHT_MAX).all()   # each row uses the range
    assert np.abs(wq.astype(int)).max() <= 127
    # round to nearest with the stored float32 scale: within half a step
    err = np.abs(wq * s.astype(np.float64)[:, None, None, None] - w)
    assert (err <= s.astype(np.float64)[:, None, None, None] / 2 * (1 + 1e-12)).all()
    np.testing.assert_array_equal(wq, np.clip(np.rint(w / s.astype(np.float64)[:, None, None, None]), -127, 127))


def test_bias_rounding_and_clipping():
    s_w = np.array([0.5, 0.25, 1e-9], np.float32)
    b = np.array([1.3, -0.3, 5.0])
    q = quantize_bias(b, 2.0, s_w, k=100)
    assert q.dtype == np.int32
    assert q[0] == 1 and q[1] == -1              # rint(1.3 / 1.0), rint(-0.3 / 0.5) = rint(-0.6)
    assert q[2] == bias_limit(100)               # 5 / 2e-9 clipped so no int32 sum can overflow
    assert bias_limit(100) + 100 * 255 * 127 == 2 ** 31 - 1


def test_zero_point_correction_makes_the_shifted_input_sum_like_the_signed_one():
    """conv1 sees q = rint(x / s0) + 128 and pads with 128; with -128 * sum(wq) in its bias, the
    int32 sums equal those of the signed integers q - 128 zero-padded: checked exactly through
    the kernel interface (float32 output at scale 1 shows acc + bias, all below 2**24)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    wq = rng.integers(-127, 128, (4, 3, 5, 5)).astype(np.int8)
    bias = rng.integers(-1000, 1000, 4).astype(np.int32)
    q = quant.quantize(x, np.float32(1 / 0.02), INPUT_ZERO_POINT)           # (N, H, W, C)
    corrected = (bias + zero_point_correction(wq)).astype(np.int32)
    out = quant.conv2d_int8(q, quant.pack_conv_weights(wq, 1), corrected, np.ones(4, np.float32), 5, 2, 2,
                            INPUT_ZERO_POINT, np.float32)
    signed = q.transpose(0, 3, 1, 2).astype(np.int64) - INPUT_ZERO_POINT
    ref = conv_nchw(signed, wq.astype(np.int64), bias.astype(np.int64), stride=2, padding=2)
    np.testing.assert_array_equal(out.transpose(0, 3, 1, 2), ref.astype(np.float32))
    assert not np.array_equal(zero_point_correction(wq), np.zeros(4))


def test_model_uses_each_rule():
    """The built model's first convolution carries the zero-point correction in its bias, every
    epilogue scale is float32(s_x * s_w / s_y), and the logits' is float32(s_x * s_w)."""
    arch = models.Arch("cifar", 10)
    float_model = models.build(arch).eval()
    points = quantisation_points(arch)
    scales = {k: 0.01 * (i + 1) for i, k in enumerate(points)}
    m = quantize_alexnet(float_model, arch, 0.03, scales)
    steps = [s for s in m._steps if s[0] in ("conv", "linear")]
    first = m.params.layers["features.0"]
    np.testing.assert_array_equal(steps[0][2], first.bias + zero_point_correction(first.weight))
    assert steps[0][-1] == INPUT_ZERO_POINT and all(s[-1] == 0 for s in steps[1:] if s[0] == "conv")
    np.testing.assert_array_equal(steps[0][3], requant_scale(0.03, first.weight_scale, scales["features.0"]))
    np.testing.assert_array_equal(
        steps[0][3], (0.03 * first.weight_scale.astype(np.float64) / scales["features.0"]).astype(np.float32))
    last = m.params.layers["classifier.6"]
    assert steps[-1][4] is np.float32
    np.testing.assert_array_equal(steps[-1][3], (scales["classifier.4"] * last.weight_scale.astype(np.float64))
                                  .astype(np.float32))
    # the layer after an LRN takes the LRN's scale as its input scale
    conv2 = m.params.layers["features.4"]
    w2 = float_model.features[4].weight.data
    wq2, s_w2 = quantize_weights(w2)
    np.testing.assert_array_equal(conv2.bias, quantize_bias(float_model.features[4].bias.data,
                                                            scales["features.2"], s_w2, wq2[0].size))


def test_flatten_permutation_matches_the_nchw_flatten():
    """Channels-last activations flattened against the permuted weight == torch's NCHW flatten
    against the stored weight, exactly in integers."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (3, 8, 2, 2)).astype(np.int64)            # (N, C, H, W)
    w = rng.integers(-127, 128, (5, 8 * 2 * 2)).astype(np.int64)
    torch_order = a.reshape(3, -1) @ w.T
    channels_last = a.transpose(0, 2, 3, 1).reshape(3, -1) @ permute_flatten_columns(w, 8, 2, 2).T
    np.testing.assert_array_equal(channels_last, torch_order)
    assert not np.array_equal(a.transpose(0, 2, 3, 1).reshape(3, -1) @ w.T, torch_order)


def test_model_forward_refuses_other_input_sizes_and_training():
    arch = models.Arch("cifar", 10)
    m = quantize_alexnet(models.build(arch).eval(), arch, 0.03, {k: 0.05 for k in quantisation_points(arch)})
    with pytest.raises(ValueError, match=r"takes \(N, 3, 32, 32\)"):
        m(np.zeros((1, 3, 36, 36), np.float32))
    with pytest.raises(ValueError, match="inference only"):
        m.train()
    assert m(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, 10)
    assert m.eval() is m and m.num_classes == 10
