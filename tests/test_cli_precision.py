"""`train -precision bf16` end to end: the emulated path (forced by MINIALEX_BF16=emulate, as on a
CPU without AVX512_BF16) says so, the native one does not; checkpoints stay float32 and a resumed
run may change the precision; bad values are one line, exit 2."""
import numpy as np
import pytest

from helpers import FAST, assert_user_error, run_cli
from minialex.checkpoint import load_checkpoint
from minialex.kernels.simd_bf16 import has_avx512_bf16

EMULATED = "warning: -precision bf16 is emulated (MINIALEX_BF16=emulate)"


def test_bf16_training_emulated_then_resumed_in_fp32(demo16, tmp_path):
    train, _ = demo16
    r = run_cli(["train", "-list", train, *FAST, "-epochs", 1, "-precision", "bf16", "-save", "w.npz"],
                cwd=tmp_path, env={"MINIALEX_BF16": "emulate"}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert EMULATED in r.stderr and "bf16 products" in r.stderr
    ck = load_checkpoint(tmp_path / "w.npz")
    assert all(v.dtype == np.float32 for v in ck.state_dict.values() if v.dtype.kind == "f")
    first = {k: v.copy() for k, v in ck.state_dict.items()}
    r = run_cli(["train", "-list", train, *FAST, "-epochs", 2, "-resume", "w.npz"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "bf16" not in r.stderr      # the command line's precision (fp32 by default) wins
    ck = load_checkpoint(tmp_path / "w.npz")
    assert ck.train_state["epoch"] == 2
    assert any(not np.array_equal(v, first[k]) for k, v in ck.state_dict.items())


@pytest.mark.skipif(not has_avx512_bf16(), reason="no AVX512_BF16 on this CPU")
def test_bf16_training_native_matches_the_emulated_run_closely(demo16, tmp_path):
    train, _ = demo16
    losses = {}
    for name, env in (("native", {}), ("emulated", {"MINIALEX_BF16": "emulate"})):
        r = run_cli(["train", "-list", train, *FAST, "-epochs", 1, "-precision", "bf16", "-save", f"{name}.npz"],
                    cwd=tmp_path, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert ("emulated" in r.stderr) == (name == "emulated")
        losses[name] = load_checkpoint(tmp_path / f"{name}.npz").train_state["history"][-1]["train_loss"]
    # the same arithmetic up to the order of float32 sums
    assert abs(losses["native"] - losses["emulated"]) <= 1e-3 * abs(losses["emulated"])


@pytest.mark.parametrize("args,env,message", [
    (["-precision", "fp16"], {}, "-precision: invalid choice: 'fp16'"),
    (["-precision", "bf16"], {"MINIALEX_BF16": "fast"}, "MINIALEX_BF16 must be 'emulate', 'auto' or unset"),
])
def test_bad_precision_settings_are_one_line(demo16, tmp_path, args, env, message):
    train, _ = demo16
    r = run_cli(["train", "-list", train, *FAST, "-epochs", 1, *args], cwd=tmp_path, env=env)
    assert_user_error(r, message)
    assert not (tmp_path / "alexnet.npz").exists()
