"""Winograd F(2x2,3x3) and F(4x4,3x3) on AlexNet's conv3-conv5: numerical error and speed.

    python -m benchmarks.winograd --errors            # float32 error against the float64 reference
    python -m benchmarks.winograd --timing --rounds 4 # against the direct path and PyTorch

Errors: max and mean over elements of |ours - ref|, divided by the largest |ref| of that tensor,
for the output, the input gradient and the weight gradient; the float32 direct path
(conv2d_forward / conv2d_backward) is listed beside the two tiles for scale.

Timing: each library runs in its own process per round (their OpenMP pools disturb one another
on two cores), the order alternating between rounds; each cell is the median over rounds of
each round's median. On a shared machine the spread between rounds is large: read ratios, and
repeat before trusting a difference under about 20%.
"""
import argparse
import json
import sys

import numpy as np

from ._common import markdown_table, run_worker, set_threads, time_call, worker_env

LAYERS = [("conv3", 192, 384), ("conv4", 384, 256), ("conv5", 256, 256)]
PLANE = 13
TILES = (2, 4)


def _rel(ours, ref):
    diff = np.abs(np.asarray(ours, np.float64) - ref)
    scale = float(np.abs(ref).max()) or 1.0
    return float(diff.max()) / scale, float(diff.mean()) / scale


def _case_errors(n, cin, cout, h, w, rng):
    """{method: (out max, out mean, dx max, dx mean, dw max, dw mean)} for one random case."""
    from minialex.kernels.conv import winograd as wg
    from minialex.kernels.conv import (conv2d_backward, conv2d_backward_ref, conv2d_forward,
                                       conv2d_forward_ref)
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    wt = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)  # He-like
    b = rng.standard_normal(cout).astype(np.float32) * 0.1
    dy = rng.standard_normal((n, cout, h, w)).astype(np.float32)
    x64, w64, dy64 = x.astype(np.float64), wt.astype(np.float64), dy.astype(np.float64)
    y_ref = conv2d_forward_ref(x64, w64, b.astype(np.float64), 1, 1, 1)
    dw_ref = np.zeros_like(w64)
    dx_ref = conv2d_backward_ref(dy64, x64, w64, dw_ref, None, 1, 1, 1)
    res = {}
    dw = np.zeros_like(wt)
    dx = conv2d_backward(dy, x, wt, dw, None, 1, 1, 1, accumulate=False)
    res["direct"] = (*_rel(conv2d_forward(x, wt, b, 1, 1, 1), y_ref), *_rel(dx, dx_ref), *_rel(dw, dw_ref))
    for tile in TILES:
        ww = wg.transform_weights(wt, tile)
        res[f"F({tile}x{tile},3x3)"] = (*_rel(wg.winograd_forward(x, ww, b, tile), y_ref),
                                        *_rel(wg.winograd_backward_data(dy, ww, tile), dx_ref),
                                        *_rel(wg.winograd_backward_weight(dy, x, tile), dw_ref))
    return res


def errors(batch=8, random_cases=6, seed=0):
    """Markdown table of the float32 errors on conv3-conv5 at `batch` and on random shapes."""
    rng = np.random.default_rng(seed)
    rows = []
    bound = {}
    for name, cin, cout in LAYERS:
        for method, e in _case_errors(batch, cin, cout, PLANE, PLANE, rng).items():
            rows.append([name, batch, method, *(f"{v:.1e}" for v in e)])
            bound[method] = max(bound.get(method, 0.0), e[0], e[2], e[4])
    worst = {}
    for _ in range(random_cases):
        n = int(rng.integers(1, 5))
        cin, cout = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        h, w = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        for method, e in _case_errors(n, cin, cout, h, w, rng).items():
            worst[method] = np.maximum(worst.get(method, 0.0), e)
            bound[method] = max(bound[method], e[0], e[2], e[4])
    for method, e in worst.items():
        rows.append([f"random ({random_cases} shapes, worst)", "1-4", method, *(f"{v:.1e}" for v in e)])
    header = ["layer", "batch", "method", "y max", "y mean", "dx max", "dx mean", "dw max", "dw mean"]
    verdict = ", ".join(f"{m}: {'within' if v <= 1e-5 else 'NOT within'} 1e-5 (worst {v:.1e})"
                        for m, v in bound.items())
    return markdown_table(header, rows) + "\n\n" + verdict


# -- timing ------------------------------------------------------------------------------------

def _ops(lib, n, cin, cout):
    """{op name: callable} for one layer at batch n, for lib 'torch' or 'minialex'."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, cin, PLANE, PLANE)).astype(np.float32)
    w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
    b = np.zeros(cout, np.float32)
    dy = rng.standard_normal((n, cout, PLANE, PLANE)).astype(np.float32)
    if lib == "torch":
        import torch
        import torch.nn.functional as F
        tx, tw, tb, tdy = (torch.from_numpy(a) for a in (x, w, b, dy))
        args = ([cout], [1, 1], [1, 1], [1, 1], False, [0, 0], 1)

        def bwd(mask):
            return lambda: torch.ops.aten.convolution_backward(tdy, tx, tw, *args, mask)
        with torch.no_grad():
            return {"forward": lambda: F.conv2d(tx, tw, tb, padding=1),
                    "input grad": bwd([True, False, False]),
                    "weight grad": bwd([False, True, True]),
                    "backward": bwd([True, True, True])}
    from minialex.kernels.conv import winograd as wg
    from minialex.kernels.conv import conv2d_backward, conv2d_forward
    dw, db = np.zeros_like(w), np.zeros_like(b)
    ops = {"direct forward": lambda: conv2d_forward(x, w, b, 1, 1, 1),
           "direct weight grad": lambda: conv2d_backward(dy, x, w, dw, db, 1, 1, 1, need_dx=False),
           "direct backward": lambda: conv2d_backward(dy, x, w, dw, db, 1, 1, 1)}
    for t in TILES:
        ww = wg.transform_weights(w, t)
        ops[f"F{t} weights"] = lambda t=t: wg.transform_weights(w, t)
        ops[f"F{t} forward"] = lambda t=t, ww=ww: wg.winograd_forward(x, ww, b, t)
        ops[f"F{t} input grad"] = lambda t=t, ww=ww: wg.winograd_backward_data(dy, ww, t)
        ops[f"F{t} weight grad"] = lambda t=t: wg.winograd_backward_weight(dy, x, t)
    return ops


def _worker(lib, threads, batches, repeats):
    set_threads(lib, threads)
    out = []
    for n in batches:
        for name, cin, cout in LAYERS:
            for op, fn in _ops(lib, n, cin, cout).items():
                med, _ = time_call(fn, repeats)
                out.append(dict(layer=name, batch=n, op=op, ms=med * 1e3))
    print(json.dumps(out))


def timing(rounds=4, threads=2, batches=(8, 64), repeats=5):
    """Markdown table: median ms of each op, per layer and batch, and the ratios."""
    libs = ["minialex", "torch"]
    samples = {}
    for r in range(rounds):
        for lib in (libs if r % 2 == 0 else libs[::-1]):
            res = run_worker("benchmarks.winograd", ["--worker", lib, str(threads), str(repeats),
                                                     *map(str, batches)], worker_env(lib, threads))
            for e in res:
                samples.setdefault((e["layer"], e["batch"], lib, e["op"]), []).append(e["ms"])
    med = {k: float(np.median(v)) for k, v in samples.items()}
    spread = max(max(v) / min(v) for v in samples.values()) if rounds > 1 else 1.0
    rows = []
    for n in batches:
        for name, _, _ in LAYERS:
            def g(lib, op):
                return med[(name, n, lib, op)]
            for t in TILES:
                fw, dx, dwt, tw = (g("minialex", f"F{t} {o}") for o in ("forward", "input grad", "weight grad", "weights"))
                step = tw + fw + dx + dwt
                t_step = g("torch", "forward") + g("torch", "backward")
                d_step = g("minialex", "direct forward") + g("minialex", "direct backward")
                rows.append([name, n, f"F({t}x{t})", f"{tw:.2f}",
                             f"{fw:.2f} / {g('minialex', 'direct forward'):.2f} / {g('torch', 'forward'):.2f}",
                             f"{dx:.2f} / - / {g('torch', 'input grad'):.2f}",
                             f"{dwt:.2f} / {g('minialex', 'direct weight grad'):.2f} / {g('torch', 'weight grad'):.2f}",
                             f"{step:.2f} / {d_step:.2f} / {t_step:.2f}",
                             f"{d_step / step:.2f}x", f"{t_step / step:.2f}x"])
    header = ["layer", "batch", "tile", "weight transform ms", "forward ms (wino / direct / torch)",
              "input grad ms (wino / - / torch)", "weight grad ms (wino / direct / torch)",
              "step ms (wino / direct / torch)", "direct / wino", "torch / wino"]
    note = (f"{rounds} rounds, {threads} threads, medians; largest max/min ratio of one cell over the "
            f"rounds: {spread:.2f} (shared, noisy machine). 'step' = weight transform + forward + input "
            "grad + weight grad for Winograd, forward + backward (both gradients) for direct and torch.")
    return markdown_table(header, rows) + "\n\n" + note


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.winograd", description=__doc__.splitlines()[0])
    p.add_argument("--errors", action="store_true", help="float32 error table")
    p.add_argument("--timing", action="store_true", help="timing table against direct and torch")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--random-cases", type=int, default=6)
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        lib, threads, repeats, *batches = a.worker
        _worker(lib, int(threads), [int(b) for b in batches], int(repeats))
        return 0
    if not (a.errors or a.timing):
        a.errors = a.timing = True
    if a.errors:
        print("## Winograd float32 error (relative to the largest |reference|)\n")
        print(errors(random_cases=a.random_cases), flush=True)
    if a.timing:
        print("\n## Winograd timing\n")
        print(timing(a.rounds, a.threads, tuple(a.batches), a.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
