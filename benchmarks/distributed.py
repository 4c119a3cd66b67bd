"""Data-parallel training on MPI, measured on this machine and modelled for a cluster.

    python -m benchmarks --sections distributed [--rounds K] [--quick] [--json FILE]
    python -m benchmarks.distributed --model [--from FILE]   # only the cost model's tables

The section (opt-in: it needs mpi4py and mpiexec, and skips with one line without them) prints:
a. all-reduce bandwidth of 2 processes (mpi4py, in-place SUM, blocking and Iallreduce+Wait);
b. minialex training throughput for 1 process x 1 thread, 1 x 2 and 2 x 1 (mpiexec -n 2) with the
   GradientReducer's communication counters;
c. the same with PyTorch DDP (gloo, torchrun, loopback only);
d. the ratios the targets are about;
e. per-layer backward times and the cost model: its check against (b), its predictions for
   clusters of N machines (plain, bf16 gradients, Krizhevsky's "one weird trick").
Every launch is a fresh process group; the configurations alternate (their order reverses from
one round to the next, and the two libraries swap who goes first), and every figure is the median
of the per-step times pooled over all rounds. The spread column is the range of the per-round
medians relative to the median: how noisy the shared machine was for that row.
"""
import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import REPO_ROOT, fmt_num, markdown_table, set_threads, worker_env  # noqa: E402

TITLE = "Data-parallel training on MPI (2 processes on this machine, against PyTorch DDP)"
SIZES_MB = (1, 4, 16, 64, 256)
QUICK_SIZES_MB = (1, 4)
CONFIGS = ((1, 1), (1, 2), (2, 1))                       # (processes, threads per process)
BF16 = "minialex bf16"   # minialex with gradients sent as bf16 (2-process rows only)
CASES = (("cifar", 128), ("torchvision", 16), ("torchvision", 64))
QUICK_CASES = (("cifar", 32), ("torchvision", 4))
VARIANTS = {"cifar": dict(classes=10, size=32), "torchvision": dict(classes=1000, size=224)}
DEFAULT_ROUNDS = 3
STEPS, WARMUP = 3, 2          # timed steps and warm-up steps per launch
TIMEOUT_S = 900               # one launch; a hung collective fails the section instead of the machine

# Cost model (docs/distributed.md): a node is a machine like this one, NODE_CORES cores working in
# parallel on NODE_BATCH images per step.
MACHINES = (2, 4, 8, 16, 32, 64)
LINKS_GBIT = (10, 25, 100)
NODE_BATCH = {"cifar": 128, "torchvision": 64}
NODE_CORES = 2
LATENCY_S = 30e-6             # per message of a ring step over TCP/Ethernet: an assumption, not measured
SCHEMES = ("data parallel", "data parallel without overlap", "bf16 gradients", "one weird trick")


# -- availability and launching ---------------------------------------------------------------------

def unavailable():
    """Why the section cannot run here (one line), or None."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install mpi4py mpich)"
    if shutil.which("mpiexec") is None:
        return "no mpiexec on PATH"
    return None


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd, env_extra):
    """Run one job; the last line rank 0 printed, parsed as JSON. RuntimeError when it fails."""
    env = dict(os.environ, **env_extra)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
                              cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... did not finish in {TIMEOUT_S} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with code {proc.returncode}")
    return json.loads(lines[-1])


def launch_minialex(payload, processes, threads):
    """A minialex job: mpiexec -n P for several processes, a plain process for one."""
    args = [sys.executable, "-m", "benchmarks._mpi_worker", json.dumps(payload)]
    cmd = ["mpiexec", "-n", str(processes), *args] if processes > 1 else args
    return _launch(cmd, worker_env("minialex", threads))


def launch_ddp(payload, processes, threads):
    """A PyTorch job under torchrun on the loopback address."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "benchmarks._ddp_worker", json.dumps(payload)]
    return _launch(cmd, worker_env("torch", threads))


# -- a. all-reduce bandwidth --------------------------------------------------------------------------

def bus_factor(n):
    """Share of the buffer each process sends (and receives) in a ring all-reduce: 2(N-1)/N."""
    return 2.0 * (n - 1) / n


def allreduce_bandwidth(opts):
    sizes = QUICK_SIZES_MB if opts.quick else SIZES_MB
    payload = dict(action="allreduce", sizes_mb=list(sizes), warmup=2, rounds=opts.dist_rounds,
                   repeats=2 if opts.quick else 5)
    records = launch_minialex(payload, 2, 1)
    rows = []
    for r in records:
        t = float(np.median(r["samples"]))
        r.update(median_s=t, algo_gbs=r["bytes"] / t / 1e9, bus_gbs=bus_factor(r["processes"]) * r["bytes"] / t / 1e9,
                 spread=_spread_of(r["samples"], opts.dist_rounds))
        del r["samples"]
        rows.append([r["mb"], r["mode"], f"{t * 1e3:.2f}", f"{r['algo_gbs']:.2f}", f"{r['bus_gbs']:.2f}",
                     f"{r['spread'] * 100:.0f}%"])
    table = markdown_table(["MB", "call", "ms (median)", "GB/s (bytes/time)", "bus GB/s (2(N-1)/N bytes/time)",
                            "spread"], rows)
    return records, table


def _spread_of(samples, rounds):
    """Range of the per-round medians over the pooled median (samples are in round order)."""
    if rounds < 2:
        return (max(samples) - min(samples)) / float(np.median(samples))
    chunks = np.array_split(np.asarray(samples), rounds)
    medians = [float(np.median(c)) for c in chunks if len(c)]
    return (max(medians) - min(medians)) / float(np.median(samples))


# -- b, c. training throughput ------------------------------------------------------------------------

def _train_payload(variant, batch, threads, opts):
    return dict(action="train", variant=variant, global_batch=batch, threads=threads,
                warmup=1 if opts.quick else WARMUP, steps=1 if opts.quick else STEPS, **VARIANTS[variant])


def training(opts, libs):
    """{(lib, variant, batch, processes, threads): record} with per-round medians and pooled samples."""
    cases = QUICK_CASES if opts.quick else CASES
    jobs = [(v, b, p, t) for v, b in cases for p, t in CONFIGS]
    results = {}
    for r in range(opts.dist_rounds):
        order = jobs if r % 2 == 0 else list(reversed(jobs))
        for i, (variant, batch, procs, threads) in enumerate(order):
            first = libs if (r + i) % 2 == 0 else list(reversed(libs))
            for lib in first:
                if lib == BF16 and procs == 1:   # gradient transport exists only between processes
                    continue
                payload = _train_payload(variant, batch, threads, opts)
                if lib == BF16:
                    payload["grad_dtype"] = "bf16"
                launch = launch_ddp if lib == "torch" else launch_minialex
                out = launch(payload, procs, threads)
                rec = results.setdefault((lib, variant, batch, procs, threads),
                                         dict(lib=lib, variant=variant, batch=batch, processes=procs,
                                              threads=threads, samples=[], round_medians=[], comm=[], wait=[]))
                rec["samples"] += out["samples"]
                rec["round_medians"].append(float(np.median(out["samples"])))
                if "comm_s" in out:
                    rec["comm"].append(out["comm_s"])
                    rec["wait"].append(out["wait_s"])
                    rec["buckets"] = out["buckets"]
    for rec in results.values():
        step = float(np.median(rec["samples"]))
        rec.update(step_s=step, images_s=rec["batch"] / step, best_images_s=rec["batch"] / min(rec["samples"]),
                   spread=(max(rec["round_medians"]) - min(rec["round_medians"])) / step)
        if rec["comm"]:
            rec.update(comm_s=float(np.median(rec["comm"])), wait_s=float(np.median(rec["wait"])))
            rec["hidden"] = 1.0 - rec["wait_s"] / rec["comm_s"] if rec["comm_s"] > 0 else None
    return results


def throughput_table(results, lib):
    rows = []
    for rec in results.values():
        if rec["lib"] != lib:
            continue
        row = [rec["variant"], rec["batch"], f"{rec['processes']} x {rec['threads']}", f"{rec['step_s'] * 1e3:.0f}",
               fmt_num(rec["images_s"]), fmt_num(rec["best_images_s"]), f"{rec['spread'] * 100:.0f}%"]
        if lib != "torch":
            distributed = rec["processes"] > 1
            row += [f"{rec['comm_s'] * 1e3:.1f}" if distributed else "–",
                    f"{rec['wait_s'] * 1e3:.1f}" if distributed else "–",
                    f"{rec['hidden'] * 100:.0f}%" if distributed and rec["hidden"] is not None else "–"]
        rows.append(row)
    header = ["variant", "global batch", "processes x threads", "ms/step (median)", "images/s", "best step: images/s",
              "spread"]
    if lib != "torch":
        header += ["comm ms/step", "wait ms/step", "hidden"]
    return markdown_table(header, rows)


def ratio_rows(results):
    """The rows the issue's targets are about: [(what, value text, target text)]."""
    def rec(lib, variant, batch, p, t):
        return results.get((lib, variant, batch, p, t))
    rows = []
    cifar = next((b for v, b in CASES + QUICK_CASES if v == "cifar" and rec("minialex", v, b, 2, 1)), None)
    if cifar:
        one, two = rec("minialex", "cifar", cifar, 1, 1), rec("minialex", "cifar", cifar, 2, 1)
        rows.append([f"cifar {cifar}: minialex 2 x 1 / 1 x 1", f"{two['images_s'] / one['images_s']:.2f}x", ">= 1.8x"])
        ddp = rec("torch", "cifar", cifar, 2, 1)
        if ddp:
            rows.append([f"cifar {cifar}: minialex 2 x 1 / DDP 2 x 1", f"{two['images_s'] / ddp['images_s']:.2f}x", ""])
        rows.append([f"cifar {cifar}: communication wait / step (2 x 1)", f"{two['wait_s'] / two['step_s'] * 100:.1f}%",
                     "<= 10%"])
    for v, b in CASES + QUICK_CASES:
        if v != "torchvision":
            continue
        ours, ddp = rec("minialex", v, b, 2, 1), rec("torch", v, b, 2, 1)
        if ours and ddp:
            rows.append([f"torchvision {b}: minialex 2 x 1 / DDP 2 x 1", f"{ours['images_s'] / ddp['images_s']:.2f}x", ""])
    for v, b in CASES + QUICK_CASES:
        ours, half = rec("minialex", v, b, 2, 1), rec(BF16, v, b, 2, 1)
        if ours and half:
            rows.append([f"{v} {b}: 2 x 1 with bf16 gradients / float32 gradients",
                         f"{half['images_s'] / ours['images_s']:.2f}x", ""])
    return rows


# -- e. per-layer backward times (run in a child of its own) -----------------------------------------

def layer_times(variant, batch, threads, repeats=3, warmup=1):
    """Forward, every layer's backward (in backward order, with its gradient bytes) and the
    optimiser step of one minialex training step, medians of `repeats` after `warmup` steps."""
    set_threads("minialex", threads)
    from minialex import _random, models, nn, optim
    spec = VARIANTS[variant]
    _random.manual_seed(0)
    model = models.alexnet(num_classes=spec["classes"], variant=variant)
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, spec["size"], spec["size"]), dtype=np.float32)
    y = (rng.integers(0, 1 << 30, batch) % spec["classes"]).astype(np.int64)
    record = []
    for name, module in model.named_modules():
        if module._modules or not name:
            continue

        def timed(grad_out, need_input_grad=True, _name=name, _backward=module.backward):
            t0 = time.perf_counter()
            g = _backward(grad_out, need_input_grad=need_input_grad)
            record.append((_name, time.perf_counter() - t0))
            return g
        module.backward = timed
    grad_bytes = {name: sum(p.data.nbytes for p in m._parameters.values()) for name, m in model.named_modules()}
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    samples = []
    for i in range(warmup + repeats):
        record.clear()
        t0 = time.perf_counter()
        loss_fn(model(x), y)
        t1 = time.perf_counter()
        opt.zero_grad()
        model.backward(loss_fn.backward())
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= warmup:
            samples.append(dict(forward=t1 - t0, backward=t2 - t1, opt=t3 - t2, layers=list(record)))
    names = [n for n, _ in samples[0]["layers"]]
    layers = [dict(name=n, kind=kinds[n], backward_s=float(np.median([s["layers"][j][1] for s in samples])),
                   grad_bytes=grad_bytes[n]) for j, n in enumerate(names)]
    med = {k: float(np.median([s[k] for s in samples])) for k in ("forward", "opt")}
    # backward as the sum of its layers' medians, so the timeline ends where backward does
    return dict(variant=variant, batch=batch, threads=threads, forward_s=med["forward"],
                backward_s=sum(layer["backward_s"] for layer in layers),
                opt_s=med["opt"], layers=layers, fc_features=model.classifier[1].in_features)


def measure_layers(jobs, quick):
    """layer_times of every (variant, batch, threads) in `jobs`, each in a fresh child process."""
    out = []
    for variant, batch, threads in jobs:
        payload = dict(variant=variant, batch=batch, threads=threads, repeats=1 if quick else 3)
        cmd = [sys.executable, "-m", "benchmarks.distributed", "--layer-times", json.dumps(payload)]
        out.append(_launch(cmd, worker_env("minialex", threads)))
    return out


def layer_table(timings):
    rows = []
    for t in timings:
        done = 0.0
        for layer in t["layers"]:
            done += layer["backward_s"]
            if layer["grad_bytes"]:
                rows.append([f"{t['variant']} {t['batch']}", f"{layer['name']} ({layer['kind']})", f"{layer['backward_s'] * 1e3:.1f}",
                             f"{layer['grad_bytes'] / 2**20:.2f}", f"{(t['backward_s'] - done) * 1e3:.1f}"])
        rows.append([f"{t['variant']} {t['batch']}", "whole step: forward / backward / SGD",
                     f"{t['forward_s'] * 1e3:.0f} / {t['backward_s'] * 1e3:.0f} / {t['opt_s'] * 1e3:.0f}", "", ""])
    return markdown_table(["variant, batch per process", "layer (backward order)", "backward ms",
                           "gradient MB", "backward left after it, ms"], rows)


# -- the cost model -----------------------------------------------------------------------------------

def buckets(timing, convs_only=False, bucket_bytes=None):
    """[(ready time from the start of backward in s, bytes)] of the gradient buckets in the order
    GradientReducer forms them (backward order, closed at bucket_bytes), each ready when the layer
    holding its last gradient has finished backward; convs_only leaves the FC layers' gradients
    out. The wrapped layer times count the parameter-free layers (pooling, flatten) apart; they
    only move the clock."""
    if bucket_bytes is None:
        from minialex.distributed import BUCKET_BYTES
        bucket_bytes = BUCKET_BYTES
    out, clock, size = [], 0.0, 0
    for layer in timing["layers"]:
        clock += layer["backward_s"]
        if not layer["grad_bytes"] or (convs_only and not layer["name"].startswith("features")):
            continue
        size += layer["grad_bytes"]
        if size >= bucket_bytes:
            out.append((clock, size))
            size = 0
    if size:
        out.append((clock, size))
    return out


def ring_allreduce_s(nbytes, n, bandwidth, latency=LATENCY_S):
    """Ring all-reduce of nbytes over n nodes: 2(n-1) steps each sending nbytes/n."""
    return 0.0 if n < 2 else 2 * (n - 1) * latency + bus_factor(n) * nbytes / bandwidth


def ring_gather_s(nbytes_per_node, n, bandwidth, latency=LATENCY_S):
    """Ring all-gather (or reduce-scatter) where every node contributes nbytes_per_node."""
    return 0.0 if n < 2 else (n - 1) * (latency + nbytes_per_node / bandwidth)


def overlapped(ready, n, bandwidth, backward_s, latency=LATENCY_S):
    """Seconds the step waits after backward: buckets leave one after another on one link, each
    once it is ready and the previous one is done; what ends after backward is exposed."""
    end = 0.0
    for at, nbytes in ready:
        end = max(end, at) + ring_allreduce_s(nbytes, n, bandwidth, latency)
    return max(0.0, end - backward_s)


def predict(timing, n, bandwidth, scheme="data parallel", latency=LATENCY_S):
    """(step seconds, exposed communication seconds) of one node of an n-node run whose compute is
    `timing` (layer_times at the node's batch), for a scheme of SCHEMES."""
    compute = timing["forward_s"] + timing["backward_s"] + timing["opt_s"]
    if scheme == "data parallel":
        exposed = overlapped(buckets(timing), n, bandwidth, timing["backward_s"], latency)
    elif scheme == "data parallel without overlap":
        exposed = sum(ring_allreduce_s(b, n, bandwidth, latency) for _, b in buckets(timing))
    elif scheme == "bf16 gradients":
        exposed = overlapped([(at, b / 2) for at, b in buckets(timing)], n, bandwidth, timing["backward_s"], latency)
    elif scheme == "one weird trick":
        # FC layers model-parallel: the node's batch x features activations are all-gathered forward
        # and their gradients reduce-scattered backward, both on the critical path; the FC compute per
        # node is unchanged (n x the batch on 1/n of the weights). Conv gradients as in data parallel.
        act = timing["batch"] * timing["fc_features"] * 4
        exposed = 2 * ring_gather_s(act, n, bandwidth, latency)
        exposed += overlapped(buckets(timing, convs_only=True), n, bandwidth, timing["backward_s"], latency)
    else:
        raise ValueError(scheme)
    return compute + exposed, exposed


def node_timing(core_timing, cores=NODE_CORES):
    """A node's step at `cores` times the batch, taken as one core's step (layer_times with one
    thread) at the node's batch / cores: the cores share the batch and work in parallel. (Two-thread
    timings of one process are not used: on a shared machine a thread that loses its core stalls
    every parallel region, and 2 processes x 1 thread scaled 1.84x here.)"""
    return dict(core_timing, batch=cores * core_timing["batch"], threads=cores)


def node_timings_of(core_timings):
    """The nodes of the predictions, from the one-thread timings at NODE_BATCH / NODE_CORES."""
    wanted = {(v, b // NODE_CORES) for v, b in NODE_BATCH.items()}
    return [node_timing(t) for t in core_timings if (t["variant"], t["batch"]) in wanted]


def prediction_tables(node_timings):
    """Markdown: per variant and scheme, images/s (efficiency) for every N and link speed."""
    parts = []
    for timing in node_timings:
        compute = timing["forward_s"] + timing["backward_s"] + timing["opt_s"]
        for scheme in SCHEMES:
            rows = []
            for n in MACHINES:
                row = [n, n * timing["batch"]]
                for gbit in LINKS_GBIT:
                    step, _ = predict(timing, n, gbit * 1e9 / 8, scheme)
                    row.append(f"{n * timing['batch'] / step:.0f} ({compute / step * 100:.0f}%)")
                rows.append(row)
            parts.append(f"{timing['variant']}, {timing['batch']} images per node, {scheme} "
                         f"(1 node alone: {timing['batch'] / compute:.1f} images/s):\n\n"
                         + markdown_table(["N", "global batch"] + [f"{g} Gb/s: images/s (efficiency)"
                                                                   for g in LINKS_GBIT], rows))
    return "\n\n".join(parts)


def model_check(process_timings, results, bus_gbs):
    """Predicted against measured images/s of 2 processes x 1 thread here, with the measured bus
    bandwidth as the link and no latency term."""
    rows, errors = [], []
    for timing in process_timings:
        key = ("minialex", timing["variant"], 2 * timing["batch"], 2, 1)
        measured = results.get(key)
        step, exposed = predict(timing, 2, bus_gbs * 1e9, latency=0.0)
        predicted = 2 * timing["batch"] / step
        row = [timing["variant"], 2 * timing["batch"], f"{predicted:.1f}", f"{exposed * 1e3:.1f}"]
        if measured:
            err = predicted / measured["images_s"] - 1
            errors.append(err)
            best = predicted / measured["best_images_s"] - 1
            row += [f"{measured['images_s']:.1f}", f"{measured['best_images_s']:.1f}", f"{measured['wait_s'] * 1e3:.1f}",
                    f"{err * 100:+.0f}%", f"{best * 100:+.0f}%"]
        else:
            row += ["–"] * 5
        rows.append(row)
    return markdown_table(["variant", "global batch", "predicted images/s", "predicted wait ms",
                           "measured images/s (median)", "(best step)", "measured wait ms", "error (median)",
                           "error (best step)"], rows), errors


# -- the section --------------------------------------------------------------------------------------

def _skip(reason):
    return dict(records=[], table=f"skipped: {reason}", notes=[], failed=False)


def run(opts, alternator=None):
    reason = unavailable()
    if reason:
        return _skip(reason)
    opts.dist_rounds = 1 if opts.quick else max(opts.rounds, DEFAULT_ROUNDS)
    load_before = os.getloadavg()
    notes = []
    ar_records, ar_table = allreduce_bandwidth(opts)
    libs = ["minialex", BF16, "torch"] if opts.have_torch else ["minialex", BF16]
    if not opts.have_torch:
        notes.append("torch is not importable: no DDP rows")
    results = training(opts, libs)
    cases = QUICK_CASES if opts.quick else CASES
    process_jobs = [(v, b // 2, 1) for v, b in cases]
    process_timings = measure_layers(process_jobs, opts.quick)
    node_timings = node_timings_of(process_timings) or [node_timing(t) for t in process_timings[:2]]
    load_after = os.getloadavg()
    four = [r for r in ar_records if r["mb"] == 4 and r["mode"] == "Iallreduce+Wait"]
    bus = four[0]["bus_gbs"] if four else ar_records[-1]["bus_gbs"]
    check_table, errors = model_check(process_timings, results, bus)

    notes.append(f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
                 f"{opts.dist_rounds} round(s), {1 if opts.quick else STEPS} timed step(s) after "
                 f"{1 if opts.quick else WARMUP} warm-up per launch; spread = range of the round medians / median")
    tables = [("a. All-reduce of float32 buffers, 2 processes, in place, SUM", ar_table),
              ("b. minialex training throughput (comm = summed start-to-end time of the bucket all-reduces, "
               "wait = time in finish(), hidden = 1 - wait/comm)", throughput_table(results, "minialex"))]
    tables.append(("b2. minialex with -grad_dtype bf16 (gradients sent as bfloat16, error feedback)",
                   throughput_table(results, BF16)))
    if "torch" in libs:
        tables.append(("c. PyTorch DDP (gloo, torchrun, 127.0.0.1) throughput", throughput_table(results, "torch")))
    tables.append(("d. Targets", markdown_table(["ratio", "measured", "target"], ratio_rows(results))))
    tables.append(("e. Backward of every layer with gradients, 1 thread, per-process batch", layer_table(process_timings)))
    tables.append((f"f. Cost model against the measurement (link = the measured {bus:.2f} GB/s bus bandwidth "
                   f"at 4 MB)", check_table))
    tables.append((f"g. Predicted clusters of machines with {NODE_CORES} cores like this one (a node's step: one "
                   f"core's at its share of the node's batch), ring all-reduce, "
                   f"{LATENCY_S * 1e6:.0f} us per message", prediction_tables(node_timings)))
    table = "\n\n".join(f"### {title}\n\n{body}" for title, body in tables)
    records = dict(allreduce=ar_records, training=list(results.values()), process_timings=process_timings,
                   node_timings=node_timings, model_errors=errors, bus_gbs=bus)
    return dict(records=records, table=table, notes=notes, failed=False)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="store_true", help="print the cost model's tables")
    p.add_argument("--from", dest="source", metavar="FILE",
                   help="with --model: take the timings from a --json report of the section instead of measuring")
    p.add_argument("--quick", action="store_true", help="with --model: small batches, one repeat")
    p.add_argument("--layer-times", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.layer_times:
        job = json.loads(a.layer_times)
        print(json.dumps(layer_times(job["variant"], job["batch"], job["threads"], job["repeats"])))
        return 0
    if not a.model:
        p.error("nothing to do: give --model (the section runs with python -m benchmarks --sections distributed)")
    if a.source:
        try:
            with open(a.source) as f:
                records = json.load(f)["sections"]["distributed"]["records"]
            node_timings = node_timings_of(records["process_timings"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--from {a.source}: not a report of the distributed section ({type(e).__name__}: {e})")
    else:
        jobs = [("cifar", 16, 1), ("torchvision", 2, 1)] if a.quick else [(v, b // NODE_CORES, 1)
                                                                           for v, b in NODE_BATCH.items()]
        core = measure_layers(jobs, a.quick)
        node_timings = node_timings_of(core) or [node_timing(t) for t in core]
    print(prediction_tables(node_timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
