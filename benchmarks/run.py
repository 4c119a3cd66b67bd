"""minialex against PyTorch on this CPU: peak, GEMM, op scenes, layers, training step, inference,
memory and start-up, as Markdown tables on stdout (and JSON with --json).

    python -m benchmarks [--sections peak,gemm,...] [--batch 8 64] [--repeats 5] [--rounds 1]
                         [--threads 2] [--json FILE] [--quick]

Every library is timed in child processes that import only it (see harness.py for why), after
one warm-up call, as the median of --repeats calls (of all --rounds children, each library's
children alternating with the other's, for the sections that compare with torch); a row's ratio is torch ms / our ms, so above
1 means we are faster. Before anything is timed our results are compared with torch's; a
mismatch marks its row FAILED, leaves it untimed and makes the exit status 1. torch is
optional: without it the torch columns stay empty and nothing is checked. The inference section
also runs our model exported to ONNX in onnxruntime, checked and timed the same way (its columns
stay empty without onnx and onnxruntime). Bad options: one line on stderr, exit status 2.
"""
import argparse
import importlib
import json
import os
import sys
import time

if __package__ in (None, ""):
    # run as a script (python benchmarks/run.py): make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, onnxruntime_peer  # noqa: E402
from benchmarks._common import RTOL, machine_info, torch_available  # noqa: E402
from minialex.config import positive_int as _positive_int

# Imported only when used: a worker child loads its own section alone, so the memory section's
# torch child never carries Numba, nor its minialex child torch.
SECTIONS = {"peak": "peak", "gemm": "gemm_suite", "scenes": "scenes", "layers": "layers", "step": "step",
            "inference": "inference", "memory": "memory", "startup": "startup", "distributed": "distributed"}
# Not in the default run: it launches mpiexec and torchrun jobs for about ten minutes (opt in by name).
DEFAULT_SECTIONS = [name for name in SECTIONS if name != "distributed"]


def section_module(name):
    return importlib.import_module(f"benchmarks.{SECTIONS[name]}")
EXIT_FAILED, EXIT_USAGE = 1, 2


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = _Parser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", default=[",".join(DEFAULT_SECTIONS)], metavar="S",
                   help="comma- or space-separated subset of " + ",".join(SECTIONS)
                        + " (default: all but distributed, which needs mpiexec)")
    p.add_argument("--batch", type=_positive_int, nargs="+", metavar="N",
                   help="batch sizes for gemm and layers (default 8 64) and step (default 8 32 64)")
    p.add_argument("--repeats", type=_positive_int, metavar="R", help="timed calls per row, median reported (default 5)")
    p.add_argument("--rounds", type=_positive_int, default=1, metavar="K",
                   help="timing children per library and batch, alternating with torch's; samples pooled "
                        "(default 1; more rounds even out a shared machine's drift)")
    p.add_argument("--threads", type=_positive_int, default=2, metavar="T",
                   help="threads for Numba and torch alike (default 2)")
    p.add_argument("--json", metavar="FILE", help="also write every result as JSON")
    p.add_argument("--quick", action="store_true", help="1 repeat and shorter probes: a fast look, not a result")
    p.add_argument("--gemm-layers", metavar="L,L", help="AlexNet layers for the gemm section (default conv1,conv3,fc6)")
    p.add_argument("--rtol", type=float, default=RTOL,
                   help=f"allowed error, relative to the reference's largest value (default {RTOL:g})")
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16", "int8"), default=["fp32"], metavar="P",
                   help="arithmetic of the convolution and linear layers in the step, inference and layers "
                        "sections: fp32, bf16, int8 (inference only) or several (default fp32); torch runs "
                        "bf16 rows under torch.autocast('cpu', dtype=torch.bfloat16), int8 rows quantised "
                        "by torch.ao.quantization (x86), onnxruntime's by its quantize_static")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def parse_options(argv):
    """The parsed options, with the derived fields the sections read; UsageError on bad input."""
    a = build_parser().parse_args(argv)
    names = [s for item in a.sections for s in item.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise UsageError(f"unknown section {unknown[0]!r}; choose from {','.join(SECTIONS)}")
    a.sections = list(dict.fromkeys(names))
    if a.threads > (os.cpu_count() or 1):
        raise UsageError(f"--threads {a.threads}: this machine has {os.cpu_count()} logical CPUs")
    if not 0 < a.rtol < 1:
        raise UsageError(f"--rtol {a.rtol}: must lie between 0 and 1")
    if a.json:
        folder = os.path.dirname(os.path.abspath(a.json))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UsageError(f"--json {a.json}: folder {folder} does not exist or is not writable")
    a.gemm_layers = [s for s in (a.gemm_layers or "").split(",") if s] or None
    known = {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"}
    for name in a.gemm_layers or []:
        if name not in known:
            raise UsageError(f"--gemm-layers: unknown layer {name!r}; choose from {','.join(sorted(known))}")
    a.precision = list(dict.fromkeys(a.precision))
    a.batches = a.batch
    a.repeats = a.repeats or (1 if a.quick else 5)
    a.warmup = 1
    # not in a worker: importing torch there would put it beside Numba in a minialex child
    a.have_torch = False if a.worker else torch_available()
    a.have_onnxruntime = False if a.worker else onnxruntime_peer.available()
    return a


def header_line(info, opts):
    torch_v = info["torch"] or "not installed"
    ort_v = info.get("onnxruntime") or "not installed"
    return (f"minialex benchmarks, {info['date']}; CPU: {info['cpu']} ({info['cores']} logical); "
            f"threads: {info['threads']}; numpy {info['numpy']}, numba {info['numba']}, torch {torch_v}, "
            f"onnxruntime {ort_v}, "
            f"Python {info['python']}; median of {opts.repeats} after {opts.warmup} warm-up"
            + (f", pooled over {opts.rounds} rounds alternating with torch" if opts.rounds > 1 else "")
            + (" (--quick)" if opts.quick else ""))


def write_json(path, data):
    """Write through a temporary file and rename, so a crash never leaves half a report."""
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def run_suite(opts, out=None):
    """Run the chosen sections, print their tables; returns (report dict, any failure)."""
    out = out or sys.stdout
    info = machine_info(opts.threads)
    print(header_line(info, opts), file=out)
    report = dict(machine=info, options=dict(sections=opts.sections, batches=opts.batches, repeats=opts.repeats,
                                             rounds=opts.rounds,
                                             warmup=opts.warmup, threads=opts.threads, quick=opts.quick,
                                             rtol=opts.rtol, precision=opts.precision),
                  sections={})
    alternator = harness.Alternator()
    any_failed = False
    for name in opts.sections:
        module = section_module(name)
        print(f"[{name}] running ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = module.run(opts, alternator)
        except RuntimeError as e:  # a child process died; its stderr has already been shown
            result = dict(records=[], table=f"ERROR: {e}", notes=[], failed=True)
        result["seconds"] = time.perf_counter() - start
        any_failed = any_failed or result["failed"]
        print(f"\n## {module.TITLE}\n\n{result['table']}", file=out)
        for note in result["notes"]:
            print(f"\n{note}", file=out)
        out.flush()
        print(f"[{name}] {result['seconds']:.0f} s", file=sys.stderr, flush=True)
        report["sections"][name] = dict(title=module.TITLE, records=result["records"], notes=result["notes"],
                                        failed=result["failed"], seconds=result["seconds"])
    report["failed"] = any_failed
    return report, any_failed


def worker_main(text):
    """Child side: run what the payload asks of its section, print the results as one JSON line."""
    payload = json.loads(text)
    module = section_module(payload["section"])
    results = module.worker(payload) if hasattr(module, "worker") else harness.worker(module, payload)
    print(json.dumps(results))
    return 0


def main(argv=None):
    try:
        opts = parse_options(argv)
    except UsageError as e:
        print(f"python -m benchmarks: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if opts.worker:
        return worker_main(opts.worker)
    report, failed = run_suite(opts)
    if opts.json:
        write_json(opts.json, report)
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
