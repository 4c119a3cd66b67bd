"""Parallel building blocks no single kernel owns: a shared work counter, a masked copy that
sums what it copies, reductions of per-thread partials and column sums (used by the
convolution paths and Linear)."""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic


@intrinsic
def take(typingctx, counter):
    """Atomically counter[0] += 1, returning the old value: the next unit of work. Threads that
    take units from one counter share work by arrival, so a core slowed by other processes
    holds up nobody."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", ary.data, ir.Constant(ir.IntType(64), 1), "monotonic")

    return sig, codegen


@njit(fastmath={"reassoc", "nsz"}, cache=True)
def mask_copy_sum(src, yr, dst, relu):
    # dst = src where yr > 0 (relu) else src; returns the float64 sum of dst (reassociated so
    # the sum vectorises; the "<= 0" test is exact and lets a NaN output pass, as relu_backward)
    acc = 0.0
    if relu:
        for p in range(src.size):
            v = 0.0 if yr[p] <= 0.0 else src[p]
            dst[p] = v
            acc += v
    else:
        for p in range(src.size):
            v = src[p]
            dst[p] = v
            acc += v
    return acc


@njit(parallel=True, cache=True)
def sum_parts(dst, parts):
    # dst (+)= sum of the rows of parts, in column stripes so each thread owns its stripe
    size = dst.size
    step = 4096
    for s in prange((size + step - 1) // step):
        lo = s * step
        hi = min(size, lo + step)
        for r in range(parts.shape[0]):
            src = parts[r]
            for i in range(lo, hi):
                dst[i] += src[i]


@njit(parallel=True, cache=True)
def column_sums(dy, db, accumulate):
    # dy: (N, out) ; db: (out,) accumulated (or overwritten) ; each task owns one column block of db
    # and sums its rows in order, so the result does not depend on the thread count
    # (the bias gradient of Linear and of the direct convolution)
    n, m = dy.shape
    nblk = (m + 63) // 64
    for blk in prange(nblk):
        j0 = blk * 64
        j1 = min(m, j0 + 64)
        acc = np.zeros(j1 - j0, dtype=np.float64)
        for i in range(n):
            row = dy[i, j0:j1]
            for j in range(j1 - j0):
                acc[j] += row[j]
        for j in range(j1 - j0):
            if accumulate:
                db[j0 + j] += acc[j]
            else:
                db[j0 + j] = acc[j]
