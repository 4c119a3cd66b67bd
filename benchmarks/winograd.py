"""The winograd convolution paths on AlexNet's 3x3 layers: float32 error, and speed against the
direct path and PyTorch.

    python -m benchmarks.winograd --errors             # float32 error against the float64 reference
    python -m benchmarks.winograd --timing --rounds 4  # winograd4, winograd, direct and torch, same run

Errors: max and mean over elements of |ours - ref|, divided by the largest |ref| of that tensor,
for the output, the input gradient and the weight gradient (the plan's criterion: max within
1e-5). Rows: the float32 paths `winograd4` (F(4x4,3x3)), `winograd` (F(2x2,3x3)) and `direct`
forced through minialex.kernels.conv;
F(4x4,3x3) on Lavin & Gray's points 0, +-1, +-2 computed in float32 by the algorithm's NumPy twin
(the points winograd4 does not use; no weight gradient); for the 5x5 layer (conv2), the direct
path and F(2x2,5x5) (36 multiplications per 4 outputs instead of 100) in float32 NumPy, forward
only.

Timing: each library runs in its own process per round (their OpenMP pools disturb one another
on two cores), the order alternating between rounds; in our process the two paths alternate
call by call, so their ratio sees the same machine. Each cell is the median over rounds of each
round's median.
"""
import argparse
import json
import sys

import numpy as np

from ._common import markdown_table, run_worker, set_threads, time_call, worker_env

LAYERS = [("conv3", 192, 384), ("conv4", 384, 256), ("conv5", 256, 256)]
PLANE = 13
PATHS = ("winograd4", "winograd", "direct")   # timed, alternating call by call
CRITERION = 1e-5

# F(4x4, 3x3) on Lavin & Gray's points (2016; 0, 1, -1, 2, -2, inf), for comparison with winograd4's
LAVIN_BT4 = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64)
LAVIN_G4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64)
LAVIN_AT4 = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], dtype=np.float64)


def toom_cook(m, r, points):
    """(Bᵀ, G, Aᵀ) of F(m x m, r x r) on the finite interpolation `points` and infinity: Aᵀ and G
    from the points (Lavin & Gray's construction), Bᵀ solved from the identity the three must
    satisfy, sum_j Aᵀ[i, j] G[j, k] Bᵀ[j, l] = [l == i + k] (exact for these small integer points)."""
    a = m + r - 1
    at, g = np.zeros((m, a)), np.zeros((a, r))
    for j, p in enumerate(points):
        at[:, j] = [p ** i for i in range(m)]
        g[j] = [p ** k / np.prod([p - q for q in points if q != p]) for k in range(r)]
    at[m - 1, a - 1] = g[a - 1, r - 1] = 1
    eqs = np.zeros((m * r * a, a * a))
    rhs = np.zeros(m * r * a)
    for n, (i, k, col) in enumerate((i, k, col) for i in range(m) for k in range(r) for col in range(a)):
        eqs[n, col::a] = at[i] * g[:, k]
        rhs[n] = col == i + k
    bt = np.linalg.lstsq(eqs, rhs, rcond=None)[0].reshape(a, a)
    assert np.abs(eqs @ bt.ravel() - rhs).max() < 1e-12
    return bt, g, at


def toom_cook_ref(x, w, bt, g, at):
    """conv2d(x, w, stride 1, padding (r-1)/2) by F(m x m, r x r) in x's dtype (the algorithm's
    rounding in that precision, for the error table)."""
    n, c, h, wd = x.shape
    m, a = at.shape
    r = g.shape[1]
    bt, g, at = (v.astype(x.dtype) for v in (bt, g, at))
    th, tw = (h + m - 1) // m, (wd + m - 1) // m
    pad = (r - 1) // 2
    xp = np.zeros((n, c, th * m + r - 1, tw * m + r - 1), dtype=x.dtype)
    xp[:, :, pad:pad + h, pad:pad + wd] = x
    win = np.lib.stride_tricks.sliding_window_view(xp, (a, a), axis=(2, 3))[:, :, ::m, ::m][:, :, :th, :tw]
    u = np.einsum("ik,ockl,jl->ijoc", g, w, g)
    v = np.einsum("ik,ncstkl,jl->ijncst", bt, win, bt)
    y = np.einsum("ai,ijnost,bj->nosatb", at, np.einsum("ijoc,ijncst->ijnost", u, v), at)
    return y.reshape(n, w.shape[0], th * m, tw * m)[:, :, :h, :wd]


def conv2_errors(batch=8, seed=0):
    """Rows for AlexNet's 5x5 layer (conv2): the direct path and F(2x2, 5x5) in float32."""
    from minialex.kernels.conv import conv2d_forward, conv2d_forward_ref, force_path
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((batch, 64, 27, 27)), 0).astype(np.float32)
    w = (rng.standard_normal((192, 64, 5, 5)) * np.sqrt(2 / (25 * 64))).astype(np.float32)
    ref = conv2d_forward_ref(x.astype(np.float64), w.astype(np.float64), None, 1, 2, 1)
    with force_path("direct"):
        direct = conv2d_forward(x, w, None, 1, 2, 1)
    f25 = toom_cook_ref(x, w, *toom_cook(2, 5, [0, 1, -1, 2, -2]))
    return [["conv2 (5x5)", batch, "direct", *(f"{v:.1e}" for v in _rel(direct, ref)), "-", "-", "-", "-"],
            ["conv2 (5x5)", batch, "F(2x2,5x5), NumPy in float32", *(f"{v:.1e}" for v in _rel(f25, ref)),
             "-", "-", "-", "-"]]


def _rel(ours, ref):
    diff = np.abs(np.asarray(ours, np.float64) - ref)
    scale = float(np.abs(ref).max()) or 1.0
    return float(diff.max()) / scale, float(diff.mean()) / scale


def _accepts(path, x, w, need_dx):
    from minialex.kernels.conv import plan
    from minialex.kernels.conv.layout import geometry
    g = geometry(x.shape, w.shape, 1, 1, 1)
    return all(plan.accepts(path, plan.describe(phase, g, x.dtype, 2, need_dx)) for phase in plan.PHASES)


def _case_errors(n, cin, cout, h, w, rng):
    """{method: (y max, y mean, dx max, dx mean, dw max, dw mean)} for one random case."""
    from minialex.kernels.conv import (conv2d_backward, conv2d_backward_ref, conv2d_forward,
                                       conv2d_forward_ref, force_path, winograd)
    x = np.maximum(rng.standard_normal((n, cin, h, w)), 0).astype(np.float32)   # after a ReLU
    wt = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)  # He
    b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    dy = rng.standard_normal((n, cout, h, w)).astype(np.float32)
    x64, w64, dy64 = x.astype(np.float64), wt.astype(np.float64), dy.astype(np.float64)
    y_ref = conv2d_forward_ref(x64, w64, b.astype(np.float64), 1, 1, 1)
    dw_ref = np.zeros_like(w64)
    dx_ref = conv2d_backward_ref(dy64, x64, w64, dw_ref, None, 1, 1, 1)
    res = {}
    for name, paths in (("winograd4", ("winograd4",)), ("winograd", ("winograd",)),
                        ("direct (else blocked, batched)", ("direct", "blocked", "batched"))):
        path = next(p for p in paths if _accepts(p, x, wt, need_dx=True))
        dw = np.zeros_like(wt)
        with force_path(path):
            y = conv2d_forward(x, wt, b, 1, 1, 1)
            dx = conv2d_backward(dy, x, wt, dw, None, 1, 1, 1)
        res[name] = (*_rel(y, y_ref), *_rel(dx, dx_ref), *_rel(dw, dw_ref))
    lavin = (LAVIN_BT4, LAVIN_G4, LAVIN_AT4)
    y4 = winograd.winograd_forward_ref(x, wt, b, *lavin)
    dx4 = winograd.winograd_forward_ref(dy, np.ascontiguousarray(wt[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)), None,
                                        *lavin)
    res["F(4x4) on 0, +-1, +-2, twin"] = (*_rel(y4, y_ref), *_rel(dx4, dx_ref), float("nan"), float("nan"))
    return res


def _fmt(v):
    return "-" if np.isnan(v) else f"{v:.1e}"


def errors(batch=8, random_cases=6, seed=0):
    """Markdown table of the float32 errors on conv3-conv5 at `batch` and on random shapes."""
    rng = np.random.default_rng(seed)
    rows = []
    bound = {}
    for name, cin, cout in LAYERS:
        for method, e in _case_errors(batch, cin, cout, PLANE, PLANE, rng).items():
            rows.append([name, batch, method, *map(_fmt, e)])
            bound[method] = np.nanmax([bound.get(method, 0.0), e[0], e[2], e[4]])
    worst = {}
    for _ in range(random_cases):
        n = int(rng.integers(1, 5))
        cin, cout = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        h, w = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        for method, e in _case_errors(n, cin, cout, h, w, rng).items():
            worst[method] = np.fmax(worst.get(method, np.array(e)), e)
            bound[method] = np.nanmax([bound[method], e[0], e[2], e[4]])
    for method, e in worst.items():
        rows.append([f"random ({random_cases} shapes, worst)", "1-4", method, *map(_fmt, e)])
    rows += conv2_errors(batch)
    header = ["layer", "batch", "method", "y max", "y mean", "dx max", "dx mean", "dw max", "dw mean"]
    verdict = ", ".join(f"{m}: {'within' if v <= CRITERION else 'NOT within'} {CRITERION:g} (worst {v:.1e})"
                        for m, v in bound.items())
    return markdown_table(header, rows) + "\n\n" + verdict


# -- timing ------------------------------------------------------------------------------------

def _data(n, cin, cout):
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((n, cin, PLANE, PLANE)), 0).astype(np.float32)
    w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
    b = np.zeros(cout, np.float32)
    dy = rng.standard_normal((n, cout, PLANE, PLANE)).astype(np.float32)
    return x, w, b, dy


def _torch_ops(n, cin, cout):
    import torch
    import torch.nn.functional as F
    tx, tw, tb, tdy = (torch.from_numpy(a) for a in _data(n, cin, cout))
    args = ([cout], [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    with torch.no_grad():
        return {"forward": lambda: F.conv2d(tx, tw, tb, padding=1),
                "backward": lambda: torch.ops.aten.convolution_backward(tdy, tx, tw, *args, [True, True, True])}


def _our_ops(n, cin, cout, path):
    from minialex.kernels.conv import conv2d_backward, conv2d_forward, force_path
    x, w, b, dy = _data(n, cin, cout)
    dw, db = np.zeros_like(w), np.zeros_like(b)

    def forward():
        with force_path(path):
            conv2d_forward(x, w, b, 1, 1, 1)

    def backward():
        with force_path(path):
            conv2d_backward(dy, x, w, dw, db, 1, 1, 1)
    return {"forward": forward, "backward": backward}


def _worker(lib, threads, batches, repeats):
    set_threads(lib, threads)
    if lib == "minialex":
        from minialex._memory import keep_freed_memory
        keep_freed_memory()
    out = []
    for n in batches:
        for name, cin, cout in LAYERS:
            if lib == "torch":
                for op, fn in _torch_ops(n, cin, cout).items():
                    out.append(dict(layer=name, batch=n, lib="torch", op=op, ms=time_call(fn, repeats)[0] * 1e3))
                continue
            ops = {path: _our_ops(n, cin, cout, path) for path in PATHS}
            for op in ("forward", "backward"):
                samples = {path: [] for path in ops}
                for _ in range(repeats):         # alternate the paths call by call
                    for path in ops:
                        samples[path].append(time_call(ops[path][op], 1)[0])
                for path, s in samples.items():
                    out.append(dict(layer=name, batch=n, lib=path, op=op, ms=float(np.median(s)) * 1e3))
    print(json.dumps(out))


def timing(rounds=4, threads=2, batches=(8, 64), repeats=5):
    """Markdown table: median ms of forward and backward per layer and batch, and the ratios."""
    libs = ["minialex", "torch"]
    samples = {}
    for r in range(rounds):
        for lib in (libs if r % 2 == 0 else libs[::-1]):
            res = run_worker("benchmarks.winograd", ["--worker", lib, str(threads), str(repeats),
                                                     *map(str, batches)], worker_env(lib, threads))
            for e in res:
                samples.setdefault((e["layer"], e["batch"], e["lib"], e["op"]), []).append(e["ms"])
    med = {k: float(np.median(v)) for k, v in samples.items()}
    spread = max(max(v) / min(v) for v in samples.values()) if rounds > 1 else 1.0
    rows = []
    for n in batches:
        for name, _, _ in LAYERS:
            for op in ("forward", "backward"):
                w4, wi, di, to = (med[(name, n, lib, op)] for lib in (*PATHS, "torch"))
                rows.append([name, n, op, f"{w4:.2f}", f"{wi:.2f}", f"{di:.2f}", f"{to:.2f}", f"{wi / w4:.2f}x",
                             f"{di / wi:.2f}x", f"{to / w4:.2f}x", f"{to / wi:.2f}x", f"{to / di:.2f}x"])
    header = ["layer", "batch", "op", "winograd4 ms", "winograd ms", "direct ms", "torch ms", "winograd/winograd4",
              "direct/winograd", "torch/winograd4", "torch/winograd", "torch/direct"]
    note = (f"{rounds} rounds, {threads} threads, medians; largest max/min ratio of one cell over the "
            f"rounds: {spread:.2f}. backward = input, weight and bias gradients.")
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
