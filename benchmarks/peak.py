"""Peak float32 FMA throughput of this CPU as Numba reaches it, the yardstick for every GFLOP/s,
and beside it the bf16 dot-product peak (`vdpbf16ps`, 32 multiply-adds per instruction against the
FMA's 16) and the int8 one (`vpdpbusd`, 64 multiply-adds of u8 x s8 into int32): the arithmetic
ceilings a bf16 or int8 layer could reach, from the same run.

Each thread keeps ACCUMULATORS independent 16-lane vectors and updates each with one fused
multiply-add per iteration: enough chains in flight to hide the FMA latency on two FMA pipes,
few enough to stay in registers. Nothing is loaded or stored in the loop, so this is the
arithmetic ceiling; a GEMM at 80-90% of it is doing well. Measured with 1 and with the
requested number of threads, in a child process that imports only Numba. The bf16 probe has the
same shape; it runs only where the CPU flags list avx512_bf16, after checking its result on known
values; the int8 probe likewise where they list avx512_vnni (GOP/s: 2 ops per multiply-add).
"""
import json

import numpy as np
from numba import njit, prange

from minialex.kernels.simd import LANES, vfma, vhsum, vsplat, vstore, vzero
from minialex.kernels.simd_bf16 import bload, bsplat_pair, has_avx512_bf16, vdpbf16
from minialex.kernels.simd_int8 import has_avx512_vnni, i2f, izero, s8load, u8broadcast4, u8load, vpdpbusd

from ._common import markdown_table, run_worker, set_threads, time_call, worker_env

TITLE = "Peak throughput (Numba): float32 FMA, bf16 and int8 dot products"
ACCUMULATORS = 12


@njit(cache=True)
def _fma_chains(iters, seed):
    # 12 independent chains: acc = acc * m + a, which stays bounded (m < 1)
    m = vsplat(np.float32(0.999999))
    a = vsplat(seed)
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = a
    for _ in range(iters):
        c0 = vfma(c0, m, a)
        c1 = vfma(c1, m, a)
        c2 = vfma(c2, m, a)
        c3 = vfma(c3, m, a)
        c4 = vfma(c4, m, a)
        c5 = vfma(c5, m, a)
        c6 = vfma(c6, m, a)
        c7 = vfma(c7, m, a)
        c8 = vfma(c8, m, a)
        c9 = vfma(c9, m, a)
        c10 = vfma(c10, m, a)
        c11 = vfma(c11, m, a)
    # the sum keeps the loop alive: nothing unused may be optimised away
    return vhsum(c0) + vhsum(c1) + vhsum(c2) + vhsum(c3) + vhsum(c4) + vhsum(c5) + \
        vhsum(c6) + vhsum(c7) + vhsum(c8) + vhsum(c9) + vhsum(c10) + vhsum(c11)


@njit(parallel=True, cache=True)
def _fma_threads(nthreads, iters, out):
    # out: (nthreads,) ; one task per thread
    for t in prange(nthreads):
        out[t] = _fma_chains(iters, np.float32(1e-3 * (t + 1)))


# cache=True keeps the inline assembly: a second process loads it from the cache, exact
@njit(cache=True)
def _bf16_chains(iters, seed):
    # 12 independent chains: acc += a . b pairwise, 32 multiply-adds each; the sums grow linearly
    # (10^7 iterations of 2 * seed stay far below float32's range)
    bits = np.uint32(np.float32(seed).view(np.uint32)) >> 16
    a = bsplat_pair(np.uint32((bits << 16) | bits))
    b = bsplat_pair(np.uint32(0x3F803F80))   # bf16 1.0 in both halves
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = vzero()
    for _ in range(iters):
        c0 = vdpbf16(c0, a, b)
        c1 = vdpbf16(c1, a, b)
        c2 = vdpbf16(c2, a, b)
        c3 = vdpbf16(c3, a, b)
        c4 = vdpbf16(c4, a, b)
        c5 = vdpbf16(c5, a, b)
        c6 = vdpbf16(c6, a, b)
        c7 = vdpbf16(c7, a, b)
        c8 = vdpbf16(c8, a, b)
        c9 = vdpbf16(c9, a, b)
        c10 = vdpbf16(c10, a, b)
        c11 = vdpbf16(c11, a, b)
    return vhsum(c0) + vhsum(c1) + vhsum(c2) + vhsum(c3) + vhsum(c4) + vhsum(c5) + \
        vhsum(c6) + vhsum(c7) + vhsum(c8) + vhsum(c9) + vhsum(c10) + vhsum(c11)


@njit(parallel=True, cache=True)
def _bf16_threads(nthreads, iters, out):
    for t in prange(nthreads):
        out[t] = _bf16_chains(iters, np.float32(1e-3 * (t + 1)))


@njit(cache=True)
def _bf16_dot(a, b, out):
    # a, b: (32,) uint16 bf16 patterns ; out: (16,) float32 <- one vdpbf16ps from zero
    vstore(out, 0, vdpbf16(vzero(), bload(a, 0), bload(b, 0)))


def check_bf16():
    """Raise unless one vdpbf16ps gives 2*3 + 2*3 = 12 in every lane for bf16 2.0 and 3.0 pairs."""
    two, three = np.full(32, 0x4000, np.uint16), np.full(32, 0x4040, np.uint16)
    out = np.zeros(16, np.float32)
    _bf16_dot(two, three, out)
    if not (out == 12.0).all():
        raise RuntimeError(f"bf16 probe: vdpbf16ps gave {out.tolist()} for 2*3 + 2*3, not 12")


# cache=True keeps this inline assembly too
@njit(cache=True)
def _int8_chains(iters, seed):
    # 12 independent chains: acc += 4 products of bytes per lane, 64 multiply-adds each; with
    # a = seed (<= 2) and b = 1 the int32 sums grow by at most 8 an iteration: 10^7 iterations fit
    a = u8broadcast4(seed, 0)
    b = s8load(seed.view(np.int8), 4)
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = izero()
    for _ in range(iters):
        c0 = vpdpbusd(c0, a, b)
        c1 = vpdpbusd(c1, a, b)
        c2 = vpdpbusd(c2, a, b)
        c3 = vpdpbusd(c3, a, b)
        c4 = vpdpbusd(c4, a, b)
        c5 = vpdpbusd(c5, a, b)
        c6 = vpdpbusd(c6, a, b)
        c7 = vpdpbusd(c7, a, b)
        c8 = vpdpbusd(c8, a, b)
        c9 = vpdpbusd(c9, a, b)
        c10 = vpdpbusd(c10, a, b)
        c11 = vpdpbusd(c11, a, b)
    return vhsum(i2f(c0)) + vhsum(i2f(c1)) + vhsum(i2f(c2)) + vhsum(i2f(c3)) + vhsum(i2f(c4)) + \
        vhsum(i2f(c5)) + vhsum(i2f(c6)) + vhsum(i2f(c7)) + vhsum(i2f(c8)) + vhsum(i2f(c9)) + \
        vhsum(i2f(c10)) + vhsum(i2f(c11))


@njit(parallel=True, cache=True)
def _int8_threads(nthreads, iters, out):
    for t in prange(nthreads):
        seed = np.ones(68, np.uint8)   # a: 4 bytes of (t % 2 + 1), b: 64 bytes of 1
        seed[:4] = t % 2 + 1
        out[t] = _int8_chains(iters, seed)


@njit(cache=True)
def _int8_dot(a, b, out):
    # a: (64,) uint8, b: (64,) int8 ; out: (16,) float32 <- one vpdpbusd from zero, converted
    vstore(out, 0, i2f(vpdpbusd(izero(), u8load(a, 0), s8load(b, 0))))


def check_int8():
    """Raise unless one vpdpbusd gives 4 * (255 * -128) = -130560 in every lane (exact in float32)."""
    out = np.zeros(16, np.float32)
    _int8_dot(np.full(64, 255, np.uint8), np.full(64, -128, np.int8), out)
    if not (out == -130560.0).all():
        raise RuntimeError(f"int8 probe: vpdpbusd gave {out.tolist()} for 4 * 255 * -128, not -130560")


_PROBES = {"fp32": (_fma_threads, LANES), "bf16": (_bf16_threads, 2 * LANES), "int8": (_int8_threads, 4 * LANES)}


def probe(threads, iters, repeats, kind="fp32"):
    """(median GFLOP/s, best GFLOP/s) with `threads` threads, each running `iters` iterations of
    12 float32 FMAs ("fp32", 16 multiply-adds each), 12 vdpbf16ps ("bf16", 32 each) or 12
    vpdpbusd ("int8", 64 each; GOP/s)."""
    set_threads("minialex", threads)
    out = np.zeros(threads, dtype=np.float32)
    fn, per_instr = _PROBES[kind]
    med, best = time_call(lambda: fn(threads, iters, out), repeats, warmup=1)
    if not np.isfinite(out).all():
        raise RuntimeError(f"{kind} peak probe produced non-finite sums")
    flops = 2.0 * per_instr * ACCUMULATORS * iters * threads
    return flops / med / 1e9, flops / best / 1e9


def worker(payload):
    bf16 = has_avx512_bf16()
    if bf16:
        check_bf16()
    int8 = has_avx512_vnni()
    if int8:
        check_int8()
    rows = []
    for t in payload["thread_counts"]:
        r = dict(threads=t, **dict(zip(("gflops", "gflops_best"), probe(t, payload["iters"], payload["repeats"]))))
        if bf16:
            r.update(zip(("bf16_gflops", "bf16_gflops_best"), probe(t, payload["iters"], payload["repeats"], "bf16")))
        if int8:
            r.update(zip(("int8_gops", "int8_gops_best"), probe(t, payload["iters"], payload["repeats"], "int8")))
        rows.append(r)
    return rows


def run(opts, alternator=None):
    counts = sorted({1, opts.threads})
    # 384 FLOPs per iteration: ~0.1 s per call at 40 GFLOP/s per thread, which dwarfs the wake-up
    # of the thread pool
    iters = 2_000_000 if opts.quick else 10_000_000
    env = worker_env("minialex", max(counts))
    payload = dict(section="peak", thread_counts=counts, iters=iters, repeats=max(opts.repeats, 3))
    res = run_worker("benchmarks.run", ["--worker", json.dumps(payload)], env)
    rows = []
    for r in res:
        rows.append(["float32 FMA", r["threads"], f"{r['gflops']:.1f}", f"{r['gflops_best']:.1f}",
                     f"{r['gflops'] / r['threads']:.1f}", "1.00x"])
        if "bf16_gflops" in r:
            r["bf16_ratio"] = r["bf16_gflops"] / r["gflops"]
            rows.append(["bf16 dot (vdpbf16ps)", r["threads"], f"{r['bf16_gflops']:.1f}",
                         f"{r['bf16_gflops_best']:.1f}", f"{r['bf16_gflops'] / r['threads']:.1f}",
                         f"{r['bf16_ratio']:.2f}x"])
        else:
            rows.append(["bf16 dot (vdpbf16ps)", r["threads"], "not supported by this CPU", "", "", ""])
        if "int8_gops" in r:
            r["int8_ratio"] = r["int8_gops"] / r["gflops"]
            rows.append(["int8 dot (vpdpbusd), GOP/s", r["threads"], f"{r['int8_gops']:.1f}",
                         f"{r['int8_gops_best']:.1f}", f"{r['int8_gops'] / r['threads']:.1f}",
                         f"{r['int8_ratio']:.2f}x"])
        else:
            rows.append(["int8 dot (vpdpbusd)", r["threads"], "not supported by this CPU", "", "", ""])
    table = markdown_table(["instruction", "threads", "GFLOP/s (median)", "GFLOP/s (best)", "per thread",
                            "vs float32 (median)"], rows)
    return dict(records=res, table=table, failed=False,
                notes=[f"{ACCUMULATORS} independent {LANES}-lane accumulator chains per thread, no memory traffic; "
                       "2 ops per multiply-add: 16 per FMA, 32 per vdpbf16ps, 64 per vpdpbusd (int8, GOP/s)"])
