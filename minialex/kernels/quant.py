"""The int8 model's data movement on uint8 channels-last (N, H, W, C) tensors: quantising the
float input, the convolution (without groups: the int8 GEMM reads the windows in place from a padded
copy; with groups: im2col + the GEMM), max-pooling on the bytes, and the way back to float32 (for
LRN and the logits' neighbours).

A quantised tensor is (q, scale, zero_point) standing for scale * (q - zero_point). Activations
after a ReLU have zero_point 0 (so a uint8 clamp at 0 is the ReLU); the normalised input image,
which has negative values, has zero_point 128, and its convolution pads with 128 (the image's 0.0).
The convolution multiplies the bytes as they are: the quantiser folds the zero point's share,
-zero_point * sum(w[o]), into the int32 bias (exact at the border too, the padding being the zero
point).
Max-pooling commutes with that monotone map, so it runs on the bytes unchanged.

Channels-last because im2col then copies runs of contiguous channels, and one GEMM orientation
(rows = output pixels, columns = output channels) serves convolutions and linear layers alike.
"""
import numbers
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from minialex.shapes import pair
from .conv.layout import geometry
from .gemm_int8 import (PackedWeights, Rows, gemm_u8s8, gemm_u8s8_ref, pack_weights, padded_k,
                        prepare_rows)


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


# ---- the Numba kernels ----
# They index flat views with unsigned indices: Numba wraps negative signed indices around with a
# select per access, which keeps the byte loops from vectorising. Every prange task owns a
# disjoint set of output rows.

_BYTES = 64
_byte_vec = ir.VectorType(ir.IntType(8), _BYTES)
_lane_vec = ir.VectorType(ir.IntType(32), _BYTES)


def _head_mask(builder, count):
    """<64 x i1>: lane t set when t < count (0 <= count <= 64)."""
    undef = ir.Constant(_lane_vec, ir.Undefined)
    splat = builder.shuffle_vector(builder.insert_element(undef, count, ir.Constant(ir.IntType(32), 0)),
                                   undef, ir.Constant(_lane_vec, [0] * _BYTES))
    return builder.icmp_signed("<", ir.Constant(_lane_vec, list(range(_BYTES))), splat)


def _byte_ptr(context, builder, arrty, arr, idx, idxty):
    ary = context.make_array(arrty)(context, builder, arr)
    ptr = builder.gep(ary.data, [context.cast(builder, idx, idxty, types.intp)])
    return builder.bitcast(ptr, _byte_vec.as_pointer())


def _masked_store(builder, value, ptr, mask):
    fnty = ir.FunctionType(ir.VoidType(), [value.type, ptr.type, ir.IntType(32), mask.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.store.v64i8.p0")
    builder.call(fn, [value, ptr, ir.Constant(ir.IntType(32), 1), mask])


def _is_u8_array(ty):
    return isinstance(ty, types.Array) and ty.dtype == types.uint8


@intrinsic
def _move_head(typingctx, dst, d, src, s, count):
    """dst[d:d+count] = src[s:s+count] for 0 <= count <= 64 (flat uint8 arrays), as one masked
    load and one masked store: the bytes past count are neither read nor written, so a run may
    end at a buffer's end or next to another thread's row."""
    if not (_is_u8_array(dst) and _is_u8_array(src)
            and all(isinstance(t, types.Integer) for t in (d, s, count))):
        return None

    def codegen(context, builder, signature, args):
        (dty, dity, sty, sity, cty), (da, di, sa, si, cnt) = signature.args, args
        mask = _head_mask(builder, context.cast(builder, cnt, cty, types.int32))
        fnty = ir.FunctionType(_byte_vec, [_byte_vec.as_pointer(), ir.IntType(32), mask.type, _byte_vec])
        load = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.load.v64i8.p0")
        v = builder.call(load, [_byte_ptr(context, builder, sty, sa, si, sity), ir.Constant(ir.IntType(32), 1),
                                mask, ir.Constant(_byte_vec, None)])
        _masked_store(builder, v, _byte_ptr(context, builder, dty, da, di, dity), mask)
        return context.get_dummy_value()

    return types.none(dst, d, src, s, count), codegen


@intrinsic
def _fill_head(typingctx, dst, d, value, count):
    """dst[d:d+count] = value for 0 <= count <= 64 (flat uint8 array), one masked store."""
    if not (_is_u8_array(dst) and isinstance(d, types.Integer) and isinstance(value, types.Integer)
            and isinstance(count, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        (dty, dity, vty, cty), (da, di, val, cnt) = signature.args, args
        mask = _head_mask(builder, context.cast(builder, cnt, cty, types.int32))
        byte = builder.trunc(context.cast(builder, val, vty, types.int64), ir.IntType(8))
        undef = ir.Constant(_byte_vec, ir.Undefined)
        splat = builder.shuffle_vector(builder.insert_element(undef, byte, ir.Constant(ir.IntType(32), 0)),
                                       undef, ir.Constant(ir.VectorType(ir.IntType(32), _BYTES), [0] * _BYTES))
        _masked_store(builder, splat, _byte_ptr(context, builder, dty, da, di, dity), mask)
        return context.get_dummy_value()

    return types.none(dst, d, value, count), codegen


@njit(cache=True)
def _copy(dst, d, src, s, n):
    # dst[d:d+n] = src[s:s+n] (flat uint8 arrays), 64 bytes at a time
    for t in range(0, n, _BYTES):
        _move_head(dst, d + t, src, s + t, min(_BYTES, n - t))


@njit(cache=True)
def _fill(dst, d, v, n):
    # dst[d:d+n] = v (flat uint8 array), 64 bytes at a time
    for t in range(0, n, _BYTES):
        _fill_head(dst, d + t, v, min(_BYTES, n - t))


@njit(cache=True)
def _quantize_one(v, inv_scale, zp):
    # quantize_ref on one float32: rint (half to even) of the float32 product, NaN -> zero point
    t = np.rint(v * inv_scale)
    if t != t:
        return zp
    t = min(max(t + zp, np.float32(0.0)), np.float32(255.0))
    return np.uint8(t)


@njit(parallel=True, cache=True)
def _quantize_kernel(x, inv_scale, zero_point, out):
    # x: (N, C, H, W) float32 ; out: (N, H, W, C) uint8 ; one image row (n, h) per task: C
    # contiguous runs of W floats in, one contiguous run of W*C bytes out (written at stride C)
    n_img, c_n, h_n, w_n = x.shape
    xf = x.reshape(-1)
    of = out.reshape(-1)
    zp = np.float32(zero_point)
    for task in prange(n_img * h_n):
        n = task // h_n
        h = task - n * h_n
        o = task * w_n * c_n
        s = (n * c_n * h_n + h) * w_n        # channel 0 of the row; channel c is c*H*W further
        if c_n == 3:
            # an RGB image: the three channels in one loop, so the vectoriser sees whole
            # interleaved (r, g, b) stores instead of bytes written at stride 3
            plane = h_n * w_n
            for w in range(w_n):
                of[np.uint64(o + 3 * w)] = _quantize_one(xf[np.uint64(s + w)], inv_scale, zp)
                of[np.uint64(o + 3 * w + 1)] = _quantize_one(xf[np.uint64(s + plane + w)], inv_scale, zp)
                of[np.uint64(o + 3 * w + 2)] = _quantize_one(xf[np.uint64(s + 2 * plane + w)], inv_scale, zp)
            continue
        for c in range(c_n):
            sc = s + c * h_n * w_n
            for w in range(w_n):
                of[np.uint64(o + w * c_n + c)] = _quantize_one(xf[np.uint64(sc + w)], inv_scale, zp)


@njit(parallel=True, cache=True)
def _dequantize_kernel(q, scale, zero_point, out):
    # q: (N, H, W, C) uint8 ; out: (N, C, H, W) float32 ; one image row (n, h) per task:
    # float32(q - zero_point) * scale, the transpose of _quantize_kernel's walk
    n_img, h_n, w_n, c_n = q.shape
    qf = q.reshape(-1)
    of = out.reshape(-1)
    for task in prange(n_img * h_n):
        n = task // h_n
        h = task - n * h_n
        s = task * w_n * c_n
        for c in range(c_n):
            o = ((n * c_n + c) * h_n + h) * w_n
            for w in range(w_n):
                v = np.int32(qf[np.uint64(s + w * c_n + c)]) - zero_point
                of[np.uint64(o + w)] = np.float32(v) * scale


@njit(parallel=True, cache=True)
def _maxpool_u8_kernel(x, k, stride, out):
    # x: (N, H, W, C) uint8 ; out: (N, OH, OW, C) ; one output row (n, oh) per task; each
    # output pixel is the running maximum of its k*k taps along the contiguous channels
    n_img, h_n, w_n, c_n = x.shape
    oh_n, ow_n = out.shape[1], out.shape[2]
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for task in prange(n_img * oh_n):
        n = task // oh_n
        oh = task - n * oh_n
        top = (n * h_n + oh * stride) * w_n
        for ow in range(ow_n):
            o = (task * ow_n + ow) * c_n
            _copy(of, o, xf, (top + ow * stride) * c_n, c_n)
            for i in range(k):
                for j in range(k):
                    s = (top + i * w_n + ow * stride + j) * c_n
                    for c in range(c_n):
                        a = of[np.uint64(o + c)]
                        b = xf[np.uint64(s + c)]
                        of[np.uint64(o + c)] = a if a >= b else b


@njit(parallel=True, cache=True)
def _im2col_u8_kernel(x, cols, r0, kh, kw, sh, sw, ph, pw, oh_n, ow_n, c0, cg, pad_value):
    # x: (N, H, W, C) uint8 ; cols: (R, KP) uint8, rows r0..r0+R of the whole
    # (N*OH*OW, KP) im2col matrix ; channels c0..c0+cg ; one row (= output pixel) per task.
    # Row r = (n, oh, ow): for each tap row i, the taps j lie side by side in cols, and in x
    # too when cg == C (one group), so the kw taps inside the image are one run of bytes;
    # otherwise one run of cg channels per tap. pad_value outside the image, zeros past K.
    n_img, h_n, w_n, c_n = x.shape
    rows, kp = cols.shape
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    k = kh * kw * cg
    run = kw * cg
    plane = oh_n * ow_n
    pv = np.uint8(pad_value)
    whole = cg == c_n
    for rr in prange(rows):
        r = r0 + rr
        n = r // plane
        p = r - n * plane
        oh = p // ow_n
        ow = p - oh * ow_n
        iw0 = ow * sw - pw
        jlo = min(kw, max(0, -iw0))
        jhi = max(jlo, min(kw, w_n - iw0))     # taps jlo..jhi-1 fall inside the row
        d_row = rr * kp
        for i in range(kh):
            ih = oh * sh - ph + i
            d = d_row + i * run
            if ih < 0 or ih >= h_n:
                _fill(cf, d, pv, run)
                continue
            s = ((n * h_n + ih) * w_n + iw0 + jlo) * c_n + c0     # tap jlo, channel c0
            _fill(cf, d, pv, jlo * cg)
            if whole:
                _copy(cf, d + jlo * cg, xf, s, (jhi - jlo) * cg)
            else:
                for j in range(jhi - jlo):
                    _copy(cf, d + (jlo + j) * cg, xf, s + j * c_n, cg)
            _fill(cf, d + jhi * cg, pv, (kw - jhi) * cg)
        _fill(cf, d_row + k, np.uint8(0), kp - k)


@njit(parallel=True, cache=True)
def _pad_kernel(x, xp, ph, pw, hp_n, wp_n, pad_value):
    # x: (N, H, W, C) uint8 ; xp: flat, at least N*hp_n*wp_n*C bytes: the image at (ph, pw) of
    # an (N, hp_n, wp_n, C) frame of pad_value ; one padded row (n, hp) per task
    n_img, h_n, w_n, c_n = x.shape
    xf = x.reshape(-1)
    pv = np.uint8(pad_value)
    row = wp_n * c_n
    for task in prange(n_img * hp_n):
        n = task // hp_n
        ih = task - n * hp_n - ph
        d = task * row
        if ih < 0 or ih >= h_n:
            _fill(xp, d, pv, row)
            continue
        left = pw * c_n
        _fill(xp, d, pv, left)
        _copy(xp, d + left, xf, (n * h_n + ih) * w_n * c_n, w_n * c_n)
        _fill(xp, d + left + w_n * c_n, pv, row - left - w_n * c_n)


# ---- argument checks ----

def _array(x, name, dtype, ndim):
    """x as a C-contiguous array (copied only if it is not one), after checking dtype and rank."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype != dtype or x.ndim != ndim:
        raise TypeError(f"{name} must be a {ndim}-D {np.dtype(dtype)} array, got {x.ndim}-D {x.dtype}")
    return np.ascontiguousarray(x)


def _byte(v, name):
    """An int in 0..255 (a zero point or pad value)."""
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not 0 <= v <= 255:
        raise ValueError(f"{name} must be an int in 0..255, got {v!r}")
    return int(v)


def _positive_scale(v, name):
    """A finite positive scale as float32."""
    if not isinstance(v, numbers.Real) or not np.isfinite(v) or not np.float32(v) > 0:
        raise ValueError(f"{name} must be a finite positive number, got {v!r}")
    return np.float32(v)


def _int_at_least(v, name, minimum):
    """An int >= minimum."""
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name} must be an int of at least {minimum}, got {v!r}")
    return int(v)


def _positive_pair(v, name, minimum):
    """An (h, w) pair of ints >= minimum from an int or a pair (as pair() reads them)."""
    a, b = pair(v)
    if a < minimum or b < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {v!r}")
    return a, b


# ---- the kernels' interface ----

def quantize(x, inv_scale, zero_point):
    """quantize_ref's contract, fast: (N, C, H, W) float32 -> (N, H, W, C) uint8,
    clamp(rint(x * inv_scale) + zero_point, 0, 255) with the transpose fused in."""
    x = _array(x, "quantize input", np.float32, 4)
    inv = _positive_scale(inv_scale, "quantize inv_scale")
    zp = _byte(zero_point, "quantize zero_point")
    n, c, h, w = x.shape
    out = np.empty((n, h, w, c), dtype=np.uint8)
    if out.size:
        _quantize_kernel(x, inv, zp, out)
    return out


def dequantize(q, scale, zero_point=0):
    """dequantize_ref's contract, fast: (N, H, W, C) uint8 -> (N, C, H, W) float32."""
    q = _array(q, "dequantize input", np.uint8, 4)
    s = _positive_scale(scale, "dequantize scale")
    zp = _byte(zero_point, "dequantize zero_point")
    n, h, w, c = q.shape
    out = np.empty((n, c, h, w), dtype=np.float32)
    if out.size:
        _dequantize_kernel(q, s, zp, out)
    return out


def maxpool_u8(x, k, stride):
    """maxpool_u8_ref's contract, fast: (N, H, W, C) uint8 -> (N, OH, OW, C), k x k windows,
    no padding, floor."""
    x = _array(x, "maxpool_u8 input", np.uint8, 4)
    k = _int_at_least(k, "maxpool_u8 kernel", 1)
    stride = _int_at_least(stride, "maxpool_u8 stride", 1)
    n, h, w, c = x.shape
    if k > h or k > w:
        raise ValueError(f"maxpool_u8 input {x.shape} (N, H, W, C) too small for kernel {k}")
    out = np.empty((n, (h - k) // stride + 1, (w - k) // stride + 1, c), dtype=np.uint8)
    if out.size:
        _maxpool_u8_kernel(x, k, stride, out)
    return out


def _im2col_into(x, cols, r0, g, c0, cg, pad_value):
    """Rows r0..r0+len(cols) of im2col_u8 of channels c0..c0+cg into cols."""
    _im2col_u8_kernel(x, cols, r0, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.oh, g.ow, c0, cg,
                      pad_value)


def im2col_u8(x, kh, kw, stride, padding, pad_value, c0, c1):
    """im2col_u8_ref's contract, fast: (N, H, W, C) uint8 -> (N*OH*OW, padded_k(kh*kw*(c1-c0)))
    uint8, rows = output pixels, columns in (i, j, c) order."""
    x = _array(x, "im2col_u8 input", np.uint8, 4)
    n, h, w, c = x.shape
    if not 0 <= c0 < c1 <= c:
        raise ValueError(f"im2col_u8 channels {c0}:{c1} outside the input's {c}")
    kh, kw = _positive_pair((kh, kw), "im2col_u8 kernel", 1)
    g = geometry((n, c, h, w), (1, c1 - c0, kh, kw), _positive_pair(stride, "im2col_u8 stride", 1),
                 _positive_pair(padding, "im2col_u8 padding", 0), 1)
    cols = np.empty((n * g.oh * g.ow, padded_k(kh * kw * (c1 - c0))), dtype=np.uint8)
    if cols.size:
        _im2col_into(x, cols, 0, g, c0, c1 - c0, _byte(pad_value, "im2col_u8 pad_value"))
    return cols


def pack_conv_weights(wq, groups):
    """(Cout, Cin/g, kh, kw) int8 -> one PackedWeights per group, in im2col's order, once per model."""
    wq = np.asarray(wq)
    if wq.dtype != np.int8 or wq.ndim != 4:
        raise TypeError(f"conv weights must be a 4-D int8 array, got {wq.ndim}-D {wq.dtype}")
    if groups < 1 or wq.shape[0] % groups:
        raise ValueError(f"groups={groups} does not split the {wq.shape[0]} output channels")
    return tuple(pack_weights(np.ascontiguousarray(m)) for m in conv_weights_ref(wq, groups))


def _bias_scale(bias, scale, cout):
    """A convolution's (Cout,) int32 bias and float32 scale, checked."""
    bias = _array(bias, "conv2d_int8 bias", np.int32, 1)
    scale = _array(scale, "conv2d_int8 scale", np.float32, 1)
    if bias.shape != (cout,) or scale.shape != (cout,):
        raise ValueError(f"conv2d_int8 bias {bias.shape} and scale {scale.shape} must be ({cout},)")
    return bias, scale


def _conv_out_dtype(out_dtype):
    if np.dtype(out_dtype) not in (np.dtype(np.uint8), np.dtype(np.float32)):
        raise ValueError(f"conv2d_int8 out_dtype must be uint8 or float32, got {out_dtype}")
    return out_dtype


# Bytes of im2col rows per GEMM call: the batch is unfolded and multiplied block by block, so
# the unfolded matrix never exists whole (conv1 at batch 64 would be 70 MB, and first-touching
# a fresh array that size cost more than the unfolding). 4 MB stays in L3 and keeps the number
# of parallel regions (two per block and group) low: 55 blocks for torchvision at batch 64.
BLOCK_BYTES = 4 << 20


# ---- the convolution without im2col ----

class ImplicitConvWeights(NamedTuple):
    """A convolution's weights (groups=1) for conv2d_int8 reading the windows in place (implicit
    GEMM): per output channel, each kernel row's kw*Cin weights in (j, c) order padded with zeros
    to a multiple of 4 bytes (`run`), so K = kh * run and every 4-byte group of a window row is
    one load from the padded image."""
    packed: PackedWeights
    kh: int
    kw: int
    cin: int
    run: int


def pack_conv_weights_implicit(wq):
    """(Cout, Cin, kh, kw) int8 -> ImplicitConvWeights (a convolution without groups), once per model."""
    wq = np.asarray(wq)
    if wq.dtype != np.int8 or wq.ndim != 4:
        raise TypeError(f"conv weights must be a 4-D int8 array, got {wq.ndim}-D {wq.dtype}")
    cout, cin, kh, kw = wq.shape
    run = padded_k(kw * cin)
    rows = np.zeros((cout, kh, run), np.int8)
    rows[:, :, :kw * cin] = wq.transpose(0, 2, 3, 1).reshape(cout, kh, kw * cin)
    return ImplicitConvWeights(pack_weights(rows.reshape(cout, kh * run)), kh, kw, cin, run)



def conv2d_int8(x, packed, bias, scale, kernel_size, stride, padding, pad_value, out_dtype):
    """conv2d_int8_ref's contract on weights packed by pack_conv_weights (im2col in blocks, then
    the GEMM) or by pack_conv_weights_implicit (the GEMM reads the windows in place): x (N, H, W,
    Cin) uint8 -> (N, OH, OW, Cout) uint8 (requantised, ReLU) or float32 (dequantised)."""
    x = _array(x, "conv2d_int8 input", np.uint8, 4)
    n, h, w, cin = x.shape
    kh, kw = _positive_pair(kernel_size, "conv2d_int8 kernel_size", 1)
    if isinstance(packed, ImplicitConvWeights):
        if (packed.kh, packed.kw, packed.cin) != (kh, kw, cin):
            raise ValueError(f"conv2d_int8: implicit weights for a {packed.kh}x{packed.kw} kernel on "
                             f"{packed.cin} channels do not fit a {kh}x{kw} kernel on {cin} channels")
        return _conv_implicit(x, packed, bias, scale, stride, padding, pad_value, out_dtype)
    if not isinstance(packed, (tuple, list)) or not packed or \
            not all(isinstance(p, PackedWeights) for p in packed):
        raise TypeError("conv2d_int8 weights must come from pack_conv_weights or pack_conv_weights_implicit")
    groups = len(packed)
    cg = packed[0].n
    cout = cg * groups
    if cin % groups or any(p.n != cg or p.k != kh * kw * (cin // groups) for p in packed):
        raise ValueError(f"conv2d_int8: packed weights ({groups} groups of {cg} x "
                         f"{[p.k for p in packed]}) do not fit a {kh}x{kw} kernel on {cin} channels")
    cin_g = cin // groups
    bias, scale = _bias_scale(bias, scale, cout)
    out_dtype = _conv_out_dtype(out_dtype)
    pad_value = _byte(pad_value, "conv2d_int8 pad_value")
    g = geometry((n, cin, h, w), (cout, cin_g, kh, kw), _positive_pair(stride, "conv2d_int8 stride", 1),
                 _positive_pair(padding, "conv2d_int8 padding", 0), groups)
    m = n * g.oh * g.ow
    kp = padded_k(kh * kw * cin_g)
    out = np.empty((m, cout), dtype=out_dtype)
    step = max(1, min(m, BLOCK_BYTES // kp))
    cols = np.empty((step, kp), dtype=np.uint8)
    for r0 in range(0, m, step):
        rows = min(step, m - r0)
        block = cols[:rows]
        for gi, p in enumerate(packed):
            _im2col_into(x, block, r0, g, gi * cin_g, cin_g, pad_value)
            sl = slice(gi * cg, (gi + 1) * cg)
            gemm_u8s8(block, p, bias[sl], scale[sl], out[r0:r0 + rows, sl])
    return out.reshape(n, g.oh, g.ow, cout)



def _conv_implicit(x, weights, bias, scale, stride, padding, pad_value, out_dtype):
    """conv2d_int8 on ImplicitConvWeights, without an im2col matrix: x is copied once into a
    frame of pad_value, and the GEMM reads each output pixel's window rows there in place
    (implicit GEMM). For conv1 (Cin=3, 33-byte window rows padded to 36) that costs 9% more
    multiply-adds and saves writing and reading the 70 MB column matrix at batch 64."""
    return prepare_conv2d_int8(x.shape, weights, bias, scale, stride, padding, pad_value, out_dtype)(x)


def prepare_conv2d_int8(x_shape, weights, bias, scale, stride, padding, pad_value, out_dtype):
    """conv2d_int8 on ImplicitConvWeights for (N, H, W, Cin) uint8 inputs of shape x_shape, with
    its checks, padded frame and output made once: returns run(x) -> (N, OH, OW, Cout), the same
    output array on every call (an int8 model's per-batch-size plan)."""
    n, h, w, cin = (int(v) for v in x_shape)
    kh, kw = weights.kh, weights.kw
    if weights.cin != cin:
        raise ValueError(f"conv2d_int8: implicit weights for {weights.cin} channels do not fit an "
                         f"input of {cin} channels")
    cout = weights.packed.n
    bias, scale = _bias_scale(bias, scale, cout)
    out_dtype = _conv_out_dtype(out_dtype)
    pad_value = _byte(pad_value, "conv2d_int8 pad_value")
    g = geometry((n, cin, h, w), (cout, cin, kh, kw), _positive_pair(stride, "conv2d_int8 stride", 1),
                 _positive_pair(padding, "conv2d_int8 padding", 0), 1)
    hp, wp = h + 2 * g.ph, w + 2 * g.pw
    # the last window row's pad bytes (at most 3) may run past the frame: they meet zero weights
    frame = np.empty(n * hp * wp * cin + 64, np.uint8)
    frame[n * hp * wp * cin:] = 0
    out = np.empty((n * g.oh * g.ow, cout), dtype=out_dtype)
    rows = Rows(g.oh, g.ow, hp * wp * cin, g.sh * wp * cin, g.sw * cin, kh, weights.run // 4, wp * cin)
    gemm = prepare_rows(frame.size, rows, len(out), weights.packed, bias, scale, out)
    shape = (n, h, w, cin)

    def run(x):
        x = _array(x, "conv2d_int8 input", np.uint8, 4)
        if x.shape != shape:
            raise ValueError(f"conv2d_int8 prepared for inputs {shape}, got {x.shape}")
        _pad_kernel(x, frame, g.ph, g.pw, hp, wp, pad_value)
        gemm(frame)
        return out.reshape(n, g.oh, g.ow, cout)
    return run
