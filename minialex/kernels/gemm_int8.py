"""int8 GEMM for quantised inference: uint8 activations times int8 weights, int32 sums, and the
requantising epilogue fused into the store.

    acc[m, n] = sum_k a[m, k] * w[n, k]                     (int32; |acc + bias| < 2**31 is the
                                                              quantiser's job, see kernels.quant)
    t[m, n]   = float32(acc[m, n] + bias[n]) * scale[n]     (float32 convert and multiply, RNE)
    out       = t                                           if out is float32 (dequantised logits)
              = min(max(rint(t), 0), 255)                   if out is uint8 (requantised; the clamp
                                                              at 0 is the fused ReLU)
Weights are packed once (`pack_weights`); the K dimension is padded to a multiple of 4 (`padded_k`),
the group of bytes one 32-bit lane of `vpdpbusd` multiplies, and `a` carries those pad columns.
"""
from typing import NamedTuple

import numpy as np


def padded_k(k):
    """K rounded up to the 4-byte groups the kernel multiplies."""
    return (int(k) + 3) // 4 * 4


class PackedWeights(NamedTuple):
    """(N, K) int8 weights in the kernel's layout; n, k are the unpadded sizes."""
    data: np.ndarray
    n: int
    k: int


def pack_weights(w):
    """(N, K) int8 -> PackedWeights, once per model."""
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"weights must be a 2-D int8 array, got {w.dtype} {w.shape}")
    n, k = w.shape
    data = np.zeros((n, padded_k(k)), dtype=np.int8)
    data[:, :k] = w
    return PackedWeights(data, n, k)


def gemm_u8s8(a, packed, bias, scale, out):
    """out[m, n] <- the requantised or dequantised a @ w.T as above (see gemm_u8s8_ref).
    a: (M, padded_k(K)) uint8, C-contiguous; bias: (N,) int32; scale: (N,) float32;
    out: (M, N) uint8 or float32, unit column stride (a column slice of a wider array is fine)."""
    w = packed.data[:, :packed.k]
    out[...] = gemm_u8s8_ref(a[:, :packed.k], w, bias, scale, out.dtype)
    return out


def requantize_ref(acc, bias, scale, out_dtype):
    """The epilogue on int64 sums acc (M, N): see the module docstring; int32 out_dtype returns
    acc + bias unscaled. Sums outside int32 are an error (the kernel would wrap)."""
    t = acc.astype(np.int64) + bias.astype(np.int64)[None, :]
    if t.size and (t.min() < -2 ** 31 or t.max() >= 2 ** 31):
        raise OverflowError("int8 GEMM sum outside int32")
    if np.dtype(out_dtype) == np.int32:
        return t.astype(np.int32)
    v = t.astype(np.int32).astype(np.float32) * scale.astype(np.float32)[None, :]
    if np.dtype(out_dtype) == np.float32:
        return v
    if np.dtype(out_dtype) == np.uint8:
        return np.clip(np.rint(v), 0, 255).astype(np.uint8)
    raise ValueError(f"out_dtype must be uint8, float32 or int32, got {out_dtype}")


def gemm_u8s8_ref(a, w, bias, scale, out_dtype):
    """NumPy twin: a (M, K) uint8, w (N, K) int8, bias (N,) int32, scale (N,) float32 -> (M, N)."""
    acc = a.astype(np.int64) @ w.astype(np.int64).T
    return requantize_ref(acc, bias, scale, out_dtype)
