"""GFLOP/s of minialex's GEMM against numpy.matmul and torch.mm on AlexNet's GEMMs.

    python -m benchmarks.gemm [--threads 1 2] [--batch 8 64] [--repeats 5] [--layers conv1,fc6] [--json FILE]
                              [--precision float32|bf16]

Shapes are those of one training step (im2col convolutions and FC layers, forward,
backward-data and backward-weight, operands stored and transposed as the layers
store them).  Each library runs in its own process per thread count (thread pools
on two cores disturb one another), one warm-up call then the median of the repeats.
Backward-weight forms accumulate into the gradient for minialex and torch (addmm);
numpy has no in-place accumulating product, so it is timed writing `out=` (slightly
in its favour).

With --precision bf16 minialex runs gemm_bf16 (operands rounded to bf16 while packing, float32
sums; the native vdpbf16ps kernel where the CPU has avx512_bf16, else the emulation) and torch
multiplies bfloat16 tensors converted before timing, with a bfloat16 result (in its favour);
numpy has no bfloat16 and is left out.

numpy's OpenBLAS honours OPENBLAS_CORETYPE from the environment; to compare with its
best kernels on this machine run with that variable (and OPENBLAS_L2_SIZE) unset on
the command line.
"""
import argparse
import json
import os
import sys

import numpy as np

from ._common import alexnet_gemm_shapes, markdown_table, operands, run_worker, time_call

LIBS = ("minialex", "numpy", "torch")


def _select(batches, layers):
    out = []
    for batch in batches:
        for s in alexnet_gemm_shapes(batch):
            if layers and s["name"] not in layers:
                continue
            out.append(dict(s, batch=batch))
    return out


def _worker(lib, threads, shapes, repeats, precision="float32"):
    """Time `lib` on every shape in this process; return a list of result dicts."""
    if lib == "minialex":
        import numba
        if precision == "bf16":
            from minialex.kernels.gemm_bf16 import gemm_bf16 as gemm
        else:
            from minialex.kernels.gemm import gemm
        numba.set_num_threads(threads)
        x = np.ones((64, 64), np.float32)
        gemm(x, x)  # load the compiled code before timing

        def make(a, b, c, s):
            return lambda: gemm(a, b, c, trans_a=s["trans_a"], trans_b=s["trans_b"], accumulate=s["accumulate"])
    elif lib == "numpy":
        def make(a, b, c, s):
            opa = a.T if s["trans_a"] else a
            opb = b.T if s["trans_b"] else b
            return lambda: np.matmul(opa, opb, out=c)
    elif lib == "torch":
        import torch
        torch.set_num_threads(threads)

        def make(a, b, c, s):
            ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
            if precision == "bf16":
                ta, tb, tc = ta.to(torch.bfloat16), tb.to(torch.bfloat16), tc.to(torch.bfloat16)
            opa = ta.t() if s["trans_a"] else ta
            opb = tb.t() if s["trans_b"] else tb
            if s["accumulate"]:
                return lambda: torch.addmm(tc, opa, opb, out=tc)
            return lambda: torch.mm(opa, opb, out=tc)
    else:
        raise ValueError(lib)
    results = []
    for s in shapes:
        a, b, c = operands(s)
        med, best = time_call(make(a, b, c, s), repeats)
        flops = 2.0 * s["m"] * s["n"] * s["k"]
        results.append(dict(s, lib=lib, threads=threads, precision=precision, median_s=med, best_s=best,
                            gflops=flops / med / 1e9, gflops_best=flops / best / 1e9))
        del a, b, c
    return results


def _torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", default="", help="comma-separated subset, e.g. conv1,fc6")
    p.add_argument("--libs", default=",".join(LIBS), help="comma-separated subset of " + ",".join(LIBS))
    p.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    p.add_argument("--precision", choices=("float32", "bf16"), default="float32",
                   help="bf16: minialex's gemm_bf16 against torch on bfloat16 tensors (no numpy)")
    p.add_argument("--worker", choices=LIBS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    layers = set(filter(None, args.layers.split(",")))
    shapes = _select(args.batch, layers)

    if args.worker:
        print(json.dumps(_worker(args.worker, args.threads[0], shapes, args.repeats, args.precision)))
        return 0

    libs = [lib for lib in args.libs.split(",") if lib]
    if "torch" in libs and not _torch_available():
        print("torch not importable: comparing with numpy only", file=sys.stderr)
        libs.remove("torch")
    if args.precision == "bf16" and "numpy" in libs:
        print("numpy has no bfloat16: leaving it out", file=sys.stderr)
        libs.remove("numpy")
    common = ["--batch", *map(str, args.batch), "--repeats", str(args.repeats), "--precision", args.precision]
    if args.layers:
        common += ["--layers", args.layers]
    results = []
    for t in args.threads:
        for lib in libs:
            env = {"OPENBLAS_NUM_THREADS": str(t), "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
            if lib == "minialex":
                env["NUMBA_NUM_THREADS"] = str(max(t, int(os.environ.get("NUMBA_NUM_THREADS", "0") or 0)))
            print(f"timing {lib} with {t} thread(s) ...", file=sys.stderr, flush=True)
            results += run_worker("benchmarks.gemm", ["--worker", lib, "--threads", str(t), *common], env)

    by_key = {(r["batch"], r["name"], r["form"], r["threads"], r["lib"]): r for r in results}
    header = ["batch", "layer", "form", "M", "N", "K"]
    for t in args.threads:
        header += [f"{lib} {t}T" for lib in libs]
        if len(libs) > 1 and "minialex" in libs:
            header.append(f"ours/best {t}T")
    rows = []
    for s in shapes:
        row = [s["batch"], s["name"], s["form"], s["m"], s["n"], s["k"]]
        for t in args.threads:
            g = {lib: by_key[(s["batch"], s["name"], s["form"], t, lib)]["gflops"] for lib in libs}
            row += [f"{g[lib]:.1f}" for lib in libs]
            peers = [g[lib] for lib in libs if lib != "minialex"]
            if peers and "minialex" in libs:
                row.append(f"{g['minialex'] / max(peers):.2f}x")
        rows.append(row)
    print(f"GEMM GFLOP/s (median of {args.repeats}), {args.precision}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}\n")
    print(markdown_table(header, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(repeats=args.repeats, precision=args.precision, openblas_coretype=os.environ.get("OPENBLAS_CORETYPE"),
                           results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
