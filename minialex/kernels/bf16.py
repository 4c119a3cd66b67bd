"""bfloat16 as uint16 bit patterns (the top half of a float32): rounding, widening and the sum a
bf16 all-reduce applies, for gradients sent at half the bytes (`-grad_dtype bf16`).

Rounding is to nearest, ties to even (add 0x7FFF plus the lowest kept bit, keep the top 16 bits),
as `vcvtneps2bf16` does; a NaN stays a NaN (quiet, sign kept), infinities stay infinite, and values
past bf16's largest round to infinity. With error feedback the part rounding dropped is kept in a
float32 residual and added to the next step's gradient, so nothing is lost over steps:
widen(q) + residual == gradient + old residual, exactly.
"""
import numpy as np
from numba import njit, prange


@njit(inline="always")
def round_bits(bits):
    """The bf16 pattern (a uint32 in 0..0xFFFF) of the float32 whose uint32 pattern is bits, as
    described above; njit code only (the packing of kernels.gemm_bf16 rounds with it too)."""
    if (bits & 0x7F800000) == 0x7F800000 and (bits & 0x007FFFFF) != 0:
        return (bits >> 16) | 0x0040   # NaN: keep sign and payload's top, make it quiet
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


@njit(parallel=True, cache=True)
def _round_feedback(g, residual, out):
    # g, residual: (n,) float32 ; out: (n,) uint16. residual <- g + residual - widen(out)
    n = g.shape[0]
    for i in prange(n):
        v = g[i] + residual[i]
        q = round_bits(np.uint32(np.float32(v).view(np.uint32)))
        out[i] = np.uint16(q)
        w = np.uint32(q << 16).view(np.float32)
        d = v - w
        residual[i] = d if d - d == 0.0 else np.float32(0.0)   # inf or NaN: nothing to carry


@njit(parallel=True, cache=True)
def _widen(q, out):
    # q: (n,) uint16 ; out: (n,) float32
    for i in prange(q.shape[0]):
        out[i] = np.uint32(np.uint32(q[i]) << 16).view(np.float32)


@njit(cache=True)
def _add(a, b):
    # a, b: (n,) uint16 ; b <- bf16(widen(a) + widen(b)). Serial: MPI calls it on pieces.
    for i in range(a.shape[0]):
        s = np.uint32(np.uint32(a[i]) << 16).view(np.float32) + np.uint32(np.uint32(b[i]) << 16).view(np.float32)
        b[i] = np.uint16(round_bits(np.uint32(np.float32(s).view(np.uint32))))


def bf16_round_feedback(g, residual, out):
    """out <- bf16(g + residual), residual <- what the rounding dropped. g, residual: (n,) float32
    contiguous; out: (n,) uint16."""
    _round_feedback(g, residual, out)
    return out


def bf16_widen(q, out):
    """out <- the float32 values of the bf16 patterns q. q: (n,) uint16; out: (n,) float32."""
    _widen(q, out)
    return out


def bf16_add(a, b):
    """b <- bf16(float32(a) + float32(b)), element-wise over uint16 patterns (the bf16 all-reduce's sum)."""
    _add(a, b)
    return b


# -- NumPy reference twins ------------------------------------------------------------------------

def bf16_round_ref(x):
    """bf16 patterns (uint16) of float32 x, round to nearest even, NaN kept quiet."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint32)
    return rounded.astype(np.uint16)


def bf16_widen_ref(q):
    return (np.asarray(q, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_round_feedback_ref(g, residual):
    """(patterns, new residual) as bf16_round_feedback computes them."""
    v = (np.asarray(g, np.float32) + np.asarray(residual, np.float32)).astype(np.float32)
    q = bf16_round_ref(v)
    d = (v - bf16_widen_ref(q)).astype(np.float32)
    d[~np.isfinite(d)] = 0.0
    return q, d


def bf16_add_ref(a, b):
    with np.errstate(over="ignore", invalid="ignore"):   # inf + -inf is NaN, as in the kernel
        return bf16_round_ref((bf16_widen_ref(a) + bf16_widen_ref(b)).astype(np.float32))
