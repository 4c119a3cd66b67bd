"""`minialex convert | export | compare` through the command line's own main()."""
import argparse
import os

import numpy as np
import pytest
from PIL import Image

import minialex
from minialex import cli, interop, models
from minialex.interop.compare import torch_model_like
from minialex.interop.convert import imagenet_class_names
from minialex.interop.wts import read_wts


@pytest.fixture
def run(monkeypatch, capsys):
    """run(*argv) -> (exit status, stdout, stderr) of minialex's main with the interop commands."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for add in interop.PARSERS:   # until cli.py registers them itself
        if add.__name__.replace("_parser", "") not in sub.choices:
            add(sub)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)

    def run_main(*argv):
        status = cli.main([os.fspath(a) for a in argv])
        out, err = capsys.readouterr()
        return status, out, err
    return run_main


def _torch_weights(torch, path, variant, num_classes, seed):
    minialex.manual_seed(seed)
    model = models.alexnet(num_classes=num_classes, variant=variant).eval()
    net = torch_model_like(model)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    torch.save(net.state_dict(), path)
    return model


def test_convert_export_compare(torch, tmp_path, run):
    pth, npz = tmp_path / "small.pth", tmp_path / "small.npz"
    model = _torch_weights(torch, pth, "cifar", 10, 5)
    status, out, err = run("convert", pth, npz, "--arch", "cifar")
    assert (status, err) == (0, "")
    assert out.strip() == f"wrote {npz}: AlexNet cifar, 10 classes (names class_<id>)"

    status, out, err = run("export", npz, tmp_path / "small.wts")
    assert (status, err) == (0, "") and "TensorRT" in out
    wts = read_wts(tmp_path / "small.wts")
    np.testing.assert_array_equal(wts["classifier.6.bias"], model.classifier[6].bias.data)

    pytest.importorskip("onnx")
    status, out, err = run("export", npz, tmp_path / "small.onnx")
    assert (status, err) == (0, "") and (tmp_path / "small.onnx").stat().st_size > 0

    img = tmp_path / "img.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(img)
    status, out, err = run("compare", "-load", npz, "-torch", pth, "-input", img)
    assert (status, err) == (0, "") and "classifier.6" in out and "agree" in out


def test_inference_of_converted_weights_prints_imagenet_names(torch, tmp_path, run):
    skdata = pytest.importorskip("skimage.data")
    pth, npz = tmp_path / "alexnet.pth", tmp_path / "alexnet.npz"
    _torch_weights(torch, pth, "torchvision", 1000, 6)
    assert run("convert", pth, npz)[0] == 0
    img = tmp_path / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(img)
    status, out, err = run("inference", "-input", img, "-load", npz)
    assert (status, err) == (0, "")
    names = set(imagenet_class_names())
    shown = [line.split("%", 1)[1].strip().rsplit(" (", 1)[0] for line in out.splitlines()[1:]]
    assert len(shown) == 5 and all(name in names for name in shown)


def test_bad_input_is_one_line_and_status_2(torch, tmp_path, run):
    marker = tmp_path / "pwned"

    class Shell:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pth"
    torch.save({"classifier.6.weight": Shell()}, evil)
    cases = [
        (("convert", evil, tmp_path / "w.npz"), "refuses to load"),
        (("convert", tmp_path / "missing.pth", tmp_path / "w.npz"), "no such PyTorch file"),
        (("convert", evil, tmp_path / "w.npz", "-arch", "vgg"), "invalid choice"),
        (("export", tmp_path / "missing.npz", tmp_path / "m.onnx"), "checkpoint not found"),
        (("export", evil, tmp_path / "m.txt"), "unknown export format '.txt'"),
    ]
    for argv, message in cases:
        status, out, err = run(*argv)
        assert status == 2, argv
        assert err.startswith("minialex: error: ") and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "w.npz").exists()
