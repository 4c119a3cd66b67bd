"""The int8 model's data movement on uint8 channels-last (N, H, W, C) tensors: quantising the
float input, the convolution as im2col + the int8 GEMM, max-pooling on the bytes, and the way back
to float32 (for LRN and the logits' neighbours).

A quantised tensor is (q, scale, zero_point) standing for scale * (q - zero_point). Activations
after a ReLU have zero_point 0 (so a uint8 clamp at 0 is the ReLU); the normalised input image,
which has negative values, has zero_point 128, and its convolution pads with 128 (the image's 0.0).
Max-pooling commutes with that monotone map, so it runs on the bytes unchanged.

Channels-last because im2col then copies runs of contiguous channels, and one GEMM orientation
(rows = output pixels, columns = output channels) serves convolutions and linear layers alike.
"""
import numpy as np

from .conv.layout import geometry
from .gemm_int8 import gemm_u8s8_ref, pack_weights, padded_k, gemm_u8s8


def quantize_ref(x, inv_scale, zero_point):
    """(N, C, H, W) float32 -> (N, H, W, C) uint8: clamp(rint(x * inv_scale) + zero_point, 0, 255),
    the product in float32; NaN maps to zero_point."""
    v = np.rint(x.astype(np.float32) * np.float32(inv_scale))
    v = np.where(np.isnan(v), 0.0, v) + zero_point
    return np.clip(v, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def dequantize_ref(q, scale, zero_point=0):
    """(N, H, W, C) uint8 -> (N, C, H, W) float32: float32(q - zero_point) * scale."""
    v = (q.astype(np.int32) - zero_point).astype(np.float32) * np.float32(scale)
    return v.transpose(0, 3, 1, 2).copy()


def im2col_u8_ref(x, kh, kw, stride, padding, pad_value, c0, c1):
    """(N, H, W, C) uint8 -> (N*OH*OW, padded_k(kh*kw*(c1-c0))) uint8: row (n, oh, ow) holds the
    window of channels c0:c1 in (i, j, c) order, pad_value outside the image, zeros in the pad
    columns."""
    n, h, w, c = x.shape
    g = geometry((n, c, h, w), (1, c1 - c0, kh, kw), stride, padding, 1)
    xp = np.full((n, h + 2 * g.ph, w + 2 * g.pw, c1 - c0), pad_value, dtype=np.uint8)
    xp[:, g.ph:g.ph + h, g.pw:g.pw + w] = x[..., c0:c1]
    k = kh * kw * (c1 - c0)
    cols = np.zeros((n, g.oh, g.ow, padded_k(k)), dtype=np.uint8)
    for i in range(kh):
        for j in range(kw):
            win = xp[:, i:i + g.sh * (g.oh - 1) + 1:g.sh, j:j + g.sw * (g.ow - 1) + 1:g.sw]
            at = (i * kw + j) * (c1 - c0)
            cols[..., at:at + c1 - c0] = win
    return cols.reshape(n * g.oh * g.ow, padded_k(k))


def conv_weights_ref(wq, groups):
    """(Cout, Cin/g, kh, kw) int8 -> per group the (Cout/g, kh*kw*Cin/g) matrix in im2col's
    (i, j, c) order."""
    cout = wq.shape[0]
    cg = cout // groups
    return [wq[g * cg:(g + 1) * cg].transpose(0, 2, 3, 1).reshape(cg, -1) for g in range(groups)]


def conv2d_int8_ref(x, wq, bias, scale, stride, padding, groups, pad_value, out_dtype):
    """NumPy twin of the int8 convolution: x (N, H, W, Cin) uint8, wq (Cout, Cin/g, kh, kw) int8,
    bias (Cout,) int32, scale (Cout,) float32 -> (N, OH, OW, Cout) of out_dtype (see gemm_int8)."""
    n, h, w, cin = x.shape
    cout, cin_g, kh, kw = wq.shape
    g = geometry((n, cin, h, w), wq.shape, stride, padding, groups)
    out = np.empty((n * g.oh * g.ow, cout), dtype=out_dtype)
    cg = cout // groups
    for gi, wm in enumerate(conv_weights_ref(wq, groups)):
        cols = im2col_u8_ref(x, kh, kw, stride, padding, pad_value, gi * cin_g, (gi + 1) * cin_g)
        sl = slice(gi * cg, (gi + 1) * cg)
        out[:, sl] = gemm_u8s8_ref(cols[:, :wm.shape[1]], wm, bias[sl], scale[sl], out_dtype)
    return out.reshape(n, g.oh, g.ow, cout)


def maxpool_u8_ref(x, k, stride):
    """(N, H, W, C) uint8 -> (N, OH, OW, C): max over k x k windows, no padding, floor."""
    n, h, w, c = x.shape
    oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
    out = np.zeros((n, oh, ow, c), dtype=np.uint8)
    for i in range(k):
        for j in range(k):
            np.maximum(out, x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride],
                       out=out)
    return out


# ---- the kernels' interface; placeholders on the NumPy twins until the Numba kernels land ----

def quantize(x, inv_scale, zero_point):
    """quantize_ref's contract, fast."""
    return quantize_ref(x, inv_scale, zero_point)


def dequantize(q, scale, zero_point=0):
    """dequantize_ref's contract, fast."""
    return dequantize_ref(q, scale, zero_point)


def maxpool_u8(x, k, stride):
    """maxpool_u8_ref's contract, fast."""
    return maxpool_u8_ref(x, k, stride)


def pack_conv_weights(wq, groups):
    """(Cout, Cin/g, kh, kw) int8 -> one PackedWeights per group, in im2col's order, once per model."""
    return tuple(pack_weights(np.ascontiguousarray(m)) for m in conv_weights_ref(wq, groups))


def conv2d_int8(x, packed, bias, scale, kernel_size, stride, padding, pad_value, out_dtype):
    """conv2d_int8_ref's contract on weights packed by pack_conv_weights: x (N, H, W, Cin) uint8
    -> (N, OH, OW, Cout) uint8 (requantised, ReLU) or float32 (dequantised)."""
    n, h, w, cin = x.shape
    groups = len(packed)
    cg = packed[0].n
    cin_g = cin // groups
    kh = kw = kernel_size
    g = geometry((n, cin, h, w), (cg * groups, cin_g, kh, kw), stride, padding, groups)
    out = np.empty((n * g.oh * g.ow, cg * groups), dtype=out_dtype)
    for gi, p in enumerate(packed):
        cols = im2col_u8_ref(x, kh, kw, stride, padding, pad_value, gi * cin_g, (gi + 1) * cin_g)
        sl = slice(gi * cg, (gi + 1) * cg)
        gemm_u8s8(cols, p, bias[sl], scale[sl], out[:, sl])
    return out.reshape(n, g.oh, g.ow, cg * groups)
