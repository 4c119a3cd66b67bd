"""Peak float32 FMA throughput of this CPU as Numba reaches it, the yardstick for every GFLOP/s.

Each thread keeps ACCUMULATORS independent 16-lane vectors and updates each with one fused
multiply-add per iteration: enough chains in flight to hide the FMA latency on two FMA pipes,
few enough to stay in registers. Nothing is loaded or stored in the loop, so this is the
arithmetic ceiling; a GEMM at 80-90% of it is doing well. Measured with 1 and with the
requested number of threads, in a child process that imports only Numba.
"""
import json

import numpy as np
from numba import njit, prange

from minialex.kernels.simd import LANES, vfma, vhsum, vsplat

from ._common import markdown_table, run_worker, set_threads, time_call, worker_env

TITLE = "Peak FMA throughput (Numba, float32)"
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


def probe(threads, iters, repeats):
    """(median GFLOP/s, best GFLOP/s) with `threads` threads, each running `iters` iterations."""
    set_threads("minialex", threads)
    out = np.zeros(threads, dtype=np.float32)
    med, best = time_call(lambda: _fma_threads(threads, iters, out), repeats, warmup=1)
    if not np.isfinite(out).all():
        raise RuntimeError("FMA probe produced non-finite sums")
    flops = 2.0 * LANES * ACCUMULATORS * iters * threads
    return flops / med / 1e9, flops / best / 1e9


def worker(payload):
    return [dict(threads=t, **dict(zip(("gflops", "gflops_best"), probe(t, payload["iters"], payload["repeats"]))))
            for t in payload["thread_counts"]]


def run(opts, alternator=None):
    counts = sorted({1, opts.threads})
    # 384 FLOPs per iteration: ~0.1 s per call at 40 GFLOP/s per thread, which dwarfs the wake-up
    # of the thread pool
    iters = 2_000_000 if opts.quick else 10_000_000
    env = worker_env("minialex", max(counts))
    payload = dict(section="peak", thread_counts=counts, iters=iters, repeats=max(opts.repeats, 3))
    res = run_worker("benchmarks.run", ["--worker", json.dumps(payload)], env)
    rows = [[r["threads"], f"{r['gflops']:.1f}", f"{r['gflops_best']:.1f}", f"{r['gflops'] / r['threads']:.1f}"]
            for r in res]
    table = markdown_table(["threads", "GFLOP/s (median)", "GFLOP/s (best)", "per thread"], rows)
    return dict(records=res, table=table, failed=False,
                notes=[f"{ACCUMULATORS} independent {LANES}-lane FMA chains per thread, no memory traffic"])
