"""Hostile checkpoints and targets through `minialex export` and `minialex compare`: one line, exit 2,
nothing written, and a target that is not a regular file left as it was, refused before any work."""
import os
import stat

import numpy as np
import pytest
from PIL import Image

import minialex
from minialex import models
from minialex.checkpoint import save_checkpoint

from .conftest import assert_one_line_error, run_cli

NORM = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "resize": 36, "crop": 32}


def _save_cifar(path, input_size=32, normalization=NORM):
    minialex.manual_seed(0)
    model = models.alexnet(num_classes=3, variant="cifar")
    save_checkpoint(path, model, arch={"variant": "cifar", "num_classes": 3, "batch_norm": False,
                                       "input_size": input_size},
                    class_names=["a", "b", "c"], normalization=normalization)
    return path


def _with_weight(good, path, name, value):
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[f"model/{name}"] = value
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return _save_cifar(tmp_path_factory.mktemp("exports") / "good.npz")


# -- item: output targets checked before the work ------------------------------------------------

@pytest.mark.parametrize("ext", [".onnx", ".wts"])
@pytest.mark.parametrize("target", ["fifo", "folder", "", "dir/"])
def test_export_refuses_a_bad_target_before_reading(tmp_path, ext, target):
    if ext == ".onnx":
        pytest.importorskip("onnx")
    (tmp_path / "dir").mkdir()
    fifo = tmp_path / f"out{ext}"
    if target == "fifo":
        os.mkfifo(fifo)
        target = fifo
    elif target == "folder":
        target = tmp_path / f"dir{ext}"
        target.mkdir()
    r = run_cli(["export", tmp_path / "never_read.npz", target], cwd=tmp_path, timeout=60)
    line = assert_one_line_error(r)
    assert "never_read" not in line, line          # the target failed first
    if target == fifo:
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert set(os.listdir(tmp_path)) <= {"dir", f"dir{ext}", fifo.name}   # nothing written


# -- item: silent acceptance and tracebacks ------------------------------------------------------

@pytest.mark.parametrize("size", [32.5, "32", 0, 10**9])
def test_export_onnx_with_a_bad_input_size(tmp_path, size):
    pytest.importorskip("onnx")
    src = _save_cifar(tmp_path / "w.npz", input_size=size)
    r = run_cli(["export", src, tmp_path / "m.onnx"], cwd=tmp_path, timeout=120)
    assert_one_line_error(r, str(src), "input_size must be 32 for the cifar variant")
    assert not (tmp_path / "m.onnx").exists()


def test_export_onnx_with_an_input_size_the_model_cannot_take(tmp_path):
    pytest.importorskip("onnx")
    src = _save_cifar(tmp_path / "w.npz", input_size=64)
    r = run_cli(["export", src, tmp_path / "m.onnx"], cwd=tmp_path, timeout=120)
    assert_one_line_error(r, str(src), "input_size must be 32 for the cifar variant, got 64")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("name", ["bad name", "bad\nname", "bad\x1b[2Jname", "bad\tname"])
def test_export_wts_with_a_name_the_format_cannot_carry(good, tmp_path, name):
    src = _with_weight(good, tmp_path / "odd.npz", name, np.zeros(2, np.float32))
    r = run_cli(["export", src, tmp_path / "w.wts"], cwd=tmp_path, timeout=120)
    # The checkpoint reader refuses a key the architecture does not have before write_wts sees it
    # (write_wts refuses such names itself: tests/interop/test_interop_wts.py).
    assert_one_line_error(r, "unexpected keys")
    assert "\x1b" not in r.stderr
    assert not (tmp_path / "w.wts").exists()


def test_export_wts_refuses_complex_weights(good, tmp_path):
    src = _with_weight(good, tmp_path / "c.npz", "classifier.6.bias", np.array([1 + 1j, 2, 3], np.complex64))
    r = run_cli(["export", src, tmp_path / "w.wts"], cwd=tmp_path, timeout=120)
    assert_one_line_error(r, "'classifier.6.bias'", "complex64")
    assert not (tmp_path / "w.wts").exists()


def test_export_output_name_with_escapes_is_printed_escaped(good, tmp_path):
    dst = tmp_path / "w\x1b[2J.wts"
    r = run_cli(["export", good, dst], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert dst.exists() and "\x1b" not in r.stdout and "\\x1b[2J" in r.stdout


# -- item: compare with a crop the model cannot take ---------------------------------------------

def test_compare_with_a_crop_other_than_the_input_size(torch, tmp_path):
    from minialex.interop.compare import torch_model_like
    src = _save_cifar(tmp_path / "w.npz", normalization={**NORM, "resize": 72, "crop": 64})
    net = torch_model_like(models.alexnet(num_classes=3, variant="cifar"))
    torch.save(net.state_dict(), tmp_path / "w.pth")
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(tmp_path / "img.png")
    r = run_cli(["compare", "-load", src, "-torch", tmp_path / "w.pth", "-input", tmp_path / "img.png"],
                cwd=tmp_path, timeout=120)
    assert_one_line_error(r, str(src), "normalization.crop", "the input size of cifar")


def test_compare_refuses_a_fifo_for_the_torch_file(torch, good, tmp_path):
    fifo = tmp_path / "w.pth"
    os.mkfifo(fifo)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "img.png")
    r = run_cli(["compare", "-load", good, "-torch", fifo, "-input", tmp_path / "img.png"],
                cwd=tmp_path, timeout=60)
    assert_one_line_error(r, str(fifo), "FIFO")
