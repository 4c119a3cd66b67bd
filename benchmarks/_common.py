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


def time_samples(fn, repeats, warmup=1):
    """Wall times of `repeats` calls of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def time_call(fn, repeats, warmup=1):
    """Median and best wall time of fn() over `repeats` runs after `warmup` runs."""
    ts = time_samples(fn, repeats, warmup)
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


# -- shared by the suite in run.py ------------------------------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-3  # our result may differ from torch's by this fraction of the reference's largest value


def torch_available():
    """True when torch imports; the suite then times it as our peer and checks against it."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_model():
    """The 'model name' line of /proc/cpuinfo, or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def machine_info(threads):
    """Date, CPU, thread count and library versions, for the report's header."""
    import datetime
    import numba
    info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), cpu=cpu_model(),
                cores=os.cpu_count(), threads=threads, python=sys.version.split()[0],
                numpy=np.__version__, numba=numba.__version__, torch=None, onnxruntime=None)
    if torch_available():
        import torch
        info["torch"] = torch.__version__
    from . import onnxruntime_peer
    if onnxruntime_peer.available():
        info["onnxruntime"] = onnxruntime_peer.version()
    return info


def worker_env(lib, threads):
    """Environment of a child timing `lib` with `threads` threads (the repo importable from anywhere)."""
    path = os.environ.get("PYTHONPATH", "")
    env = {"PYTHONPATH": REPO_ROOT + (os.pathsep + path if path else ""), "OMP_NUM_THREADS": str(threads)}
    if lib == "minialex":
        # numba.set_num_threads cannot go above the pool size fixed at import
        env["NUMBA_NUM_THREADS"] = str(max(threads, int(os.environ.get("NUMBA_NUM_THREADS", "0") or 0)))
    return env


def set_threads(lib, threads):
    """Inside a child: give `lib` exactly `threads` compute threads (and minialex the malloc tuning
    training applies, so a timed step allocates as a training step does)."""
    if lib == "minialex":
        import numba

        from minialex._memory import keep_freed_memory
        keep_freed_memory()
        numba.set_num_threads(threads)
    elif lib == "torch":
        import torch
        torch.set_num_threads(threads)
    elif lib == "onnxruntime":
        from . import onnxruntime_peer
        onnxruntime_peer.set_threads(threads)


def max_rel_error(ours, ref):
    """max|ours - ref| / max|ref| (absolute error when ref is all zeros); inf on a shape mismatch or NaN."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    if ours.size == 0:
        return 0.0
    diff = np.abs(ours - ref)
    if not np.isfinite(diff).all():
        # NaN where the reference has NaN too is agreement (e.g. a NaN input); anything else is not
        same_nan = np.isnan(ours) & np.isnan(ref)
        if not (np.isfinite(diff) | same_nan).all():
            return float("inf")
        diff = np.where(same_nan, 0.0, diff)
        ref = np.where(same_nan, 0.0, ref)
    scale = float(np.abs(ref).max())
    return float(diff.max() / scale) if scale > 0 else float(diff.max())


def norm_rel_error(ours, ref):
    """||ours - ref|| / ||ref|| (absolute when ref is zero); inf on a shape mismatch or non-finite values."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape or not (np.isfinite(ours).all() and np.isfinite(ref).all()):
        return float("inf")
    scale = float(np.linalg.norm(ref))
    diff = float(np.linalg.norm(ours - ref))
    return diff / scale if scale > 0 else diff


# Whole-network gradients in float32 are compared norm-wise with this much more room: last-bit
# differences flip a few ReLU and max-pool decisions, which moves single entries of the weight
# gradients of the early layers. On this project's machine torch's own float32 gradients of
# torchvision's AlexNet (batch 32) lie up to 6e-3 norm-wise from the float64 truth, ours about
# 1e-3; a wrong kernel is off by order 1.
LOOSE_FACTOR = 10


def compare_outputs(ours, ref, rtol=RTOL, loose=()):
    """(ok, worst error, index of the worst array) over two equally long lists of arrays.

    Arrays are compared by max_rel_error against rtol, except the indices in `loose`: by
    norm_rel_error against LOOSE_FACTOR * rtol. The worst array is the one nearest its limit.
    """
    if len(ours) != len(ref):
        return False, float("inf"), None
    if not ours:
        return True, 0.0, None
    errors, limits = [], []
    for i, (a, b) in enumerate(zip(ours, ref)):
        if i in loose:
            errors.append(norm_rel_error(a, b))
            limits.append(LOOSE_FACTOR * rtol)
        else:
            errors.append(max_rel_error(a, b))
            limits.append(rtol)
    worst = int(np.argmax([e / lim for e, lim in zip(errors, limits)]))
    return errors[worst] <= limits[worst], errors[worst], worst


def _proc_status_mb(field):
    """A size field of /proc/self/status ("VmHWM", "VmRSS"; reported in kB) in MB, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb():
    """This process's peak resident set (VmHWM) in MB; ru_maxrss where /proc is missing."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb():
    """This process's resident set now (VmRSS) in MB, or None without /proc."""
    return _proc_status_mb("VmRSS")


def fmt_ms(seconds):
    return "–" if seconds is None else f"{seconds * 1e3:.2f}" if seconds < 0.1 else f"{seconds * 1e3:.1f}"


def fmt_num(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def fmt_ratio(torch_s, ours_s):
    """torch time / our time: above 1 means we are faster."""
    if torch_s is None or ours_s is None or ours_s <= 0:
        return "–"
    return f"{torch_s / ours_s:.2f}x"
