"""Tests skip for exactly the optional package they use: with onnxruntime (or onnx as well) missing,
the ONNX tests that need neither still run and pass."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONNX_TESTS = os.path.join(REPO, "tests", "interop", "test_interop_onnx.py")


def _pytest_without(packages, tmp_path):
    """Verbose pytest of the ONNX tests in a child where importing `packages` fails."""
    for name in packages:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('{name} hidden for this test', name='{name}')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", ONNX_TESTS],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return dict(re.findall(r"::(\w+)\S* (PASSED|SKIPPED|FAILED|ERROR)", r.stdout))


@pytest.mark.parametrize("hidden,runs", [
    (["onnxruntime"], {"test_graph_has_the_expected_operators_and_metadata", "test_even_lrn_size_is_refused",
                       "test_adaptive_pool_matrix_follows_pytorch_windows", "test_missing_onnx_package_is_a_clear_error"}),
    (["onnxruntime", "onnx"], {"test_adaptive_pool_matrix_follows_pytorch_windows",
                               "test_missing_onnx_package_is_a_clear_error"}),
])
def test_only_tests_needing_a_missing_package_skip(tmp_path, hidden, runs):
    # Hides packages that are there; where they are not (CI's light pass), that pass itself
    # runs the ONNX tests without them.
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    outcomes = _pytest_without(hidden, tmp_path)
    assert outcomes.get("test_onnxruntime_matches_minialex") == "SKIPPED", outcomes
    for name in runs:
        assert outcomes.get(name) == "PASSED", (name, outcomes)
