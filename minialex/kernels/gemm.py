"""Packed, cache-blocked, register-tiled GEMM: C (+)= op(A) · op(B).

float32 (training) follows the Goto/BLIS loop nest:

    for jc in N by NC:                      (slab columns)
      for pc in K by KC:
        pack op(B)[pc:pc+kc, jc:jc+nc] -> bbuf  [32-column panel][k][32]   (L3)
        for ic in M by MC:
          pack op(A)[ic:ic+mc, pc:pc+kc] -> abuf [8-row panel][k][8]       (L2)
          for jr in nc by 32:               (one B micro-panel stays in L1)
            for ir in mc by 8:
              8x32 micro-kernel: 16 `<16 x float>` accumulators, per k step
              2 vector loads of B, 8 broadcasts of A, 16 FMAs

Packed buffers are zero-padded to whole panels and 64-byte aligned (Numba's
allocations are not, and panels that split cache lines ran 1.5-2.5x slower).
Transposed operands are handled by the packing routines (in-register 8x16
transposes where k runs along memory rows), never materialised.  Tiles at the
right/bottom edge are computed into an 8x32 scratch tile and copied out.

When M is small (conv1, the FC layers at small batch) packing B costs as much
as the arithmetic it feeds, so with B not transposed and M <= SMALL_M the
micro-kernel reads B in place, row stride ldb, prefetching the same rows of the
micro-panel two panels to the right (a whole micro-kernel call ahead: B rows are
far apart, so prefetching down the panel came too late or thrashed).

Two threads: `prange` over slabs of C split along the larger of M and N, each
running the serial nest above with its own buffers.

float64 is for gradient checks only: a plain blocked kernel on contiguous
copies of op(A), op(B), vectorised by LLVM along the rows of C.

Every entry point receives its operands as flat 1-D views with a leading
dimension (elements between rows), so one compiled specialisation per dtype
covers contiguous arrays, row-strided views and transposes alike.
"""
import numba
import numpy as np
from numba import njit, prange

from .simd import prefetch, vadd, vbroadcast, vfma, vhsum, vload, vstore, vtranspose_8x16, vzero

MR = 8          # micro-tile rows (broadcast A values)
NR = 32         # micro-tile columns (two 16-lane vectors)
MC = 192        # rows of A per packed block:     192 x 384 x 4 B = 288 KiB, in L2
KC = 384        # depth per packed block
NC = 1024       # columns of B per packed block:  384 x 1024 x 4 B = 1.5 MiB, in L3
SMALL_M = 384   # at most this many rows (per call): B is read in place instead of packed
PREFETCH_AHEAD = 64  # columns ahead (two micro-panels) to prefetch when B is read in place
C_PREFETCH_AT = 32   # k steps before the end of a micro-kernel call to prefetch its C tile
PACK_PREFETCH = 64   # elements ahead along each row of a transposed B while packing
PAR_MIN_FLOPS = 4_000_000  # below this a second thread costs more than it saves
_NO_PACKED_A = np.empty(0, dtype=np.float32)  # the apk argument of a slab that packs A itself
DOT_PREFETCH = 128  # elements ahead on each weight row in the dot kernel
DOT_MAX_M = 8  # A·Bᵀ with at most this many rows (an FC layer at small batch) uses the dot kernel


@njit(cache=True)
def aligned_f32(n):
    """A float32 buffer of n elements whose data pointer is 64-byte aligned."""
    raw = np.empty(n + 16, dtype=np.float32)
    off = ((64 - raw.ctypes.data % 64) % 64) // 4
    return raw[off:off + n]


@njit(inline="always", cache=True)
def store_tile_8x32(c, c_off, ldc, add, c00, c01, c10, c11, c20, c21, c30, c31,
                    c40, c41, c50, c51, c60, c61, c70, c71):
    # the epilogue of every 8x32 micro-kernel (the GEMM's, the direct convolution's):
    # C tile rows r at c_off + r*ldc, 32 wide, = accumulators (add: += ); inlined into the caller
    if add:
        c00 = vadd(c00, vload(c, c_off)); c01 = vadd(c01, vload(c, c_off + 16))
        c10 = vadd(c10, vload(c, c_off + ldc)); c11 = vadd(c11, vload(c, c_off + ldc + 16))
        c20 = vadd(c20, vload(c, c_off + 2 * ldc)); c21 = vadd(c21, vload(c, c_off + 2 * ldc + 16))
        c30 = vadd(c30, vload(c, c_off + 3 * ldc)); c31 = vadd(c31, vload(c, c_off + 3 * ldc + 16))
        c40 = vadd(c40, vload(c, c_off + 4 * ldc)); c41 = vadd(c41, vload(c, c_off + 4 * ldc + 16))
        c50 = vadd(c50, vload(c, c_off + 5 * ldc)); c51 = vadd(c51, vload(c, c_off + 5 * ldc + 16))
        c60 = vadd(c60, vload(c, c_off + 6 * ldc)); c61 = vadd(c61, vload(c, c_off + 6 * ldc + 16))
        c70 = vadd(c70, vload(c, c_off + 7 * ldc)); c71 = vadd(c71, vload(c, c_off + 7 * ldc + 16))
    vstore(c, c_off, c00); vstore(c, c_off + 16, c01)
    vstore(c, c_off + ldc, c10); vstore(c, c_off + ldc + 16, c11)
    vstore(c, c_off + 2 * ldc, c20); vstore(c, c_off + 2 * ldc + 16, c21)
    vstore(c, c_off + 3 * ldc, c30); vstore(c, c_off + 3 * ldc + 16, c31)
    vstore(c, c_off + 4 * ldc, c40); vstore(c, c_off + 4 * ldc + 16, c41)
    vstore(c, c_off + 5 * ldc, c50); vstore(c, c_off + 5 * ldc + 16, c51)
    vstore(c, c_off + 6 * ldc, c60); vstore(c, c_off + 6 * ldc + 16, c61)
    vstore(c, c_off + 7 * ldc, c70); vstore(c, c_off + 7 * ldc + 16, c71)


@njit(cache=True)
def _micro_8x32(kc, ap, a_off, bp, b_off, b_ld, pf, c, c_off, ldc, add):
    # ap: packed A panel, [kc][8] from a_off;  bp: B micro-panel, row p at b_off + p*b_ld (32 wide)
    # c: C tile, row r at c_off + r*ldc (32 wide); add: C += tile, else C = tile
    # pf: prefetch B PREFETCH_AHEAD columns ahead on each row (B read in place from memory)
    c00 = vzero(); c01 = vzero(); c10 = vzero(); c11 = vzero()
    c20 = vzero(); c21 = vzero(); c30 = vzero(); c31 = vzero()
    c40 = vzero(); c41 = vzero(); c50 = vzero(); c51 = vzero()
    c60 = vzero(); c61 = vzero(); c70 = vzero(); c71 = vzero()
    pa = a_off
    pb = b_off
    pfo = PREFETCH_AHEAD
    pfc = kc - C_PREFETCH_AT
    for it in range(kc):
        if it == pfc:
            # bring the C tile in while the last k steps run: its 16 lines are in L3 or memory,
            # and loading them only after the loop stalled every call (about 8% of a GEMM)
            for r in range(MR):
                prefetch(c, c_off + r * ldc)
                prefetch(c, c_off + r * ldc + 16)
        if pf:
            prefetch(bp, pb + pfo)
            prefetch(bp, pb + pfo + 16)
        b0 = vload(bp, pb)
        b1 = vload(bp, pb + 16)
        a = vbroadcast(ap, pa)
        c00 = vfma(a, b0, c00); c01 = vfma(a, b1, c01)
        a = vbroadcast(ap, pa + 1)
        c10 = vfma(a, b0, c10); c11 = vfma(a, b1, c11)
        a = vbroadcast(ap, pa + 2)
        c20 = vfma(a, b0, c20); c21 = vfma(a, b1, c21)
        a = vbroadcast(ap, pa + 3)
        c30 = vfma(a, b0, c30); c31 = vfma(a, b1, c31)
        a = vbroadcast(ap, pa + 4)
        c40 = vfma(a, b0, c40); c41 = vfma(a, b1, c41)
        a = vbroadcast(ap, pa + 5)
        c50 = vfma(a, b0, c50); c51 = vfma(a, b1, c51)
        a = vbroadcast(ap, pa + 6)
        c60 = vfma(a, b0, c60); c61 = vfma(a, b1, c61)
        a = vbroadcast(ap, pa + 7)
        c70 = vfma(a, b0, c70); c71 = vfma(a, b1, c71)
        pa += MR
        pb += b_ld
    store_tile_8x32(c, c_off, ldc, add, c00, c01, c10, c11, c20, c21, c30, c31,
                    c40, c41, c50, c51, c60, c61, c70, c71)


@njit(cache=True)
def _pack_b32(b, ldb, tb, pc, kc, j_lo, j_hi, dst, dst_off):
    # b: op(B)[k, j] = b[k*ldb + j] (tb False) or b[j*ldb + k] (tb True)
    # dst: [panel of 32 columns][kc][32] from dst_off, columns j_lo..j_hi zero-padded to 32s
    q = 0
    for j0 in range(j_lo, j_hi, NR):
        w = min(NR, j_hi - j0)
        base = dst_off + q * kc * NR
        q += 1
        if not tb:
            if w == NR:
                for p in range(kc):
                    s = (pc + p) * ldb + j0
                    d = base + p * NR
                    vstore(dst, d, vload(b, s))
                    vstore(dst, d + 16, vload(b, s + 16))
            else:
                for p in range(kc):
                    s = (pc + p) * ldb + j0
                    d = base + p * NR
                    for jj in range(w):
                        dst[d + jj] = b[s + jj]
                    for jj in range(w, NR):
                        dst[d + jj] = 0.0
        else:
            p0 = 0
            if w == NR:
                # k runs along memory rows of b: 8 columns x 16 k per register transpose
                while p0 + 16 <= kc:
                    for jj in range(NR):
                        prefetch(b, (j0 + jj) * ldb + pc + p0 + PACK_PREFETCH)
                    for g in range(4):
                        vtranspose_8x16(b, (j0 + 8 * g) * ldb + pc + p0, ldb,
                                        dst, base + p0 * NR + 8 * g, NR)
                    p0 += 16
            for p in range(p0, kc):
                d = base + p * NR
                for jj in range(w):
                    dst[d + jj] = b[(j0 + jj) * ldb + pc + p]
                for jj in range(w, NR):
                    dst[d + jj] = 0.0


@njit(cache=True)
def _pack_a32(a, lda, ta, ic, mc, pc, kc, dst):
    # a: op(A)[i, k] = a[i*lda + k] (ta False) or a[k*lda + i] (ta True)
    # dst: [panel of 8 rows][kc][8], rows ic..ic+mc zero-padded to 8s
    q = 0
    for i0 in range(ic, ic + mc, MR):
        h = min(MR, ic + mc - i0)
        base = q * kc * MR
        q += 1
        if not ta:
            p0 = 0
            if h == MR:
                # k runs along memory rows of a: one register transpose per 8 x 16 block
                while p0 + 16 <= kc:
                    vtranspose_8x16(a, i0 * lda + pc + p0, lda, dst, base + p0 * MR, MR)
                    p0 += 16
            for p in range(p0, kc):
                d = base + p * MR
                for r in range(h):
                    dst[d + r] = a[(i0 + r) * lda + pc + p]
                for r in range(h, MR):
                    dst[d + r] = 0.0
        elif h == MR:
            for p in range(kc):     # a constant-length copy: one 256-bit move per k
                d = base + p * MR
                s = (pc + p) * lda + i0
                for r in range(MR):
                    dst[d + r] = a[s + r]
        else:
            for p in range(kc):
                d = base + p * MR
                s = (pc + p) * lda + i0
                for r in range(h):
                    dst[d + r] = a[s + r]
                for r in range(h, MR):
                    dst[d + r] = 0.0


@njit(cache=True)
def packed_a_size(m, k, mcb):
    """Elements of pack_a_blocks' output for an m x k operand in blocks of mcb rows."""
    return ((m + mcb - 1) // mcb) * ((k + KC - 1) // KC) * mcb * KC


@njit(cache=True)
def pack_a_blocks(a, lda, ta, m0, m1, k, mcb, dst):
    # op(A)[m0:m1, :k] packed once, block by block, for gemm32_slab(..., dst, mcb) ; mcb: MC, or
    # SMALL_M for a slab that reads B in place ; dst: 64-byte aligned, packed_a_size(m1 - m0, k,
    # mcb) elements; block (ic, pc) of mcb x KC at ((ic // mcb) * nkb + pc // KC) * mcb * KC,
    # laid out as _pack_a32 writes it.
    # A convolution's weights are the A operand of every column block of a call: packing them
    # once instead of once per block saves re-reading and re-writing them (3.5 MB for conv4).
    nkb = (k + KC - 1) // KC
    for ic in range(m0, m1, mcb):
        mc = min(mcb, m1 - ic)
        for pc in range(0, k, KC):
            kc = min(KC, k - pc)
            off = (((ic - m0) // mcb) * nkb + pc // KC) * mcb * KC
            _pack_a32(a, lda, ta, ic, mc, pc, kc, dst[off:])


@njit(cache=True)
def gemm32_slab(a, lda, ta, b, ldb, tb, c, ldc, m0, m1, n0, n1, k, accumulate, inplace,
                 apk, pk_mcb):
    # a, b: flat float32 operands (see _pack_a32/_pack_b32); c: flat C, row stride ldc
    # computes C[m0:m1, n0:n1] (+)= op(A)[m0:m1, :] @ op(B)[:, n0:n1]
    # inplace: B not transposed and m1 - m0 <= SMALL_M: full B micro-panels are read where they lie
    # pk_mcb > 0: apk holds pack_a_blocks(a, lda, ta, m0, m1, k, pk_mcb) and a is not read
    prepacked = pk_mcb > 0
    mcb = pk_mcb if prepacked else (SMALL_M if inplace else MC)
    nkb = (k + KC - 1) // KC
    abuf = aligned_f32(MR if prepacked else mcb * KC)
    bbuf = aligned_f32(KC * (NR if inplace else NC))
    tile = aligned_f32(MR * NR)
    for jc in range(n0, n1, NC):
        nc = min(NC, n1 - jc)
        nfull = nc - nc % NR if inplace else 0  # columns read in place
        for pc in range(0, k, KC):
            kc = min(KC, k - pc)
            if nfull < nc:
                _pack_b32(b, ldb, tb, pc, kc, jc + nfull, jc + nc, bbuf, 0)
            add = accumulate or pc > 0
            for ic in range(m0, m1, mcb):
                mc = min(mcb, m1 - ic)
                if prepacked:
                    ap = apk
                    abase = (((ic - m0) // mcb) * nkb + pc // KC) * mcb * KC
                else:
                    _pack_a32(a, lda, ta, ic, mc, pc, kc, abuf)
                    ap = abuf
                    abase = 0
                for jr in range(0, nc, NR):
                    w = min(NR, nc - jr)
                    boff = ((jr - nfull) // NR) * kc * NR
                    for ir in range(0, mc, MR):
                        h = min(MR, mc - ir)
                        aoff = abase + (ir // MR) * kc * MR
                        coff = (ic + ir) * ldc + jc + jr
                        if jr < nfull:
                            # full-width panel read in place (h < 8 goes via the tile)
                            if h == MR:
                                _micro_8x32(kc, ap, aoff, b, pc * ldb + jc + jr, ldb, True,
                                            c, coff, ldc, add)
                                continue
                            _micro_8x32(kc, ap, aoff, b, pc * ldb + jc + jr, ldb, True,
                                        tile, 0, NR, False)
                        elif h == MR and w == NR:
                            _micro_8x32(kc, ap, aoff, bbuf, boff, NR, False, c, coff, ldc, add)
                            continue
                        else:
                            _micro_8x32(kc, ap, aoff, bbuf, boff, NR, False, tile, 0, NR, False)
                        for r in range(h):
                            for jj in range(w):
                                if add:
                                    c[coff + r * ldc + jj] += tile[r * NR + jj]
                                else:
                                    c[coff + r * ldc + jj] = tile[r * NR + jj]


@njit(cache=True)
def gemm32_panels(a, lda, ta, m, k, bp, n, c, ldc, abuf):
    # C[0:m8, 0:n] = A[0:m, 0:k] @ B, m8 = m rounded up to 8 (its extra rows are zero), n in 32s
    # a: flat, A[i, p] = a[i*lda + p] (ta False) or a[p*lda + i] (ta True) ; c: flat, row stride
    # ldc, m8 rows writable
    # bp: B as 32-column panels, B[p, 32q + j] = bp[(q*k + p)*32 + j] (written once by the caller,
    #     e.g. transformed weights): the micro-kernel streams them contiguously, which measured
    #     1.4-1.6x reading the same B in place row by row for m <= 64 (docs/performance.md)
    # abuf: 64-byte aligned scratch of at least m8 * min(k, KC) floats
    for pc in range(0, k, KC):
        kc = min(KC, k - pc)
        _pack_a32(a, lda, ta, 0, m, pc, kc, abuf)
        for ir in range(0, m, MR):
            for q in range(n // NR):
                _micro_8x32(kc, abuf, (ir // MR) * kc * MR, bp, (q * k + pc) * NR, NR, False,
                            c, ir * ldc + q * NR, ldc, pc > 0)


@njit(cache=True)
def gemm32_packed(ap, m, k, bp, n, c, ldc):
    # C[0:m8, 0:n] = A[0:m8, 0:k] @ B with both operands already packed by the caller, m8 = m
    # rounded up to 8, n in 32s ; c: flat, row stride ldc
    # ap: A as 8-row panels, A[8q + r, p] = ap[(q*k + p)*8 + r] (rows past m zero), written so by
    #     its producer (the Winograd weight gradient's transformed dY), so that no pass re-reads
    #     A to pack it ; bp: B as gemm32_panels takes it
    for pc in range(0, k, KC):
        kc = min(KC, k - pc)
        for ir in range(0, m, MR):
            for q in range(n // NR):
                _micro_8x32(kc, ap, ((ir // MR) * k + pc) * MR, bp, (q * k + pc) * NR, NR, False,
                            c, ir * ldc + q * NR, ldc, pc > 0)


@njit(parallel=True, cache=True)
def _gemm32_par(a, lda, ta, b, ldb, tb, c, ldc, m, n, k, accumulate, inplace, nslab, split_n):
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
                gemm32_slab(a, lda, ta, b, ldb, tb, c, ldc, 0, m, lo, hi, k, accumulate, inplace, np.empty(0, np.float32), 0)
        else:
            hi = min(m, lo + step)
            if lo < hi:
                gemm32_slab(a, lda, ta, b, ldb, tb, c, ldc, lo, hi, 0, n, k, accumulate, inplace, np.empty(0, np.float32), 0)


@njit(cache=True)
def _dot_8x3(a, lda, b, ldb, k, m, n, i0, j0, c, ldc, add):
    # C[i0:i0+8, j0:j0+3] (+)= A[i0:i0+8, :k] · B[j0:j0+3, :k]ᵀ, both operands read along k
    # a: row i at i*lda ; b: row j at j*ldb (an FC weight, streamed from memory exactly once)
    # rows past m and columns past n alias the last valid one; their results are not stored.
    # Three weight rows per pass, not two: each 16 values of the 8 input rows (read from L2)
    # serve 24 FMAs instead of 16 (fc6 forward at batch 8: 8.9 -> 7.8 ms).
    p0 = i0 * lda
    p1 = min(i0 + 1, m - 1) * lda
    p2 = min(i0 + 2, m - 1) * lda
    p3 = min(i0 + 3, m - 1) * lda
    p4 = min(i0 + 4, m - 1) * lda
    p5 = min(i0 + 5, m - 1) * lda
    p6 = min(i0 + 6, m - 1) * lda
    p7 = min(i0 + 7, m - 1) * lda
    q0 = j0 * ldb
    q1 = min(j0 + 1, n - 1) * ldb
    q2 = min(j0 + 2, n - 1) * ldb
    c00 = vzero(); c01 = vzero(); c02 = vzero(); c10 = vzero(); c11 = vzero(); c12 = vzero()
    c20 = vzero(); c21 = vzero(); c22 = vzero(); c30 = vzero(); c31 = vzero(); c32 = vzero()
    c40 = vzero(); c41 = vzero(); c42 = vzero(); c50 = vzero(); c51 = vzero(); c52 = vzero()
    c60 = vzero(); c61 = vzero(); c62 = vzero(); c70 = vzero(); c71 = vzero(); c72 = vzero()
    kv = k - k % 16
    for kk in range(0, kv, 16):
        # the weight rows stream from memory; the hardware prefetcher alone ramps up too
        # slowly on rows this short (fc6 at batch 8, two threads: 10.2 -> 8.5 ms)
        prefetch(b, q0 + kk + DOT_PREFETCH)
        prefetch(b, q1 + kk + DOT_PREFETCH)
        prefetch(b, q2 + kk + DOT_PREFETCH)
        w0 = vload(b, q0 + kk)
        w1 = vload(b, q1 + kk)
        w2 = vload(b, q2 + kk)
        x = vload(a, p0 + kk)
        c00 = vfma(x, w0, c00); c01 = vfma(x, w1, c01); c02 = vfma(x, w2, c02)
        x = vload(a, p1 + kk)
        c10 = vfma(x, w0, c10); c11 = vfma(x, w1, c11); c12 = vfma(x, w2, c12)
        x = vload(a, p2 + kk)
        c20 = vfma(x, w0, c20); c21 = vfma(x, w1, c21); c22 = vfma(x, w2, c22)
        x = vload(a, p3 + kk)
        c30 = vfma(x, w0, c30); c31 = vfma(x, w1, c31); c32 = vfma(x, w2, c32)
        x = vload(a, p4 + kk)
        c40 = vfma(x, w0, c40); c41 = vfma(x, w1, c41); c42 = vfma(x, w2, c42)
        x = vload(a, p5 + kk)
        c50 = vfma(x, w0, c50); c51 = vfma(x, w1, c51); c52 = vfma(x, w2, c52)
        x = vload(a, p6 + kk)
        c60 = vfma(x, w0, c60); c61 = vfma(x, w1, c61); c62 = vfma(x, w2, c62)
        x = vload(a, p7 + kk)
        c70 = vfma(x, w0, c70); c71 = vfma(x, w1, c71); c72 = vfma(x, w2, c72)
    sums = np.empty((8, 3), dtype=np.float32)
    sums[0, 0] = vhsum(c00); sums[0, 1] = vhsum(c01); sums[0, 2] = vhsum(c02)
    sums[1, 0] = vhsum(c10); sums[1, 1] = vhsum(c11); sums[1, 2] = vhsum(c12)
    sums[2, 0] = vhsum(c20); sums[2, 1] = vhsum(c21); sums[2, 2] = vhsum(c22)
    sums[3, 0] = vhsum(c30); sums[3, 1] = vhsum(c31); sums[3, 2] = vhsum(c32)
    sums[4, 0] = vhsum(c40); sums[4, 1] = vhsum(c41); sums[4, 2] = vhsum(c42)
    sums[5, 0] = vhsum(c50); sums[5, 1] = vhsum(c51); sums[5, 2] = vhsum(c52)
    sums[6, 0] = vhsum(c60); sums[6, 1] = vhsum(c61); sums[6, 2] = vhsum(c62)
    sums[7, 0] = vhsum(c70); sums[7, 1] = vhsum(c71); sums[7, 2] = vhsum(c72)
    for r in range(min(8, m - i0)):
        pa = min(i0 + r, m - 1) * lda
        for s in range(min(3, n - j0)):
            pb = (j0 + s) * ldb
            v = sums[r, s]
            for kk in range(kv, k):
                v += a[pa + kk] * b[pb + kk]
            if add:
                c[(i0 + r) * ldc + j0 + s] += v
            else:
                c[(i0 + r) * ldc + j0 + s] = v


@njit(cache=True)
def _dot_1x4(a, b, ldb, k, n, j0, c, add):
    # c[j0:j0+4] (+)= a[:k] · B[j0:j0+4, :k]ᵀ for one input row (inference at batch 1): the 8x3
    # kernel would do eight times the FMAs it needs; four weight rows, two accumulators each,
    # keep enough loads in flight (fc6 forward at batch 1, two threads: 4.0 -> 3.2 ms)
    q0 = j0 * ldb
    q1 = min(j0 + 1, n - 1) * ldb
    q2 = min(j0 + 2, n - 1) * ldb
    q3 = min(j0 + 3, n - 1) * ldb
    c0 = vzero(); c1 = vzero(); c2 = vzero(); c3 = vzero()
    d0 = vzero(); d1 = vzero(); d2 = vzero(); d3 = vzero()
    kv = k - k % 32
    for kk in range(0, kv, 32):
        prefetch(b, q0 + kk + 2 * DOT_PREFETCH)
        prefetch(b, q1 + kk + 2 * DOT_PREFETCH)
        prefetch(b, q2 + kk + 2 * DOT_PREFETCH)
        prefetch(b, q3 + kk + 2 * DOT_PREFETCH)
        x = vload(a, kk)
        y = vload(a, kk + 16)
        c0 = vfma(x, vload(b, q0 + kk), c0); d0 = vfma(y, vload(b, q0 + kk + 16), d0)
        c1 = vfma(x, vload(b, q1 + kk), c1); d1 = vfma(y, vload(b, q1 + kk + 16), d1)
        c2 = vfma(x, vload(b, q2 + kk), c2); d2 = vfma(y, vload(b, q2 + kk + 16), d2)
        c3 = vfma(x, vload(b, q3 + kk), c3); d3 = vfma(y, vload(b, q3 + kk + 16), d3)
    sums = (vhsum(c0) + vhsum(d0), vhsum(c1) + vhsum(d1), vhsum(c2) + vhsum(d2), vhsum(c3) + vhsum(d3))
    for t in range(min(4, n - j0)):
        v = sums[t]
        for kk in range(kv, k):
            v += a[kk] * b[(j0 + t) * ldb + kk]
        if add:
            c[j0 + t] += v
        else:
            c[j0 + t] = v


@njit(parallel=True, cache=True)
def _gemm32_dot1(a, b, ldb, c, n, k, accumulate, nparts):
    # c (n,) (+)= a (k,) · Bᵀ with B stored (n x k): each part owns a range of c
    quads = (n + 3) // 4
    step = (quads + nparts - 1) // nparts
    for part in prange(nparts):
        for jq in range(part * step, min(quads, (part + 1) * step)):
            _dot_1x4(a, b, ldb, k, n, 4 * jq, c, accumulate)


@njit(parallel=True, cache=True)
def _gemm32_dot(a, lda, b, ldb, c, ldc, m, n, k, accumulate, nparts):
    # C (m x n) (+)= A (m x k) · Bᵀ with B stored (n x k): each part owns a range of C's columns
    triples = (n + 2) // 3
    step = (triples + nparts - 1) // nparts
    for part in prange(nparts):
        for jt in range(part * step, min(triples, (part + 1) * step)):
            for i0 in range(0, m, 8):
                _dot_8x3(a, lda, b, ldb, k, m, n, i0, 3 * jt, c, ldc, accumulate)


@njit(cache=True)
def _gemm64(a, b, c, accumulate):
    # a: (M, K) C-contiguous; b: (K, N) C-contiguous; c: (M, N) C-contiguous
    m, k = a.shape
    n = b.shape[1]
    kb = 256
    nb = 512
    if not accumulate:
        for i in range(m):
            for j in range(n):
                c[i, j] = 0.0
    for j0 in range(0, n, nb):
        j1 = min(n, j0 + nb)
        for p0 in range(0, k, kb):
            p1 = min(k, p0 + kb)
            for i in range(m):
                for p in range(p0, p1):
                    aip = a[i, p]
                    for j in range(j0, j1):
                        c[i, j] += aip * b[p, j]


def flat_operand(x, trans):
    """(flat read-only 1-D view, leading dimension, trans) describing the 2-D operand x.

    op(x) is x or x.T.  A view whose unit stride is along axis 0 (x.T of a
    C-contiguous array, Fortran order) is re-described as its transpose with the
    flag flipped; an operand with no unit-stride axis is copied once.
    """
    item = x.itemsize
    rows, cols = x.shape
    s0, s1 = x.strides
    if cols > 1 and rows > 1 and s1 != item and s0 == item:
        x = x.T
        trans = not trans
        rows, cols = cols, rows
        s0, s1 = s1, s0
    if cols > 1 and s1 != item:
        x = np.ascontiguousarray(x)
        s0 = x.strides[0]
    if rows <= 1:
        ld = cols
    else:
        if s0 % item or s0 < 0:
            x = np.ascontiguousarray(x)
            s0 = x.strides[0]
        ld = s0 // item
    size = (rows - 1) * ld + cols if rows and cols else 0
    flat = np.lib.stride_tricks.as_strided(x, shape=(size,), strides=(item,), writeable=False)
    return flat, ld, trans


def check_operands(a, b, out, trans_a, trans_b):
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"gemm needs 2-D operands, got {a.ndim}-D and {b.ndim}-D")
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.float64):
        raise TypeError(f"gemm needs float32 or float64 operands of one dtype, got {a.dtype} and {b.dtype}")
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k2, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != k2:
        raise ValueError(f"gemm: inner dimensions differ: op(a) is {m}x{k}, op(b) is {k2}x{n}")
    if out is not None:
        if out.shape != (m, n) or out.dtype != a.dtype or not out.flags.c_contiguous:
            raise ValueError(f"gemm: out must be a C-contiguous {a.dtype} array of shape {(m, n)}, "
                             f"got {out.dtype} {out.shape} (C-contiguous={out.flags.c_contiguous})")
        if not out.flags.writeable:
            raise ValueError("gemm: out is read-only")
    return m, n, k


def gemm(a, b, out=None, trans_a=False, trans_b=False, accumulate=False):
    """out = op(a) @ op(b) (out += ... when accumulate); op = transpose when trans_*.

    a, b: 2-D float32 or float64 arrays of one dtype, any strides (views like
    w.reshape(...) or x.T are fine: transposes are absorbed into packing).
    out: optional C-contiguous 2-D array of the result dtype, not overlapping
    a or b; when None a new array is returned (and accumulate is ignored).
    Uses numba.get_num_threads() threads for large products. Returns out.
    """
    m, n, k = check_operands(a, b, out, trans_a, trans_b)
    if out is None:
        out = np.empty((m, n), dtype=a.dtype)
        accumulate = False
    if m == 0 or n == 0:
        return out
    if k == 0:
        if not accumulate:
            out[...] = 0
        return out
    if a.dtype == np.float64:
        a2 = np.ascontiguousarray(a.T if trans_a else a)
        b2 = np.ascontiguousarray(b.T if trans_b else b)
        _gemm64(a2, b2, out, accumulate)
        return out
    af, lda, ta = flat_operand(a, trans_a)
    bf, ldb, tb = flat_operand(b, trans_b)
    cf = out.reshape(-1)
    nthreads = numba.get_num_threads()
    if tb and not ta and m <= DOT_MAX_M:
        # x · Wᵀ at small batch: packing W would read its 151 MB (fc6) twice for a few FLOPs each
        nparts = nthreads if 2.0 * m * n * k >= PAR_MIN_FLOPS else 1
        if m == 1:
            _gemm32_dot1(af, bf, ldb, cf, n, k, accumulate, nparts)
        else:
            _gemm32_dot(af, lda, bf, ldb, cf, n, m, n, k, accumulate, nparts)
        return out
    inplace = (not tb) and m <= SMALL_M and n >= NR
    if nthreads > 1 and 2.0 * m * n * k >= PAR_MIN_FLOPS:
        split_n = n >= m
        nslab = min(nthreads, (n + NR - 1) // NR if split_n else (m + MR - 1) // MR)
        if nslab > 1:
            _gemm32_par(af, lda, ta, bf, ldb, tb, cf, n, m, n, k, accumulate, inplace, nslab, split_n)
            return out
    gemm32_slab(af, lda, ta, bf, ldb, tb, cf, n, 0, m, 0, n, k, accumulate, inplace, _NO_PACKED_A, 0)
    return out


def gemm_ref(a, b, out=None, trans_a=False, trans_b=False, accumulate=False):
    """NumPy reference twin (tests only)."""
    r = (a.T if trans_a else a) @ (b.T if trans_b else b)
    if out is None:
        return r
    if accumulate:
        out += r
    else:
        out[...] = r
    return out
