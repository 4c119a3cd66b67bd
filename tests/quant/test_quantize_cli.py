"""quantize -> inference -> eval through the command line, as a user runs them."""
import json

import numpy as np

from helpers import assert_user_error, run_cli, write_list
from minialex.data import read_list


def test_quantize_inference_eval(trained, demo_lists, tmp_path):
    calib = write_list(tmp_path / "calib.list", read_list(demo_lists[0])[:40])
    r = run_cli(["quantize", "-load", trained, "-calib", calib, "-save", "w8.npz", "-images", 16,
                 "-threads", 1, "-workers", 1, "-batchsize", 8], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for c in ("max", "percentile", "mse", "entropy"):
        assert any(line.startswith(c) for line in lines), r.stdout
    assert "16 calibration images; kept " in r.stdout and "<- kept" in r.stdout
    with np.load(tmp_path / "w8.npz") as z:
        header = json.loads(z["__minialex__"].tobytes())
    assert header["int8"]["calibration"]["images"] == 16
    assert f"kept {header['int8']['criterion']}" in r.stdout

    image = read_list(demo_lists[1])[0].path
    outs = [run_cli(["inference", "-load", w, "-input", image, "-topk", 3, "-threads", 1], cwd=tmp_path)
            for w in ("w8.npz", trained)]
    for o in outs:
        assert o.returncode == 0, o.stderr
    int8_top, float_top = (o.stdout.splitlines()[1].split("(")[-1] for o in outs)
    assert int8_top == float_top                           # the same best class
    test16 = write_list(tmp_path / "test16.list", read_list(demo_lists[1])[:16])
    evals = [run_cli(["eval", "-list", test16, "-load", w, "-workers", 1, "-threads", 1], cwd=tmp_path)
             for w in ("w8.npz", trained)]
    for e in evals:
        assert e.returncode == 0, e.stderr
        assert ": 16 images  top-1 " in e.stdout and "confusion matrix" in e.stdout


def test_calibration_list_defaults_to_the_recorded_training_list(trained, tmp_path):
    """The float checkpoint records the list it was trained on; quantize samples it."""
    r = run_cli(["quantize", "-load", trained, "-save", "w8.npz", "-images", 8, "-criterion", "max",
                 "-threads", 1, "-workers", 1], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "calibrating on the training list" in r.stderr
    assert "8 calibration images; kept max" in r.stdout


def test_emulated_int8_says_so_and_computes_the_same(trained, demo_lists, tmp_path):
    """MINIALEX_INT8=emulate (what a CPU without AVX512_VNNI runs): a warning, the same file and
    the same predictions; an unknown value is one line, exit 2, before any work."""
    calib = write_list(tmp_path / "calib.list", read_list(demo_lists[0])[:8])
    image = read_list(demo_lists[1])[0].path
    runs = {}
    for mode in ("auto", "emulate"):
        env = {"MINIALEX_INT8": mode}
        q = run_cli(["quantize", "-load", trained, "-calib", calib, "-save", f"{mode}.npz", "-images", 8,
                     "-criterion", "max", "-threads", 1, "-workers", 1], cwd=tmp_path, env=env, timeout=300)
        i = run_cli(["inference", "-load", f"{mode}.npz", "-input", image, "-threads", 1], cwd=tmp_path, env=env)
        assert q.returncode == 0 and i.returncode == 0, q.stderr + i.stderr
        runs[mode] = (q, i)
    warning = "warning: int8 inference is emulated (MINIALEX_INT8=emulate)"
    assert warning in runs["emulate"][0].stderr and warning in runs["emulate"][1].stderr
    assert runs["emulate"][1].stdout == runs["auto"][1].stdout
    with np.load(tmp_path / "auto.npz") as a, np.load(tmp_path / "emulate.npz") as b:
        assert sorted(a.files) == sorted(b.files) and all((a[k] == b[k]).all() for k in a.files)
    r = run_cli(["inference", "-load", "auto.npz", "-input", image], cwd=tmp_path, env={"MINIALEX_INT8": "fast"})
    assert_user_error(r, "MINIALEX_INT8 must be 'emulate', 'auto' or unset, not 'fast'")
