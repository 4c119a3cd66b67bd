"""bfloat16 GEMM with float32 accumulation: C (+)= op(A) · op(B), both operands rounded to bf16.

Same contract as `kernels.gemm.gemm` for float32 operands (any strides, transposes absorbed into
packing, out C-contiguous float32, accumulate, m/n/k = 0, numba.get_num_threads() threads),
except that A and B are rounded to bfloat16 (round to nearest even, a NaN stays a quiet NaN, as
`kernels.bf16` rounds) and the products are summed in float32. On AVX512_BF16 CPUs this runs at
about twice the float32 rate: `vdpbf16ps` does 32 multiply-adds per instruction against the
FMA's 16.

Native path (CPU flags list avx512_bf16): the float32 GEMM's Goto/BLIS nest (see kernels.gemm),
rounding while packing, with the depth counted in pairs of k:

    B block -> [32-column panel][k pair][32 columns][2] bf16   (two zmm loads per k pair)
    A block -> [8-row panel][k pair][8 rows][2] bf16           (one 32-bit pair broadcast per row)
    8x32 micro-kernel: 16 f32x16 accumulators, 16 vdpbf16ps per k pair

An odd k is zero-padded to whole pairs. What vdpbf16ps does, as Intel documents it and as
measured here: each product of two bf16 values is exact; lane i adds its odd product, then its
even one, each addition rounded to nearest even; bf16 inputs and the accumulator are read with
denormals as zero and denormal results are flushed to zero, whatever MXCSR says. So beside the
float32 rounding of the sum (at most about k * 2^-24 * sum |a_i b_i| per entry) a product or
partial sum below 2^-126 in magnitude counts as zero.

Emulated path: on CPUs without avx512_bf16, or when the environment variable MINIALEX_BF16 is
`emulate` (read at every call; any other value but empty or `auto` is an error), the operands
are rounded to bf16 values held in float32 (denormals set to zero, as the instruction reads
them), multiplied by the float32 `gemm` (products of two bf16 values are exact in float32, so
only the order of the sum differs) and denormal results flushed to zero. It needs a float32 copy
of each operand. The native kernels are compiled only when first called on a CPU with the flag:
the instruction faults elsewhere. `bf16_path()` says which path a call takes.
"""
import functools

import numba
import numpy as np
from numba import njit, prange

from .bf16 import bf16_round_ref, bf16_widen_ref, round_bits
from .gemm import MR, NR, PAR_MIN_FLOPS, check_operands, flat_operand, gemm, store_tile_8x32
from .simd import instruction_path, prefetch, vload, vtranspose_8x16, vzero
from .simd_bf16 import bbroadcast, bload, bpack, bround_load, bstore, has_avx512_bf16, vdpbf16

KCP = 192       # k pairs per packed block (384 k): a 32-column B micro-panel is 24 KiB, in L1
KC = 2 * KCP    # depth per packed block; even, so no pair straddles two blocks
MC = 192        # rows of A per packed block:     192 x 384 x 2 B = 144 KiB, in L2
NC = 2048        # columns of B per packed block:  384 x 2048 x 2 B = 1.5 MiB, in L3
C_PREFETCH_AT = 16   # k pairs before the end of a micro-kernel call to prefetch its C tile
FLT_MIN = 2.0 ** -126   # smallest normal float32: below it the instruction flushes to zero


# -- choosing the path ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _cpu_has_bf16():
    return has_avx512_bf16()


def bf16_path():
    """"native" (vdpbf16ps) or "emulated" (float32 GEMM on bf16-rounded operands): what
    gemm_bf16 runs now, from the CPU flags and the environment variable MINIALEX_BF16."""
    return instruction_path("MINIALEX_BF16", "native", _cpu_has_bf16)


# -- native path ----------------------------------------------------------------------------------

@njit(cache=True)
def _aligned_u32(n):
    """A uint32 buffer of n elements whose data pointer is 64-byte aligned (see kernels.gemm)."""
    raw = np.empty(n + 16, dtype=np.uint32)
    off = ((64 - raw.ctypes.data % 64) % 64) // 4
    return raw[off:off + n]


@njit(inline="always", cache=True)
def _bf16_pair(x_even, x_odd):
    # two float32 -> one uint32 holding their bf16 patterns, the even element in the low half
    lo = round_bits(np.uint32(np.float32(x_even).view(np.uint32)))
    hi = round_bits(np.uint32(np.float32(x_odd).view(np.uint32)))
    return np.uint32(lo | (hi << 16))


@njit(cache=True)
def _pack_b(b, ldb, tb, pc, kc, j_lo, j_hi, dst, scr):
    # b: op(B)[k, j] = b[k*ldb + j] (tb False) or b[j*ldb + k] (tb True), float32
    # dst: uint32 pairs, [panel of 32 columns][kcp][32] ; columns j_lo..j_hi zero-padded to 32s,
    # k pc..pc+kc zero-padded to kcp = ceil(kc / 2) pairs ; scr: NR*KCP aligned uint32 of scratch
    kcp = (kc + 1) // 2
    dstf = dst.view(np.float32)
    scrf = scr.view(np.float32)
    q = 0
    for j0 in range(j_lo, j_hi, NR):
        w = min(NR, j_hi - j0)
        base = q * kcp * NR
        q += 1
        pp0 = 0
        if w == NR:
            if not tb:
                # rows 2pp and 2pp+1 of B, 16 columns at a time, interleaved as pairs
                for pp in range(kc // 2):
                    s = (pc + 2 * pp) * ldb + j0
                    d = base + pp * NR
                    bstore(dst, d, bpack(vload(b, s), vload(b, s + ldb)))
                    bstore(dst, d + 16, bpack(vload(b, s + 16), vload(b, s + ldb + 16)))
                if kc % 2:
                    s = (pc + kc - 1) * ldb + j0
                    d = base + (kc // 2) * NR
                    bstore(dst, d, bpack(vload(b, s), vzero()))
                    bstore(dst, d + 16, bpack(vload(b, s + 16), vzero()))
                continue
            # k runs along memory rows: round each column's whole run of k into scr (row jj
            # at jj*KCP; one long read per memory row, which streams faster than hopping
            # between rows 32 k at a time), then 8 x 16 register transposes of 32-bit pairs
            pp0 = (kc // 32) * 16
            for jj in range(NR):
                s = (j0 + jj) * ldb + pc
                for p in range(0, 2 * pp0, 32):
                    bstore(scr, jj * KCP + p // 2, bround_load(b, s + p))
            for pp in range(0, pp0, 16):
                for g in range(4):
                    vtranspose_8x16(scrf, 8 * g * KCP + pp, KCP, dstf, base + pp * NR + 8 * g, NR)
        for pp in range(pp0, kcp):
            p = pc + 2 * pp
            odd = 2 * pp + 1 < kc
            d = base + pp * NR
            for jj in range(w):
                if tb:
                    e = b[(j0 + jj) * ldb + p]
                    o = b[(j0 + jj) * ldb + p + 1] if odd else np.float32(0.0)
                else:
                    e = b[p * ldb + j0 + jj]
                    o = b[(p + 1) * ldb + j0 + jj] if odd else np.float32(0.0)
                dst[d + jj] = _bf16_pair(e, o)
            for jj in range(w, NR):
                dst[d + jj] = 0


@njit(cache=True)
def _pack_a(a, lda, ta, ic, mc, pc, kc, dst, scr):
    # a: op(A)[i, k] = a[i*lda + k] (ta False) or a[k*lda + i] (ta True), float32
    # dst: uint32 pairs, [panel of 8 rows][kcp][8] ; rows ic..ic+mc zero-padded to 8s
    kcp = (kc + 1) // 2
    dstf = dst.view(np.float32)
    scrf = scr.view(np.float32)
    q = 0
    for i0 in range(ic, ic + mc, MR):
        h = min(MR, ic + mc - i0)
        base = q * kcp * MR
        q += 1
        pp0 = 0
        if h == MR and not ta:
            # k runs along memory rows: each row's run of k rounded into scr (row r at r*KCP),
            # then one 8 x 16 register transpose per 16 pairs
            pp0 = (kc // 32) * 16
            for r in range(MR):
                s = (i0 + r) * lda + pc
                for p in range(0, 2 * pp0, 32):
                    bstore(scr, r * KCP + p // 2, bround_load(a, s + p))
            for pp in range(0, pp0, 16):
                vtranspose_8x16(scrf, pp, KCP, dstf, base + pp * MR, MR)
        for pp in range(pp0, kcp):
            p = pc + 2 * pp
            odd = 2 * pp + 1 < kc
            d = base + pp * MR
            for r in range(h):
                if ta:
                    e = a[p * lda + i0 + r]
                    o = a[(p + 1) * lda + i0 + r] if odd else np.float32(0.0)
                else:
                    e = a[(i0 + r) * lda + p]
                    o = a[(i0 + r) * lda + p + 1] if odd else np.float32(0.0)
                dst[d + r] = _bf16_pair(e, o)
            for r in range(h, MR):
                dst[d + r] = 0


@njit(cache=True)
def _micro_bf16(kcp, ap, a_off, bp, b_off, c, c_off, ldc, add):
    # ap: uint32 A pairs, [kcp][8] from a_off ; bp: uint16 B panel, [kcp][32][2] from b_off
    # c: C tile, row r at c_off + r*ldc (32 wide) ; add: C += tile, else C = tile
    c00 = vzero(); c01 = vzero(); c10 = vzero(); c11 = vzero()
    c20 = vzero(); c21 = vzero(); c30 = vzero(); c31 = vzero()
    c40 = vzero(); c41 = vzero(); c50 = vzero(); c51 = vzero()
    c60 = vzero(); c61 = vzero(); c70 = vzero(); c71 = vzero()
    pa = a_off
    pb = b_off
    pfc = kcp - C_PREFETCH_AT
    for it in range(kcp):
        if it == pfc:
            for r in range(MR):
                prefetch(c, c_off + r * ldc)
                prefetch(c, c_off + r * ldc + 16)
        b0 = bload(bp, pb)
        b1 = bload(bp, pb + 32)
        a = bbroadcast(ap, pa)
        c00 = vdpbf16(c00, a, b0); c01 = vdpbf16(c01, a, b1)
        a = bbroadcast(ap, pa + 1)
        c10 = vdpbf16(c10, a, b0); c11 = vdpbf16(c11, a, b1)
        a = bbroadcast(ap, pa + 2)
        c20 = vdpbf16(c20, a, b0); c21 = vdpbf16(c21, a, b1)
        a = bbroadcast(ap, pa + 3)
        c30 = vdpbf16(c30, a, b0); c31 = vdpbf16(c31, a, b1)
        a = bbroadcast(ap, pa + 4)
        c40 = vdpbf16(c40, a, b0); c41 = vdpbf16(c41, a, b1)
        a = bbroadcast(ap, pa + 5)
        c50 = vdpbf16(c50, a, b0); c51 = vdpbf16(c51, a, b1)
        a = bbroadcast(ap, pa + 6)
        c60 = vdpbf16(c60, a, b0); c61 = vdpbf16(c61, a, b1)
        a = bbroadcast(ap, pa + 7)
        c70 = vdpbf16(c70, a, b0); c71 = vdpbf16(c71, a, b1)
        pa += MR
        pb += 2 * NR
    store_tile_8x32(c, c_off, ldc, add, c00, c01, c10, c11, c20, c21, c30, c31,
                    c40, c41, c50, c51, c60, c61, c70, c71)


@njit(cache=True)
def _bf16_slab(a, lda, ta, b, ldb, tb, c, ldc, m0, m1, n0, n1, k, accumulate):
    # a, b: flat float32 operands (see _pack_a/_pack_b); c: flat C, row stride ldc
    # computes C[m0:m1, n0:n1] (+)= bf16(op(A))[m0:m1, :] @ bf16(op(B))[:, n0:n1]
    abuf = _aligned_u32(MC * KCP)
    bbuf = _aligned_u32(NC * KCP)
    b16 = bbuf.view(np.uint16)
    scr = _aligned_u32(NR * KCP)
    tile = _aligned_u32(MR * NR).view(np.float32)
    for jc in range(n0, n1, NC):
        nc = min(NC, n1 - jc)
        for pc in range(0, k, KC):
            kc = min(KC, k - pc)
            kcp = (kc + 1) // 2
            _pack_b(b, ldb, tb, pc, kc, jc, jc + nc, bbuf, scr)
            add = accumulate or pc > 0
            for ic in range(m0, m1, MC):
                mc = min(MC, m1 - ic)
                _pack_a(a, lda, ta, ic, mc, pc, kc, abuf, scr)
                for jr in range(0, nc, NR):
                    w = min(NR, nc - jr)
                    boff = (jr // NR) * kcp * 2 * NR
                    for ir in range(0, mc, MR):
                        h = min(MR, mc - ir)
                        aoff = (ir // MR) * kcp * MR
                        coff = (ic + ir) * ldc + jc + jr
                        if h == MR and w == NR:
                            _micro_bf16(kcp, abuf, aoff, b16, boff, c, coff, ldc, add)
                            continue
                        _micro_bf16(kcp, abuf, aoff, b16, boff, tile, 0, NR, False)
                        for r in range(h):
                            for jj in range(w):
                                if add:
                                    c[coff + r * ldc + jj] += tile[r * NR + jj]
                                else:
                                    c[coff + r * ldc + jj] = tile[r * NR + jj]


@njit(parallel=True, cache=True)
def _bf16_par(a, lda, ta, b, ldb, tb, c, ldc, m, n, k, accumulate, nslab, split_n):
    # slabs of C split along N (in multiples of 32 columns) or M (in multiples of 8 rows)
    if split_n:
        step = ((n + NR - 1) // NR + nslab - 1) // nslab * NR
    else:
        step = ((m + MR - 1) // MR + nslab - 1) // nslab * MR
    for s in prange(nslab):
        lo = s * step
        if split_n:
            hi = min(n, lo + step)
            if lo < hi:
                _bf16_slab(a, lda, ta, b, ldb, tb, c, ldc, 0, m, lo, hi, k, accumulate)
        else:
            hi = min(m, lo + step)
            if lo < hi:
                _bf16_slab(a, lda, ta, b, ldb, tb, c, ldc, lo, hi, 0, n, k, accumulate)


def _native(a, b, out, trans_a, trans_b, accumulate, m, n, k):
    af, lda, ta = flat_operand(a, trans_a)
    bf, ldb, tb = flat_operand(b, trans_b)
    cf = out.reshape(-1)
    nthreads = numba.get_num_threads()
    if nthreads > 1 and 2.0 * m * n * k >= PAR_MIN_FLOPS:
        split_n = n >= m
        nslab = min(nthreads, (n + NR - 1) // NR if split_n else (m + MR - 1) // MR)
        if nslab > 1:
            _bf16_par(af, lda, ta, bf, ldb, tb, cf, n, m, n, k, accumulate, nslab, split_n)
            return out
    _bf16_slab(af, lda, ta, bf, ldb, tb, cf, n, 0, m, 0, n, k, accumulate)
    return out


# -- emulated path --------------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def _bf16_values(x, out):
    # x: 2-D float32, any strides ; out: same shape -> the bf16 values of x as float32, a bf16
    # denormal read as a zero of its sign (as vdpbf16ps reads its inputs)
    for i in prange(x.shape[0]):
        for j in range(x.shape[1]):
            q = round_bits(np.uint32(np.float32(x[i, j]).view(np.uint32)))
            if (q & 0x7F80) == 0:
                q &= 0x8000
            out[i, j] = np.uint32(q << 16).view(np.float32)


@njit(parallel=True, cache=True)
def _flush_store(r, out, add):
    # out (+)= r with r's denormals flushed to zero first (vdpbf16ps's results) ; r, out: (n,)
    for i in prange(r.shape[0]):
        v = r[i]
        if abs(v) < FLT_MIN:
            v = np.float32(0.0)
        if add:
            out[i] += v
        else:
            out[i] = v


def bf16_values(x):
    """The bf16 values of the 2-D float32 x, as vdpbf16ps reads them (round to nearest even, a
    bf16 denormal as a zero of its sign), in a new float32 array in x's memory order: the
    operands of every emulated bf16 product."""
    if x.flags.f_contiguous and not x.flags.c_contiguous:
        return bf16_values(x.T).T
    r = np.empty(x.shape, np.float32)
    _bf16_values(x, r)
    return r


def _emulated(a, b, out, trans_a, trans_b, accumulate):
    r = gemm(bf16_values(a), bf16_values(b), None, trans_a, trans_b)
    _flush_store(r.reshape(-1), out.reshape(-1), accumulate)
    return out


# -- entry point ----------------------------------------------------------------------------------

def gemm_bf16(a, b, out=None, trans_a=False, trans_b=False, accumulate=False):
    """out = bf16(op(a)) @ bf16(op(b)) summed in float32 (out += ... when accumulate).

    a, b: 2-D float32 arrays, any strides; out: optional C-contiguous float32 array, not
    overlapping a or b; when None a new array is returned (and accumulate is ignored). Rounding
    and the arithmetic are described in the module docstring. Returns out.
    """
    m, n, k = check_operands(a, b, out, trans_a, trans_b)
    if a.dtype != np.float32:
        raise TypeError(f"gemm_bf16 needs float32 operands, got {a.dtype}")
    path = bf16_path()
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
        accumulate = False
    if m == 0 or n == 0:
        return out
    if k == 0:
        if not accumulate:
            out[...] = 0
        return out
    if path == "emulated":
        return _emulated(a, b, out, trans_a, trans_b, accumulate)
    return _native(a, b, out, trans_a, trans_b, accumulate, m, n, k)


def bf16_operand_ref(x):
    """x (float32) rounded to bf16 as the kernels read it, as float64 values: round to nearest
    even (kernels.bf16's NumPy twin), a NaN stays NaN, a bf16 denormal counts as a signed zero."""
    q = bf16_round_ref(x)
    q = np.where((q & 0x7F80) == 0, q & 0x8000, q).astype(np.uint16)
    return bf16_widen_ref(q).astype(np.float64)


def gemm_bf16_ref(a, b, out=None, trans_a=False, trans_b=False, accumulate=False):
    """NumPy reference twin (tests only): operands rounded as gemm_bf16 rounds them, products
    summed in float64, sums below float32's smallest normal flushed to zero, cast to float32."""
    ra = bf16_operand_ref(a)
    rb = bf16_operand_ref(b)
    with np.errstate(invalid="ignore", over="ignore"):   # inf * 0 is NaN, as in the kernel
        s = (ra.T if trans_a else ra) @ (rb.T if trans_b else rb)
    s[np.abs(s) < FLT_MIN] = 0.0
    if out is None:
        return s.astype(np.float32)
    if accumulate:
        with np.errstate(invalid="ignore", over="ignore"):
            out[...] = (out.astype(np.float64) + s).astype(np.float32)
    else:
        out[...] = s.astype(np.float32)
    return out
