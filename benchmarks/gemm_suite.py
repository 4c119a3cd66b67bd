"""The suite's GEMM section: our GEMM against torch.mm on a subset of AlexNet's training GEMMs.

The timing is benchmarks/gemm.py's: its workers time one library per process at the given
thread count. Added here: a check of our product against torch's on every shape first (a
failing shape is not timed), and rows in the suite's format, milliseconds beside GFLOP/s.
"""
import json

from ._common import (alexnet_gemm_shapes, compare_outputs, fmt_ms, fmt_num, fmt_ratio, markdown_table,
                      operands, run_worker, set_threads, worker_env)

TITLE = "GEMM at AlexNet's training shapes (subset)"
# the first conv (small K, very wide), a middle one, and an FC layer (M = batch: skinny)
DEFAULT_LAYERS = ("conv1", "conv3", "fc6")
DEFAULT_BATCHES = (8, 64)


def shapes(opts):
    layers = set(opts.gemm_layers or DEFAULT_LAYERS)
    return [dict(s, batch=n) for n in (opts.batches or DEFAULT_BATCHES) for s in alexnet_gemm_shapes(n)
            if s["name"] in layers]


def _key(s):
    return (s["batch"], s["name"], s["form"])


def check_shapes(shape_list, rtol):
    """[{batch, name, form, ok, rel_err}] of our gemm against torch's product, in this process."""
    import torch
    from minialex.kernels.gemm import gemm
    out = []
    for s in shape_list:
        a, b, c = operands(s)
        ours = gemm(a, b, c.copy(), trans_a=s["trans_a"], trans_b=s["trans_b"], accumulate=s["accumulate"])
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ref = (ta.t() if s["trans_a"] else ta) @ (tb.t() if s["trans_b"] else tb)
        ok, err, _ = compare_outputs([ours], [ref.numpy()], rtol)
        out.append(dict(batch=s["batch"], name=s["name"], form=s["form"], ok=ok, rel_err=err))
    return out


def worker(payload):
    set_threads("minialex", payload["threads"])
    set_threads("torch", payload["threads"])
    return check_shapes(payload["shapes"], payload["rtol"])


def run(opts, alternator):
    todo = shapes(opts)
    t = opts.threads
    notes, failed = [], False
    checks = {}
    if opts.have_torch:
        env = {**worker_env("minialex", t), **worker_env("torch", t)}
        payload = dict(section="gemm", shapes=todo, threads=t, rtol=opts.rtol)
        checks = {_key(r): r for r in run_worker("benchmarks.run", ["--worker", json.dumps(payload)], env)}
    else:
        notes.append("torch is not importable: no torch timings, and nothing to check our results against")
    # benchmarks/gemm.py selects whole layers: one failing shape keeps its layer out of the timing
    bad_layers = {r["name"] for r in checks.values() if not r["ok"]}
    good = [s for s in todo if s["name"] not in bad_layers]
    layers = ",".join(sorted({s["name"] for s in good}))
    timed = {}
    libs = ["minialex", "torch"] if opts.have_torch else ["minialex"]
    if good:
        for lib in alternator.order(libs):
            args = ["--worker", lib, "--threads", str(t), "--batch", *sorted({str(s["batch"]) for s in good}),
                    "--repeats", str(opts.repeats), "--layers", layers]
            env = {**worker_env(lib, t), "OPENBLAS_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
            for r in run_worker("benchmarks.gemm", args, env):
                timed[_key(r) + (lib,)] = r
    records, rows = [], []
    for s in todo:
        chk = checks.get(_key(s))
        label = f"{s['name']} {s['form']}"
        if chk and not chk["ok"]:
            failed = True
            why = f"max relative error {chk['rel_err']:.2e} > {opts.rtol:g}"
            records.append(dict(s, status="FAILED", detail=why))
            rows.append([label, s["batch"], s["m"], s["n"], s["k"], *["–"] * 5, f"FAILED: {why}"])
            continue
        ours, peer = timed.get(_key(s) + ("minialex",)), timed.get(_key(s) + ("torch",))
        if ours is None:
            records.append(dict(s, status="skipped", detail="another shape of this layer failed"))
            rows.append([label, s["batch"], s["m"], s["n"], s["k"], "–", "–", "–", "–", "–",
                         "skipped: another shape of this layer failed"])
            continue
        rec = dict(s, status="OK" if chk else "unchecked", rel_err=chk["rel_err"] if chk else None,
                   ours_s=ours["median_s"], ours_gflops=ours["gflops"],
                   torch_s=peer["median_s"] if peer else None, torch_gflops=peer["gflops"] if peer else None)
        records.append(rec)
        rows.append([label, s["batch"], s["m"], s["n"], s["k"], fmt_ms(rec["ours_s"]), fmt_ms(rec["torch_s"]),
                     fmt_num(rec["ours_gflops"]), fmt_num(rec["torch_gflops"]),
                     fmt_ratio(rec["torch_s"], rec["ours_s"]), f"OK ({chk['rel_err']:.1e})" if chk else "unchecked"])
    header = ["GEMM", "batch", "M", "N", "K", "ours ms", "torch ms", "ours GFLOP/s", "torch GFLOP/s", "torch/ours",
              "check"]
    return dict(records=records, table=markdown_table(header, rows), notes=notes, failed=failed)
