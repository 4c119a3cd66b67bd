"""Sections made of cases: check every case once against torch, then time each library on its own.

Order of work for one section:
1. one child process builds every case with both libraries and compares all outputs (forward
   result, every gradient) -- a case that disagrees, or raises, is FAILED and is not timed;
2. the cases are timed in children that import only one library each, one child per library,
   batch size and round (--rounds), the library that goes first alternating from one child to
   the next; a row's median and best are over the samples of all its rounds.

Separate processes because on two cores the OpenMP pools of Numba and torch disturb each other:
a pool that has just finished spins for a while, taking the core the other one wants. Alternation
spreads the drift of a shared, noisy machine over both libraries instead of one; several rounds
(ours, torch, torch, ours, ...) keep a slow minute from landing on one library only.

A section module using this provides `cases(opts)` (JSON-able dicts with at least "name" and
"batch"; "min_rtol" raises the check's tolerance for that case, as bf16 rows need) and
`build(case, lib)` returning an `ops.Bench`.
"""
import json

import numpy as np

from ._common import (LOOSE_FACTOR, RTOL, compare_outputs, fmt_ms, fmt_num, fmt_ratio, markdown_table, run_worker,
                      set_threads, time_samples, worker_env)

LIBS = ("minialex", "torch")
# What each peer needs installed, and the note shown without it.
MISSING = {"torch": "torch is not importable: no torch timings, and nothing to check our results against",
           "onnxruntime": "onnx or onnxruntime is not importable: the onnxruntime columns stay empty "
                          "(pip install onnx onnxruntime)"}
HEADER = ["case", "batch", "pass", "ours ms", "torch ms", "ours GFLOP/s", "torch GFLOP/s", "torch/ours", "check"]


# bf16 rows: both sides round to 8 significant bits, at different points (torch's autocast keeps
# bf16 activations, minialex float32 ones), so logits differ by about 1% and, at initialisation,
# early layers' gradients by up to 25% norm-wise from float32 (tests/models/test_bf16_step.py)
BF16_RTOL = 5e-2
# int8 rows: ours and each int8 peer quantise the same float model with their own calibration
# (ours: the criterion that wins on the calibration images; torch: histogram observers;
# onnxruntime: min-max), so each is 1-2% of the largest logit off the float model, and the two
# of a check by up to the sum.
INT8_RTOL = 6e-2
RTOL_OF = {"bf16": BF16_RTOL, "int8": INT8_RTOL}


def with_precision(cases, opts, supported=("fp32", "bf16")):
    """Each case once per precision of --precision the section supports; bf16 and int8 copies
    are named so and checked at RTOL_OF[precision]."""
    out = []
    for precision in getattr(opts, "precision", ["fp32"]):
        if precision not in supported:
            continue
        for c in cases:
            if precision == "fp32":
                out.append(dict(c, precision="fp32"))
            else:
                out.append(dict(c, name=f"{c['name']} {precision}", precision=precision,
                                min_rtol=RTOL_OF[precision]))
    return out


def check_cases(build, cases, rtol=RTOL, peers=("torch",)):
    """Compare minialex with every library of `peers` on every case, in this process:
    [{name, batch, peer, phase, ok, rel_err, error}]."""
    out = []
    for case in cases:
        key = dict(name=case["name"], batch=case["batch"])
        case_rtol = max(rtol, case.get("min_rtol", 0.0))
        try:
            bench = build(case, "minialex")
            ours = bench.outputs()
        except Exception as e:  # a kernel that raises is as wrong as one that miscomputes
            out.append(dict(key, peer="minialex", phase="all", ok=False, rel_err=None,
                            error=f"{type(e).__name__}: {e}"))
            continue
        for peer in peers:
            try:
                ref = build(case, peer).outputs()
            except Exception as e:
                out.append(dict(key, peer=peer, phase="all", ok=False, rel_err=None,
                                error=f"{peer}: {type(e).__name__}: {e}"))
                continue
            for phase, expected in ref.items():
                ok, err, worst = compare_outputs(ours.get(phase, []), expected, case_rtol,
                                                 bench.loose.get(phase, ()))
                names = bench.labels.get(phase, [])
                where = names[worst] if worst is not None and worst < len(names) else f"output {worst}"
                limit = case_rtol
                if worst in bench.loose.get(phase, ()):
                    where += " (norm-wise)"
                    limit = LOOSE_FACTOR * case_rtol
                if peer != "torch":
                    where = f"{where} against {peer}"
                out.append(dict(key, peer=peer, phase=phase, ok=ok, rel_err=err, limit=limit, worst=where,
                                error=None))
    return out


def time_cases(build, cases, lib, repeats, warmup=1):
    """Seconds of every timed call (and their median and best) of every phase of every case on
    `lib`, in this process."""
    out = []
    for case in cases:
        bench = build(case, lib)
        for phase, fn, flops in bench.phases:
            ts = time_samples(fn, repeats, warmup)
            out.append(dict(name=case["name"], batch=case["batch"], phase=phase, lib=lib,
                            median_s=float(np.median(ts)), best_s=float(min(ts)), samples=ts, flops=flops))
        del bench
    return out


def _pool(old, new):
    """One timing record from two rounds of the same row: their samples together."""
    if old is None:
        return new
    samples = old["samples"] + new["samples"]
    return dict(old, samples=samples, median_s=float(np.median(samples)), best_s=float(min(samples)))


def worker(module, payload):
    """Child side: run the check or the timings the parent asked for; returns JSON-able results."""
    threads = payload["threads"]
    if payload["action"] == "check":
        peers = payload.get("peers", ["torch"])
        for lib in ["minialex", *peers]:
            set_threads(lib, threads)
        return check_cases(module.build, payload["cases"], payload.get("rtol", RTOL), peers)
    set_threads(payload["lib"], threads)
    return time_cases(module.build, payload["cases"], payload["lib"], payload["repeats"], payload["warmup"])


def _child(section, payload, libs, threads):
    env = {}
    for lib in libs:
        env.update(worker_env(lib, threads))
    return run_worker("benchmarks.run", ["--worker", json.dumps(dict(payload, section=section, threads=threads))],
                      env)


class Alternator:
    """Which library goes first in the next round: flips every call."""

    def __init__(self):
        self.flip = False

    def order(self, libs):
        self.flip = not self.flip
        return list(libs) if self.flip else list(reversed(libs))


def available_peers(opts, peers):
    """The libraries of `peers` installed here, and a note for each missing one."""
    have = dict(torch=opts.have_torch, onnxruntime=getattr(opts, "have_onnxruntime", False))
    return [p for p in peers if have[p]], [MISSING[p] for p in peers if not have[p]]


def run_cases(section, cases, opts, alternator=None, peers=("torch",)):
    """Check and time `cases` of `section` in child processes; returns the section's result dict.

    `peers` are the libraries ours is checked against and timed beside ("torch", and for
    inference "onnxruntime"); each record gets `<peer>_s`, `<peer>_best_s`, and the ratio
    peer ms / our ms (torch's as "ratio", the others' as "<peer>_ratio").
    """
    alternator = alternator or Alternator()
    failed = False
    present, notes = available_peers(opts, peers)
    libs = ["minialex", *present]
    checks = {}
    if present:
        check = dict(action="check", cases=cases, peers=present, rtol=getattr(opts, "rtol", RTOL))
        for r in _child(section, check, libs, opts.threads):
            checks.setdefault((r["name"], r["batch"]), []).append(r)

    def bad(case):
        return any(not r["ok"] for r in checks.get((case["name"], case["batch"]), []))

    timed = {}
    batches = sorted({c["batch"] for c in cases})
    for batch in batches:
        todo = [c for c in cases if c["batch"] == batch and not bad(c)]
        if not todo:
            continue
        for _ in range(getattr(opts, "rounds", 1)):
            for lib in alternator.order(libs):
                payload = dict(action="time", lib=lib, cases=todo, repeats=opts.repeats, warmup=opts.warmup)
                for r in _child(section, payload, [lib], opts.threads):
                    key = (r["name"], r["batch"], r["phase"], r["lib"])
                    timed[key] = _pool(timed.get(key), r)

    records, rows = [], []
    for case in cases:
        key = (case["name"], case["batch"])
        found = checks.get(key, [])
        if bad(case):
            failed = True
            for r in found:
                if not r["ok"]:
                    why = r["error"] or f"{r['worst']}: relative error {r['rel_err']:.2e} > {r['limit']:g}"
                    records.append(dict(case=case["name"], batch=case["batch"], phase=r["phase"],
                                        status="FAILED", detail=why))
                    rows.append([case["name"], case["batch"], r["phase"], "–", "–", "–", "–", "–",
                                 f"FAILED: {why}"])
            continue
        phases = [p for (n, b, p, lib) in timed if (n, b) == key and lib == "minialex"]
        for phase in phases:
            ours = timed[key + (phase, "minialex")]
            checked = {r["peer"]: r for r in found if r["phase"] == phase}
            check = checked.get("torch")
            rec = dict(case=case["name"], batch=case["batch"], phase=phase,
                       status="OK" if checked else "unchecked",
                       rel_err=check["rel_err"] if check else None, flops=ours["flops"],
                       ours_s=ours["median_s"], ours_best_s=ours["best_s"])
            for peer in peers:
                timing = timed.get(key + (phase, peer))
                rec[f"{peer}_s"] = timing["median_s"] if timing else None
                rec[f"{peer}_best_s"] = timing["best_s"] if timing else None
                rec[f"{peer}_gflops"] = ours["flops"] / timing["median_s"] / 1e9 if ours["flops"] and timing else None
                rec["ratio" if peer == "torch" else f"{peer}_ratio"] = (
                    timing["median_s"] / rec["ours_s"] if timing else None)
                if peer != "torch":
                    rec[f"{peer}_rel_err"] = checked[peer]["rel_err"] if peer in checked else None
            rec["ours_gflops"] = ours["flops"] / ours["median_s"] / 1e9 if ours["flops"] else None
            records.append(rec)
            rows.append([case["name"], case["batch"], phase, fmt_ms(rec["ours_s"]), fmt_ms(rec["torch_s"]),
                         fmt_num(rec["ours_gflops"]), fmt_num(rec["torch_gflops"]),
                         fmt_ratio(rec["torch_s"], rec["ours_s"]), check_cell(rec, peers)])
    return dict(records=records, table=markdown_table(HEADER, rows), notes=notes, failed=failed)


def check_cell(rec, peers=("torch",)):
    """The check column: the status with the error against each peer that was checked."""
    if rec["status"] != "OK":
        return rec["status"]
    errors = [f"{rec['rel_err']:.1e}"] if rec["rel_err"] is not None else []
    errors += [f"{p} {rec[p + '_rel_err']:.1e}" for p in peers
               if p != "torch" and rec.get(p + "_rel_err") is not None]
    return f"OK ({', '.join(errors)})"
