"""Numerical guards on real runs: the first-loss check against ln(classes), a NaN/inf loss or
gradient stopping the run with epoch, batch and a lower -lr while the last checkpoint stays as it
was, and no fastmath code on the path those checks depend on."""
import ast
import math
import os
import re
import shutil

import numpy as np

import minialex.nn
import minialex.run as run_module
import minialex.train as train_module
from minialex.checkpoint import load_checkpoint
from minialex.cli import main
from minialex.kernels.batchnorm import batchnorm2d_backward, batchnorm2d_forward_train
from minialex.kernels.conv import conv2d_backward
from minialex.kernels.lrn import lrn_forward

from .conftest import REPO

ARGS = ["-arch", "cifar", "-batchsize", "8", "-threads", "1", "-workers", "0", "-seed", "5"]


def _train(demo16, save, epochs, *extra):
    return main(["train", "-list", str(demo16[0]), "-epochs", str(epochs), "-save", str(save), *ARGS, *extra])


def _first_batch(demo16, save, std_factor, monkeypatch):
    """One torchvision batch with the measured std divided by std_factor.

    torchvision, because it has no LRN: LRN divides by a power of its inputs' energy, which makes
    the cifar and paper variants almost blind to the scale of their inputs at initialisation.
    """
    real = run_module.measure_normalization

    def scaled(*args):
        norm = real(*args)
        return dict(norm, std=[s / std_factor for s in norm["std"]])

    monkeypatch.setattr(run_module, "measure_normalization", scaled)
    train_module.run_training(train_module.TrainConfig(
        list_path=str(demo16[0]), epochs=1, batch_size=4, arch="torchvision", threads=1, workers=0,
        max_batches=1, save=str(save), seed=5))


def test_first_loss_warning_on_bad_normalisation_only(demo16, tmp_path, monkeypatch, capsys, same_threads):
    _first_batch(demo16, tmp_path / "ok.npz", 1, monkeypatch)
    assert "far from ln(10)" not in capsys.readouterr().err  # sensible inputs: loss ~ 2.30 at the start
    try:
        _first_batch(demo16, tmp_path / "bad.npz", 1000, monkeypatch)
    except train_module.Diverged:
        pass  # it may go on to diverge; the warning must have come first either way
    err = capsys.readouterr().err
    assert f"is far from ln(10) = {math.log(10):.3f}" in err and "normalised sensibly" in err


class _InfGradientOnCall(minialex.nn.CrossEntropyLoss):
    """The real loss, whose backward on its n-th call returns an infinite gradient."""
    calls = 0
    at = 1

    def backward(self, grad_out=1.0):
        grad = super().backward(grad_out)
        type(self).calls += 1
        if type(self).calls == self.at:
            grad = np.full_like(grad, np.inf)
        return grad


def test_infinite_gradient_stops_the_run_and_keeps_the_last_checkpoint(demo16, tmp_path, monkeypatch, capsys,
                                                                      same_threads):
    save = tmp_path / "w.npz"
    assert _train(demo16, save, 1) == 0
    before = save.read_bytes()
    monkeypatch.setattr(minialex.nn, "CrossEntropyLoss", _InfGradientOnCall)
    _InfGradientOnCall.calls, _InfGradientOnCall.at = 0, 2  # epoch 2, batch 2 of the resumed run
    code = main(["train", "-list", str(demo16[0]), "-resume", str(save), "-epochs", "3", "-threads", "1",
                 "-workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    # inf - inf inside backward makes the norm NaN as often as inf; either must stop the run.
    assert re.match(r"minialex: error: gradient norm is (inf|nan) at epoch 2, batch 2: training stopped, ", err[-1])
    assert f"{save} left as it was" in err[-1] and "try a lower learning rate (e.g. -lr 0.001)" in err[-1]
    assert save.read_bytes() == before and os.listdir(tmp_path) == ["w.npz"]


def test_nan_loss_from_a_huge_learning_rate_keeps_the_last_checkpoint(demo16, tmp_path, capsys, same_threads):
    save = tmp_path / "w.npz"
    assert _train(demo16, save, 1) == 0
    good = tmp_path / "good.npz"
    shutil.copy(save, good)
    assert _train(demo16, save, 3, "-lr", "1e15") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "at epoch 1, batch" in last and ("loss is nan" in last or "is inf" in last), last
    # A fresh run diverging in epoch 1 never overwrote the file it was told to save to.
    assert save.read_bytes() == good.read_bytes()
    assert load_checkpoint(save).train_state["epoch"] == 1


def _fastmath_functions():
    """(file, function) for every @njit(..., fastmath=True) in the package."""
    found = []
    kernels = os.path.join(REPO, "minialex")
    for folder, _, files in os.walk(kernels):
        for name in files:
            if name.endswith(".py"):
                tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.FunctionDef):
                        for dec in node.decorator_list:
                            if isinstance(dec, ast.Call) and any(
                                    k.arg == "fastmath" and not (isinstance(k.value, ast.Constant)
                                                                 and k.value.value is False)
                                    for k in dec.keywords):
                                found.append((name, node.name))
    return found


def test_no_fastmath_on_the_guard_path():
    """The loss (cross_entropy), the optimiser step and grad_norm (NumPy) decide what the guards see;
    fastmath lets LLVM assume no NaN/inf exists, so it must stay out of them."""
    files = {f for f, _ in _fastmath_functions()}
    assert not files & {"cross_entropy.py", "optim.py", "train.py", "gemm.py", "linear.py"}, files


def test_fastmath_is_used_exactly_where_the_docs_say():
    """docs/reliability.md lists every fastmath kernel by name; a new one must be listed (and
    checked for NaN propagation) or this fails."""
    found = sorted(_fastmath_functions())
    assert found == [("batchnorm.py", "_channel_sq_dev"), ("batchnorm.py", "_channel_sum"),
                     ("batchnorm.py", "_grad_sums"), ("batchnorm.py", "_sq_devs"),
                     ("batchnorm.py", "_stats"), ("batchnorm.py", "_sums"),
                     ("lrn.py", "_lrn_bwd"), ("lrn.py", "_lrn_fwd"), ("lrn.py", "_neg_pow"),
                     ("parallel.py", "mask_copy_sum")], found
    doc = open(os.path.join(REPO, "docs", "reliability.md"), encoding="utf-8").read()
    section = doc[doc.index("**fastmath**"):]
    section = section[:section.index("\n- **")] if "\n- **" in section else section
    for file, function in found:
        assert f"`{file}`" in section and f"`{function}`" in section, (file, function)


def test_fastmath_batchnorm_and_blocked_conv_propagate_nan():
    """Batch norm's sums and the blocked convolution's bias-gradient sum are reassociated, never
    told "no NaN": a NaN going in must come out."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    x[2, 1, 3, 3] = np.nan
    y, mean, var, _ = batchnorm2d_forward_train(x, np.ones(3, np.float32), np.zeros(3, np.float32))
    assert np.isnan(mean[1]) and np.isnan(var[1]) and np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dy[0, 0, 1, 1] = np.nan
    x[2, 1, 3, 3] = 0.0
    _, mean, _, invstd = batchnorm2d_forward_train(x, None, None)
    dgamma, dbeta = np.zeros(3, np.float32), np.zeros(3, np.float32)
    batchnorm2d_backward(dy, x, None, mean, invstd, dgamma, dbeta)
    assert np.isnan(dgamma[0]) and np.isnan(dbeta[0]) and np.isfinite(dbeta[1:]).all()
    # The blocked path (float32, odd channel count, at least one image per thread).
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    dyc = rng.standard_normal((4, 5, 5, 5)).astype(np.float32)
    dyc[1, 2, 0, 0] = np.nan
    dw, db = np.zeros_like(w), np.zeros(5, np.float32)
    conv2d_backward(dyc, x, w, dw, db, 1, 1, 1)
    assert np.isnan(db[2]) and np.isfinite(db[[0, 1, 3, 4]]).all()


def test_fastmath_lrn_still_propagates_nan_and_inf():
    """LRN (paper variant) is compiled with fastmath: check a non-finite input cannot come out finite,
    or a NaN born before it would never reach the loss check."""
    x = np.random.default_rng(0).standard_normal((2, 8, 5, 5)).astype(np.float32)
    x[0, 3, 2, 2], x[1, 5, 1, 1] = np.nan, np.inf
    y = lrn_forward(x, 5, 1e-4, 0.75, 2.0)[0]
    assert not np.isfinite(y[0, 3, 2, 2]) and not np.isfinite(y[1, 5, 1, 1])
    assert np.isfinite(y[:, :, 0, 0]).all()  # and it does not spread where it should not
