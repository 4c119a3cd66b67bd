"""Helpers shared by the benchmarks: AlexNet's GEMM shapes, timing, subprocess workers, tables.

Each library is timed in its own process: on two cores the OpenMP pools of
Numba and torch and OpenBLAS's threads disturb one another when they share one.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

# torchvision AlexNet: (name, Cout, K = Cin*kh*kw, output H*W) per conv; (name, in, out) per FC
CONVS = [
    ("conv1", 64, 3 * 11 * 11, 55 * 55),
    ("conv2", 192, 64 * 5 * 5, 27 * 27),
    ("conv3", 384, 192 * 3 * 3, 13 * 13),
    ("conv4", 256, 384 * 3 * 3, 13 * 13),
    ("conv5", 256, 256 * 3 * 3, 13 * 13),
]
FCS = [("fc6", 9216, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 1000)]


def alexnet_gemm_shapes(batch):
    """The GEMMs of one AlexNet training step at `batch`, as the layers call them.

    Returns dicts with name, form, m, n, k, trans_a, trans_b, accumulate, where
    op(A) is m x k, op(B) is k x n and A, B are stored as the callers store them.
    """
    shapes = []
    for name, cout, kk, hw in CONVS:
        p = batch * hw
        shapes += [
            dict(name=name, form="forward W@cols", m=cout, n=p, k=kk, trans_a=False, trans_b=False, accumulate=False),
            dict(name=name, form="bwd-data W^T@dY", m=kk, n=p, k=cout, trans_a=True, trans_b=False, accumulate=False),
            dict(name=name, form="bwd-weight dY@cols^T", m=cout, n=kk, k=p, trans_a=False, trans_b=True, accumulate=True),
        ]
    for name, fin, fout in FCS:
        shapes += [
            dict(name=name, form="forward x@W^T", m=batch, n=fout, k=fin, trans_a=False, trans_b=True, accumulate=False),
            dict(name=name, form="bwd-data dY@W", m=batch, n=fin, k=fout, trans_a=False, trans_b=False, accumulate=False),
            dict(name=name, form="bwd-weight dY^T@x", m=fout, n=fin, k=batch, trans_a=True, trans_b=False, accumulate=True),
        ]
    return shapes


def operands(shape, dtype=np.float32, seed=0):
    """Stored A, B (transposed storage where trans_*) and a C for one shape dict."""
    rng = np.random.default_rng(seed)
    m, n, k = shape["m"], shape["n"], shape["k"]
    a = rng.standard_normal((k, m) if shape["trans_a"] else (m, k), dtype=np.float32).astype(dtype, copy=False)
    b = rng.standard_normal((n, k) if shape["trans_b"] else (k, n), dtype=np.float32).astype(dtype, copy=False)
    c = np.zeros((m, n), dtype=dtype)
    return a, b, c


def time_call(fn, repeats, warmup=1):
    """Median and best wall time of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), float(min(ts))


def run_worker(module, args, env_extra=None):
    """Run `python -m module args...` in a fresh process; return the JSON list it prints last."""
    env = dict(os.environ)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"worker {module} {' '.join(args)} failed with code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_table(header, rows):
    """A GitHub-flavoured Markdown table; cells are str()-ed."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)
