"""Path `blocked`: float32 conv2d fused per cache block (im2col block -> GEMM -> bias/ReLU) in
one parallel region; any groups, stride and channel counts.

Each thread walks its own blocks of output rows:

    forward   cols = im2col(block)           (K, width)       stays in L2/L3
              yb   = W @ cols                serial GEMM, same thread
              y[block] = relu(yb + b)        while yb is hot
    backward  dyb  = relu mask(dy[block]), db partial summed in the same pass
              dW_t += dyb @ cols.T           per-thread partial, reduced at the end
              cols = W.T @ dyb ; col2im into the thread's padded image accumulator

A block is either a run of output rows of one image (large planes: conv1, conv2) or a run of
whole images (small planes: conv3-5), about BLOCK_COLS columns either way. Backward gives each
thread whole images so the input gradient has a single writer. Scratch buffers are kept per
Python thread across calls, so their pages are not faulted in afresh on every call.
Why: the batched path's column matrix for a whole chunk, a parallel GEMM over it and separate
reorder passes spent most of their time on memory traffic and parallel hand-offs.
"""
import threading

import numpy as np
from numba import njit, prange

from minialex.kernels.conv import grads
from minialex.kernels.conv.im2col import col2im_rows, im2col_rows
from minialex.kernels.conv.layout import padded_to_image, split_width
from minialex.kernels.gemm import MC, NR, SMALL_M, gemm32_slab, pack_a_blocks, packed_a_size
from minialex.kernels.parallel import mask_copy_sum, sum_parts, take

# Columns per block: wide enough that each block's GEMM calls (and the column block's own
# packing) are a few percent of its arithmetic, narrow enough that the column block stays in
# cache (the weights are packed once per call, not per block): at most
# BLOCK_COLS columns and BLOCK_BYTES of columns.
BLOCK_COLS = 1024
BLOCK_BYTES = 5 * 1024 * 1024

# Forward reads the column block in place (no packing) only for up to this many output
# channels per group (packing pays off above it).
INPLACE_MAX_COUT = 192

_local = threading.local()


def _scratch(name, rows, size):
    """A (rows, >= size) float32 array kept across calls, every row 64-byte aligned."""
    stride = (size + 15) // 16 * 16
    cache = getattr(_local, "bufs", None)
    if cache is None:
        cache = _local.bufs = {}
    raw = cache.get(name)
    if raw is None or raw.size < rows * stride + 16:
        raw = cache[name] = np.empty(rows * stride + 16, dtype=np.float32)
    off = (-raw.ctypes.data % 64) // 4
    return raw[off:off + rows * stride].reshape(rows, stride)


def _block_cols(k_rows):
    return max(1, min(BLOCK_COLS, BLOCK_BYTES // (4 * k_rows)))


def _leading_dim(width):
    # whole 16-lane rows (aligned in-place GEMM panels) with room for im2col_rows' overrun
    return (width + 15) // 16 * 16 + 16


def _blocks(n, oh, ow, block_cols, nthreads):
    """Blocks (n0, n1, r0, r1): rows r0..r1 of every image n0..n1, in image order.

    Large planes are cut into row blocks (at least nthreads of them in all, so one image at
    inference still feeds every thread); small planes are grouped into a multiple of nthreads
    runs of whole images, so the runs share out evenly.
    """
    out = []
    plane = oh * ow
    if plane >= block_cols or n < nthreads:
        nb = max(1, -(-plane // block_cols))
        if n < nthreads:
            nb = -(-nb * n // nthreads) * nthreads // n
        rows = -(-oh // min(oh, nb))
        for i in range(n):
            for r0 in range(0, oh, rows):
                out.append((i, i + 1, r0, min(oh, r0 + rows)))
    else:
        groups = -(-n // max(1, block_cols // plane))
        groups = min(n, -(-groups // nthreads) * nthreads)
        per = -(-n // groups)
        for n0 in range(0, n, per):
            out.append((n0, min(n, n0 + per), 0, oh))
    return out


def _plan(n, oh, ow, nthreads, block_cols, whole_images):
    """(blocks as an (nb, 4) int64 array, units, widest block's columns, most rows in a block).

    In forward, threads take work units u = blocks units[u]..units[u+1] from a shared counter
    (a static split made both threads wait for whichever core the other processes of a busy
    machine were using); backward deals them round-robin, because its per-thread dW and db
    partials must not depend on timing (reproducible runs). whole_images: a unit holds every block of its images (backward: one writer
    per input-gradient image); otherwise each block is a unit.
    """
    blocks = _blocks(n, oh, ow, block_cols, nthreads)
    units = [0]
    for i in range(1, len(blocks) + 1):
        if not whole_images or i == len(blocks) or blocks[i][0] != blocks[i - 1][0]:
            units.append(i)
    arr = np.array(blocks, dtype=np.int64).reshape(-1, 4)
    widest = int(max((b[1] - b[0]) * (b[3] - b[2]) for b in blocks)) * ow
    rows = int(max(b[3] - b[2] for b in blocks))
    return arr, np.array(units, dtype=np.int64), widest, rows


@njit(parallel=True, cache=True)
def _forward_kernel(x, w2f, wpk, wmcb, bias, relu, y3, geo, blocks, units, counter, ld, cols_ws, yb_ws, buf_ws):
    # x: (N, Cin, H, W) ; w2f: (Cout*K/g,) weights as rows of K/g ; bias: (Cout,) ; y3: (N, Cout, OH*OW)
    # geo: layout.Geometry ; blocks: (nb, 4) of (n0, n1, r0, r1) ; units: see _plan ; counter: (1,) zero
    # cols_ws: (T, >= K*ld) ; yb_ws: (T, >= Cout*ld) ; buf_ws: (T, im2col_rows scratch)
    for t in prange(cols_ws.shape[0]):
        cols = cols_ws[t]
        yb = yb_ws[t]
        buf = buf_ws[t]
        while True:
            u = take(counter)
            if u >= units.size - 1:
                break
            _forward_unit(x, w2f, wpk, wmcb, bias, relu, y3, geo, blocks, units[u], units[u + 1], ld, cols, yb, buf)


@njit(cache=True)
def _forward_unit(x, w2f, wpk, wmcb, bias, relu, y3, geo, blocks, b_lo, b_hi, ld, cols, yb, buf):
    # blocks b_lo..b_hi: unfold into cols, multiply into yb, add bias (and rectify) into y3
    # wpk: every group's weights packed by _pack_weights_gemm_blocks in blocks of wmcb rows, gsize per group
    kh, kw, sh, sw, ph, pw, ow_n, groups = geo.kh, geo.kw, geo.sh, geo.sw, geo.ph, geo.pw, geo.ow, geo.groups
    cout = y3.shape[1]
    kg = w2f.size // cout
    cg = cout // groups
    gsize = wpk.size // groups
    for bi in range(b_lo, b_hi):
        n0, n1, r0, r1 = blocks[bi, 0], blocks[bi, 1], blocks[bi, 2], blocks[bi, 3]
        run = (r1 - r0) * ow_n
        for n in range(n0, n1):
            im2col_rows(x[n], buf, cols, ld, (n - n0) * run, r0, r1, kh, kw, sh, sw, ph, pw, ow_n)
        width = (n1 - n0) * run
        inplace = cg <= INPLACE_MAX_COUT and width >= NR
        for g in range(groups):
            gemm32_slab(w2f, kg, False, cols[g * kg * ld:], ld, False, yb, ld,
                         g * cg, (g + 1) * cg, 0, width, kg, False, inplace, wpk[g * gsize:], wmcb)
        for n in range(n0, n1):
            for co in range(cout):
                s = yb[co * ld + (n - n0) * run:]
                d = y3[n, co, r0 * ow_n:r1 * ow_n]
                bv = bias[co]
                if relu:
                    for p in range(run):
                        v = s[p] + bv
                        d[p] = 0.0 if v <= 0.0 else v  # as relu_forward: NaN passes
                else:
                    for p in range(run):
                        d[p] = s[p] + bv


@njit(parallel=True, cache=True)
def _backward_kernel(dy3, yr3, relu, x, wtf, wtpk, dw2f, accumulate, dw_parts, db_parts, dx, need_dx,
                     geo, blocks, units, ld, cols_ws, dyb_ws, buf_ws, acc_ws):
    # dy3, yr3: (N, Cout, OH*OW) ; x, dx: (N, Cin, H, W) ; dw2f: (Cout*K/g,) rows of K/g
    # wtf: (groups*K/g*Cout/g,) each group's weights transposed to (K/g, Cout/g)
    # thread 0 accumulates dW into dw2f, thread t > 0 into dw_parts[t-1] (summed afterwards)
    # db_parts: (T, Cout) float64, overwritten ; acc_ws: (T, padded image accumulators)
    # units hold whole images (see _plan), so each dx image has one writer
    cout = dy3.shape[1]
    nthr = cols_ws.shape[0]
    for t in prange(nthr):
        dwt = dw2f if t == 0 else dw_parts[t - 1]
        add = accumulate if t == 0 else False
        for co in range(cout):
            db_parts[t, co] = 0.0
        # Units are dealt round-robin, not taken from the counter as in forward: which units
        # a thread sums into its dW and db partials must not depend on timing, or two runs
        # with the same seed and thread count would differ in the last bits.
        for u in range(t, units.size - 1, nthr):
            _backward_unit(dy3, yr3, relu, x, wtf, wtpk, dwt, add, db_parts[t], dx, need_dx,
                           geo, blocks, units[u], units[u + 1], ld, cols_ws[t], dyb_ws[t], buf_ws[t], acc_ws[t])
            add = True
        if not add:
            dwt[:] = 0.0  # this thread got no work: its share of dW is zero


@njit(cache=True)
def _backward_unit(dy3, yr3, relu, x, wtf, wtpk, dwt, add, db, dx, need_dx,
                   geo, blocks, b_lo, b_hi, ld, cols, dyb, buf, acc):
    # blocks b_lo..b_hi: dW (+)= into dwt, db += into db (float64), dx of their images
    kh, kw, sh, sw, ph, pw, oh_n, ow_n, groups = (geo.kh, geo.kw, geo.sh, geo.sw, geo.ph, geo.pw,
                                                  geo.oh, geo.ow, geo.groups)
    cout = dy3.shape[1]
    n_ch, h, w = x.shape[1], x.shape[2], x.shape[3]
    kg = wtf.size // cout
    cg = cout // groups
    hp = h + 2 * ph
    wq = split_width(w, pw, sw, kw)
    img_acc = n_ch * hp * sw * wq
    for bi in range(b_lo, b_hi):
        n0, n1, r0, r1 = blocks[bi, 0], blocks[bi, 1], blocks[bi, 2], blocks[bi, 3]
        run = (r1 - r0) * ow_n
        width = (n1 - n0) * run
        for n in range(n0, n1):
            for co in range(cout):
                src = dy3[n, co, r0 * ow_n:r1 * ow_n]
                yr = yr3[n, co, r0 * ow_n:r1 * ow_n]
                dst = dyb[co * ld + (n - n0) * run:co * ld + (n - n0 + 1) * run]
                db[co] += mask_copy_sum(src, yr, dst, relu)
            im2col_rows(x[n], buf, cols, ld, (n - n0) * run, r0, r1, kh, kw, sh, sw, ph, pw, ow_n)
        for g in range(groups):
            gemm32_slab(dyb[g * cg * ld:], ld, False, cols[g * kg * ld:], ld, True,
                         dwt[g * cg * kg:], kg, 0, cg, 0, kg, width, add, False, wtpk[:0], 0)
        add = True
        if not need_dx:
            continue
        # the columns are consumed: reuse the buffer for their gradient. The block of dy
        # is small and in cache, so it is read in place however many rows K/g has, and
        # the weights come pre-transposed: packing a transposed A is a scalar gather.
        gsize = wtpk.size // groups
        for g in range(groups):
            gemm32_slab(wtf[g * kg * cg:], cg, False, dyb[g * cg * ld:], ld, False,
                         cols[g * kg * ld:], ld, 0, kg, 0, width, cg, False, width >= NR,
                         wtpk[g * gsize:], SMALL_M)
        for n in range(n0, n1):
            a = acc[(n - n0) * img_acc:(n - n0 + 1) * img_acc]
            if r0 == 0:
                a[:] = 0.0
            col2im_rows(cols, ld, (n - n0) * run, a, r0, r1, n_ch, kh, kw, sh, sw, hp, wq, ow_n)
            if r1 == oh_n:
                padded_to_image(a, dx[n], ph, pw, sw, wq)


@njit(parallel=True, cache=True)
def _pack_weights_gemm_blocks(a, rows, k, groups, mcb, dst):
    # a: (groups*rows*k,) each group's (rows, k) operand ; dst: (groups * gsize,) packed for the
    # GEMM slab (pack_a_blocks), one group per task
    gsize = dst.size // groups
    for g in prange(groups):
        pack_a_blocks(a[g * rows * k:], k, False, 0, rows, k, mcb, dst[g * gsize:(g + 1) * gsize])


def _packed(a, rows, k, groups, mcb):
    """The weights as every column block's GEMM reads them, packed once per call (not per block)."""
    gsize = packed_a_size(rows, k, mcb)
    dst = _scratch("wpk", 1, groups * gsize)[0, :groups * gsize]
    _pack_weights_gemm_blocks(a, rows, k, groups, mcb, dst)
    return dst


def _scratch_rows(g, rows):
    """Per-thread scratch for im2col_rows' phase-split input rows of a block of `rows` output rows."""
    return ((rows - 1) * g.sh + g.kh) * g.sw * split_width(g.w, g.pw, g.sw, g.kw) + 16


def forward(x, w, b, g, relu, nthreads):
    """Path `blocked`, forward: y = conv2d(x, w, b) (rectified when relu), float32."""
    kg = g.cin_g * g.kh * g.kw
    cout, groups = g.cout, g.groups
    blocks, units, widest, rows = _plan(g.n, g.oh, g.ow, nthreads, _block_cols(g.cin * g.kh * g.kw), False)
    ld = _leading_dim(widest)
    cols = _scratch("cols", nthreads, g.cin * g.kh * g.kw * ld + 16)
    yb = _scratch("out", nthreads, cout * ld)
    buf = _scratch("rows", nthreads, _scratch_rows(g, rows))
    bias = np.zeros(cout, np.float32) if b is None else np.ascontiguousarray(b, dtype=np.float32)
    y = np.empty((g.n, cout, g.oh, g.ow), dtype=np.float32)
    w2f = np.ascontiguousarray(w).reshape(-1)
    # row blocks as the slab takes them: SMALL_M when it reads the columns in place
    wmcb = SMALL_M if cout // groups <= INPLACE_MAX_COUT else MC
    _forward_kernel(x, w2f, _packed(w2f, cout // groups, kg, groups, wmcb), wmcb, bias, relu,
                    y.reshape(g.n, cout, g.oh * g.ow), g, blocks, units, np.zeros(1, np.int64), ld, cols, yb, buf)
    return y


def backward(dy, x, w, dw, db, g, accumulate, need_dx, relu_out, nthreads):
    """Path `blocked`, backward (float32, at least one image per thread): dW (+)= into dw,
    db (+)= into db (or None); returns dx, or None when not need_dx."""
    n, cin, cout, groups = g.n, g.cin, g.cout, g.groups
    kg = g.cin_g * g.kh * g.kw
    if n < nthreads:
        raise ValueError(f"blocked conv backward needs at least one image per thread ({n} < {nthreads})")
    dw2, in_place = grads.weight_rows(dw, np.float32)
    blocks, units, widest, rows = _plan(n, g.oh, g.ow, nthreads, _block_cols(cin * g.kh * g.kw), True)
    ld = _leading_dim(widest)
    images = int(max(blocks[:, 1] - blocks[:, 0]))
    cols = _scratch("cols", nthreads, cin * g.kh * g.kw * ld + 16)
    dyb = _scratch("out", nthreads, cout * ld)
    buf = _scratch("rows", nthreads, _scratch_rows(g, rows))
    wq = split_width(g.w, g.pw, g.sw, g.kw)
    acc = _scratch("acc", nthreads, images * cin * (g.h + 2 * g.ph) * g.sw * wq + 16)
    parts = _scratch("dw", max(1, nthreads - 1), cout * kg)
    db_parts = np.empty((nthreads, cout), dtype=np.float64)
    plane = g.oh * g.ow
    dy3 = dy.reshape(n, cout, plane)
    yr3 = dy3 if relu_out is None else np.ascontiguousarray(relu_out).reshape(n, cout, plane)
    dx = np.empty(x.shape, dtype=np.float32) if need_dx else np.empty((1, 1, 1, 1), np.float32)
    dwf = dw2.reshape(-1)
    wt = np.ascontiguousarray(w.reshape(groups, cout // groups, kg).transpose(0, 2, 1))
    wtf = wt.reshape(-1)
    # the transposed weights are only read for the input gradient
    wtpk = _packed(wtf, kg, cout // groups, groups, SMALL_M) if need_dx else np.zeros(0, np.float32)
    _backward_kernel(dy3, yr3, relu_out is not None, x, wtf, wtpk, dwf,
                     accumulate and in_place, parts, db_parts, dx, need_dx, g,
                     blocks, units, ld, cols, dyb, buf, acc)
    if nthreads > 1:
        sum_parts(dwf, parts[:nthreads - 1, :cout * kg])
    grads.store(dw, dw2, in_place, db, db_parts.sum(axis=0), accumulate)
    return dx if need_dx else None
