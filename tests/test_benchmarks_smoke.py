"""The benchmark suite runs end to end on tiny inputs, and its check refuses wrong results."""
import json
import types

import numpy as np
import pytest

from benchmarks import harness, ops, run
from benchmarks._common import compare_outputs, max_rel_error

TINY = [
    dict(name="conv", kind="conv", batch=2, x=[2, 3, 9, 9], w=[4, 3, 3, 3], stride=2, padding=1),
    dict(name="relu", kind="relu", batch=2, x=[2, 4, 5, 5]),
    dict(name="fc", kind="linear", batch=2, x=[2, 16], out=8),
    dict(name="dropout", kind="dropout", batch=2, x=[2, 16], p=0.5),
]


def _opts(*argv):
    return run.parse_options(["--quick", *argv])


def _wrong_relu(x):
    return np.abs(x)  # right where x >= 0, wrong elsewhere


def test_compare_outputs_measures_error_relative_to_magnitude():
    ref = np.array([1000.0, 1.0], dtype=np.float32)
    assert compare_outputs([ref + np.float32(0.5)], [ref])[0]  # 0.5 off a largest value of 1000
    ok, err, worst = compare_outputs([ref, ref * 1.01], [ref, ref])
    assert not ok and worst == 1 and err == pytest.approx(0.01, rel=1e-3)
    assert max_rel_error(np.zeros(3), np.zeros(4)) == float("inf")
    assert max_rel_error(np.array([np.nan]), np.array([1.0])) == float("inf")
    assert max_rel_error(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])) == 0.0


def test_loose_outputs_are_compared_norm_wise():
    ref = np.ones(10_000, dtype=np.float32)
    one_flip = ref.copy()
    one_flip[7] = 0.5  # one entry moved, as a flipped max-pool decision moves it
    assert not compare_outputs([one_flip], [ref])[0]
    assert compare_outputs([one_flip], [ref], loose={0})[0]
    assert not compare_outputs([ref * 1.5], [ref], loose={0})[0]  # wrong everywhere stays wrong


def test_checker_passes_our_kernels_and_catches_a_wrong_one(torch, monkeypatch):
    good = harness.check_cases(ops.build, TINY)
    assert good and all(r["ok"] for r in good), good
    from minialex.kernels import relu
    monkeypatch.setattr(relu, "relu_forward", _wrong_relu)
    bad = harness.check_cases(ops.build, [TINY[1]])
    forward = next(r for r in bad if r["phase"] == "forward")
    assert not forward["ok"] and forward["worst"] == "y" and forward["rel_err"] > 0.5


def test_checker_counts_an_exception_as_a_failure(torch, monkeypatch):
    from minialex.kernels import linear

    def broken(*args, **kwargs):
        raise ValueError("shape trouble")
    monkeypatch.setattr(linear, "linear_forward", broken)
    (r,) = harness.check_cases(ops.build, [TINY[2]])
    assert not r["ok"] and "shape trouble" in r["error"]


def test_failed_case_is_reported_and_not_timed(torch, monkeypatch):
    # children cannot see a monkeypatch, so the section's "children" run here
    section = types.SimpleNamespace(build=ops.build)
    monkeypatch.setattr(harness, "_child",
                        lambda name, payload, libs, threads: harness.worker(section, dict(payload, threads=threads)))
    from minialex.kernels import relu
    monkeypatch.setattr(relu, "relu_forward", _wrong_relu)
    result = harness.run_cases("layers", TINY, _opts())
    assert result["failed"]
    by_case = {}
    for rec in result["records"]:
        by_case.setdefault(rec["case"], []).append(rec)
    # |x| as the forward also spoils the backward, which masks with the saved output
    assert [(r["phase"], r["status"]) for r in by_case["relu"]] == [("forward", "FAILED"), ("backward", "FAILED")]
    assert "ours_s" not in by_case["relu"][0]
    assert {r["status"] for r in by_case["conv"] + by_case["fc"]} == {"OK"}
    assert "FAILED: y: relative error" in result["table"]


def test_tiny_layer_section_in_child_processes():
    opts = _opts()
    result = harness.run_cases("layers", TINY, opts)
    assert not result["failed"], result["table"]
    phases = {(r["case"], r["phase"]) for r in result["records"]}
    assert phases == {(c["name"], p) for c in TINY for p in ("forward", "backward")}
    for r in result["records"]:
        assert r["ours_s"] > 0
        assert (r["torch_s"] > 0 and r["status"] == "OK") if opts.have_torch else r["torch_s"] is None
    conv_fwd = next(r for r in result["records"] if r["case"] == "conv" and r["phase"] == "forward")
    assert conv_fwd["flops"] == 2 * 2 * 4 * 5 * 5 * 3 * 3 * 3
    assert "| conv | 2 | forward |" in result["table"]


def test_rounds_pool_the_samples_of_every_child(monkeypatch):
    section = types.SimpleNamespace(build=ops.build)
    children = []

    def child(name, payload, libs, threads):
        children.append(payload.get("lib"))
        return harness.worker(section, dict(payload, threads=threads))
    monkeypatch.setattr(harness, "_child", child)
    opts = _opts("--rounds", "3", "--repeats", "2")
    result = harness.run_cases("layers", TINY[1:2], opts)
    timing = [c for c in children if c is not None]
    assert timing.count("minialex") == 3
    if opts.have_torch:
        # alternating: no library goes first twice in a row
        assert timing == ["minialex", "torch", "torch", "minialex", "minialex", "torch"]
    for r in result["records"]:
        assert r["ours_s"] > 0 and r["ours_best_s"] <= r["ours_s"]
    a = dict(samples=[3.0, 1.0], median_s=2.0, best_s=1.0)
    pooled = harness._pool(harness._pool(None, a), dict(samples=[5.0, 4.0, 0.5], median_s=4.0, best_s=0.5))
    assert pooled["samples"] == [3.0, 1.0, 5.0, 4.0, 0.5] and pooled["median_s"] == 3.0 and pooled["best_s"] == 0.5


def test_suite_entry_point_runs_peak_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert run.main(["--sections", "peak", "--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("minialex benchmarks, ") and "threads: 2" in printed
    report = json.loads(out.read_text())
    rows = report["sections"]["peak"]["records"]
    assert [r["threads"] for r in rows] == [1, 2] and all(r["gflops"] > 0.1 for r in rows)
    assert report["failed"] is False and report["machine"]["numba"]


def test_peak_reports_bf16_and_int8_beside_float32_or_says_they_are_unsupported(monkeypatch):
    from benchmarks import peak
    from minialex.kernels.simd_bf16 import has_avx512_bf16
    from minialex.kernels.simd_int8 import has_avx512_vnni
    monkeypatch.setattr(peak, "run_worker", lambda module, args, env: peak.worker(json.loads(args[1])))
    result = peak.run(_opts())
    if has_avx512_bf16():
        assert all(r["bf16_gflops"] > 0.1 and r["bf16_ratio"] > 0 for r in result["records"])
        assert result["table"].count("vdpbf16ps") == 2
    if has_avx512_vnni():
        assert all(r["int8_gops"] > 0.1 and r["int8_ratio"] > 0 for r in result["records"])
        assert result["table"].count("vpdpbusd), GOP/s") == 2
    if has_avx512_bf16() and has_avx512_vnni():
        assert "not supported" not in result["table"]
    # without the flags nothing of bf16 or int8 is executed and each row says why
    monkeypatch.setattr(peak, "has_avx512_bf16", lambda: False)
    monkeypatch.setattr(peak, "_bf16_threads", None)
    monkeypatch.setattr(peak, "_bf16_dot", None)
    monkeypatch.setattr(peak, "has_avx512_vnni", lambda: False)
    monkeypatch.setattr(peak, "_int8_threads", None)
    monkeypatch.setattr(peak, "_int8_dot", None)
    result = peak.run(_opts())
    assert all("bf16_gflops" not in r and "int8_gops" not in r for r in result["records"])
    assert result["table"].count("not supported by this CPU") == 4


@pytest.mark.parametrize("argv, message", [
    (["--sections", "peak,nope"], "unknown section 'nope'"),
    (["--threads", "0"], "must be at least 1"),
    (["--rounds", "0"], "must be at least 1"),
    (["--batch", "eight"], "'eight' is not an integer"),
    (["--gemm-layers", "conv9"], "unknown layer 'conv9'"),
    (["--json", "{missing}/x.json"], "does not exist or is not writable"),
])
def test_bad_options_give_one_line_and_exit_2(argv, message, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "missing") for a in argv]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# -- the distributed section (opt-in; needs mpi4py and mpiexec) -----------------------------------------

def test_distributed_section_is_opt_in_and_skips_without_mpi(monkeypatch):
    from benchmarks import distributed
    assert "distributed" not in _opts().sections and "peak" in _opts().sections
    assert _opts("--sections", "distributed").sections == ["distributed"]
    monkeypatch.setattr(distributed, "unavailable", lambda: "mpi4py is not installed")
    result = distributed.run(_opts("--sections", "distributed"))
    assert result == dict(records=[], table="skipped: mpi4py is not installed", notes=[], failed=False)


def _timing(fc_ready, backward, conv_bytes=4 << 20, fc_bytes=64 << 20):
    """A two-layer timeline: an FC layer whose gradient is ready at fc_ready, then a conv."""
    return dict(variant="toy", batch=8, forward_s=0.1, backward_s=backward, opt_s=0.0, fc_features=1000,
                layers=[dict(name="classifier.1", kind="Linear", backward_s=fc_ready, grad_bytes=fc_bytes),
                        dict(name="features.0", kind="Conv2d", backward_s=backward - fc_ready,
                             grad_bytes=conv_bytes)])


def test_cost_model_ring_and_overlap():
    from benchmarks import distributed as d
    gbit10 = 10e9 / 8
    assert d.ring_allreduce_s(1e9, 1, gbit10) == 0.0
    assert d.ring_allreduce_s(1e9, 4, gbit10, latency=0.0) == pytest.approx(1.5 * 1e9 / gbit10)
    # FC gradients (64 MB, 0.1 s on the wire at N=2) ready early, 1 s of conv backward left: hidden
    long = _timing(fc_ready=0.01, backward=1.0)
    step, exposed = d.predict(long, 2, gbit10 * 1.2, latency=0.0)
    assert exposed < 0.01 and step == pytest.approx(1.1 + exposed)
    _, no_overlap = d.predict(long, 2, gbit10 * 1.2, "data parallel without overlap", latency=0.0)
    assert no_overlap == pytest.approx((68 << 20) / (gbit10 * 1.2))
    # a short backward cannot hide it; bf16 halves what is exposed
    short = _timing(fc_ready=0.001, backward=0.002)
    _, fp32 = d.predict(short, 2, gbit10, latency=0.0)
    _, half = d.predict(short, 2, gbit10, "bf16 gradients", latency=0.0)
    assert fp32 > 0.05 and half == pytest.approx(fp32 / 2, rel=0.05)
    # one weird trick: no FC gradients move, but the activations grow with the global batch, so with N
    fc_only = _timing(fc_ready=0.001, backward=0.002, conv_bytes=0)
    _, at4 = d.predict(fc_only, 4, gbit10, "one weird trick", latency=0.0)
    _, at16 = d.predict(fc_only, 16, gbit10, "one weird trick", latency=0.0)
    assert at16 > 4 * at4 > 0


@pytest.mark.skipif(__import__("benchmarks.distributed", fromlist=["x"]).unavailable() is not None,
                    reason="needs mpi4py and mpiexec")
def test_distributed_section_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "dist.json"
    assert run.main(["--sections", "distributed", "--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for title in ("a. All-reduce", "b. minialex training throughput", "d. Targets", "f. Cost model",
                  "g. Predicted clusters"):
        assert title in printed
    records = json.loads(out.read_text())["sections"]["distributed"]["records"]
    assert {(r["mb"], r["mode"]) for r in records["allreduce"]} == {
        (mb, mode) for mb in (1, 4) for mode in ("Allreduce", "Iallreduce+Wait")}
    assert all(r["bus_gbs"] > 0.01 for r in records["allreduce"])
    ours = [r for r in records["training"] if r["lib"] == "minialex"]
    assert {(r["processes"], r["threads"]) for r in ours} == {(1, 1), (1, 2), (2, 1)}
    assert all(r["images_s"] > 0 for r in records["training"])
    for r in ours:
        if r["processes"] == 2:
            assert r["comm_s"] > 0 and 0 <= r["wait_s"] and r["hidden"] <= 1
    assert len(records["model_errors"]) == 2 and all(abs(e) < 10 for e in records["model_errors"])


# -- onnxruntime, the inference section's second peer ----------------------------------------------------

TINY_NET = dict(name="cifar tiny", variant="cifar", batch=2, size=32, classes=10)


def _in_process_children(monkeypatch, section):
    monkeypatch.setattr(harness, "_child",
                        lambda name, payload, libs, threads: harness.worker(section, dict(payload, threads=threads)))


def test_onnxruntime_peer_checks_our_logits_and_catches_a_wrong_one(monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from benchmarks import inference
    (good,) = harness.check_cases(inference.build, [TINY_NET], peers=["onnxruntime"])
    assert good["ok"] and good["peer"] == "onnxruntime" and good["rel_err"] < 1e-5, good
    # our classifier's last layer goes wrong; onnxruntime runs the exported weights, so it must disagree
    from minialex.nn import linear
    right = linear.linear_forward
    monkeypatch.setattr(linear, "linear_forward", lambda x, w, b, **kw: right(x, w, b, **kw) * np.float32(1.5))
    (bad,) = harness.check_cases(inference.build, [TINY_NET], peers=["onnxruntime"])
    assert not bad["ok"] and "against onnxruntime" in bad["worst"] and bad["rel_err"] > 0.1


def test_inference_section_reports_onnxruntime_beside_torch_in_child_processes():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from benchmarks import inference
    from benchmarks.step import images_table
    opts = _opts()
    result = images_table(harness.run_cases("inference", [TINY_NET], opts, peers=inference.PEERS),
                          peers=inference.PEERS)
    assert not result["failed"], result["table"]
    (rec,) = result["records"]
    assert rec["status"] == "OK" and rec["onnxruntime_s"] > 0 and rec["onnxruntime_rel_err"] < 1e-5
    assert rec["onnxruntime_ratio"] == pytest.approx(rec["onnxruntime_s"] / rec["ours_s"])
    assert rec["onnxruntime_images_s"] == pytest.approx(2 / rec["onnxruntime_s"])
    header = result["table"].splitlines()[0]
    assert "| torch ms | onnxruntime ms |" in header and "| torch/ours | onnxruntime/ours |" in header
    assert f"onnxruntime {rec['onnxruntime_rel_err']:.1e})" in result["table"]
    assert not any("onnxruntime" in n for n in result["notes"])


def test_without_onnxruntime_its_columns_stay_empty_with_a_note(monkeypatch):
    from benchmarks import inference
    from benchmarks.step import images_table
    _in_process_children(monkeypatch, inference)
    opts = _opts("--repeats", "1")
    opts.have_torch, opts.have_onnxruntime = False, False
    result = images_table(harness.run_cases("inference", [TINY_NET], opts, peers=inference.PEERS),
                          peers=inference.PEERS)
    (rec,) = result["records"]
    assert rec["status"] == "unchecked" and rec["ours_s"] > 0
    assert rec["onnxruntime_s"] is None and rec["onnxruntime_ratio"] is None and rec["torch_s"] is None
    assert any("onnxruntime is not importable" in n and "pip install onnx onnxruntime" in n for n in result["notes"])
    row = result["table"].splitlines()[2]
    assert row.startswith("| cifar tiny | 2 |") and row.endswith("| – | – | unchecked |")
    assert len(row.split("|")) == len(result["table"].splitlines()[0].split("|"))


def test_other_sections_keep_torch_as_their_only_peer(monkeypatch):
    _in_process_children(monkeypatch, types.SimpleNamespace(build=ops.build))
    result = harness.run_cases("layers", TINY[1:2], _opts())
    assert all("onnxruntime_s" not in r for r in result["records"])
    assert not any("onnxruntime" in n for n in result["notes"])


def test_int8_rows_exist_only_where_a_section_supports_them():
    """--precision int8: the inference section gets int8 copies of its cases (checked at the int8
    tolerance); the step and layer sections, which train, get none."""
    from benchmarks import harness, inference, step
    opts = _opts("--precision", "fp32", "int8")
    rows = inference.cases(opts)
    assert [r["precision"] for r in rows] == ["fp32", "fp32", "int8", "int8"]
    assert all(r["min_rtol"] == harness.INT8_RTOL and r["name"].endswith(" int8") for r in rows[2:])
    assert {r["precision"] for r in step.cases(opts)} == {"fp32"}
    assert step.cases(_opts("--precision", "int8")) == []
