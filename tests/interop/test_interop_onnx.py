"""ONNX export: onnxruntime running the exported graph gives minialex's eval-mode logits.

Each test asks for the optional packages it uses through the `onnx` and `ort` fixtures, so a
machine without onnxruntime (or onnx) still runs every test that does not need it."""
import json
import sys

import numpy as np
import pytest

import minialex
from minialex import models, nn
from minialex.errors import MinialexError
from minialex.interop.onnx_export import adaptive_pool_matrix, export_onnx



@pytest.fixture
def onnx():
    return pytest.importorskip("onnx", reason="onnx is an optional extra (pip install onnx)")


@pytest.fixture
def ort(onnx):
    return pytest.importorskip("onnxruntime", reason="onnxruntime is an optional test extra")


def _randomise(model, rng):
    """He-scaled weights (the paper's init leaves outputs dominated by its unit biases, nearly the
    same for any input) and batch-norm statistics other than the fresh 0 and 1, which would hide a
    swapped mean and variance."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight.data[0].size
            m.weight.data[...] = rng.normal(0, np.sqrt(2 / fan_in), m.weight.data.shape)
            m.bias.data[...] = rng.normal(0, 0.01, m.bias.data.shape)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean[...] = rng.normal(0, 0.1, m.running_mean.shape)
            m.running_var[...] = rng.uniform(0.5, 1.5, m.running_var.shape)
            m.weight.data[...] = rng.uniform(0.5, 1.5, m.weight.data.shape)
            m.bias.data[...] = rng.normal(0, 0.1, m.bias.data.shape)


def _run(ort, path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


@pytest.mark.parametrize("variant,batch_norm,size", [
    ("torchvision", False, 224), ("torchvision", True, 224), ("paper", False, 227),
    ("paper", True, 227), ("cifar", False, 32), ("cifar", True, 32),
    # torchvision's adaptive pool at other sizes: 3x3 -> 6x6 (repeated rows), 12x12 -> 6x6 (2x2 means)
    ("torchvision", False, 128), ("torchvision", False, 415)])
def test_onnxruntime_matches_minialex(ort, tmp_path, variant, batch_norm, size):
    minialex.manual_seed(0)
    rng = np.random.default_rng(0)
    model = models.alexnet(num_classes=10, variant=variant, batch_norm=batch_norm).eval()
    _randomise(model, rng)
    path = tmp_path / "model.onnx"
    export_onnx(model, path, size)
    x = rng.standard_normal((2, 3, size, size), dtype=np.float32)
    ours = model(x)
    theirs = _run(ort, path, x)
    assert theirs.shape == ours.shape == (2, 10)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
    assert np.abs(ours[0] - ours[1]).max() > 1e-3 * np.abs(ours).max()  # inputs really differ


def test_graph_has_the_expected_operators_and_metadata(onnx, tmp_path):
    model = models.alexnet(num_classes=10, variant="paper", batch_norm=True)
    path = tmp_path / "paper.onnx"
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3, "resize": 256, "crop": 227}
    export_onnx(model, path, 227, class_names=[f"c{i}" for i in range(10)], normalization=norm)
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == 5 and ops.count("BatchNormalization") == 5 and ops.count("LRN") == 2
    assert ops.count("MaxPool") == 3 and ops.count("Gemm") == 3 and "Dropout" not in ops
    groups = [a.i for n in proto.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert groups == [1, 2, 1, 2, 2]
    lrn = next(n for n in proto.graph.node if n.op_type == "LRN")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lrn.attribute}
    assert attrs["size"] == 5 and attrs["bias"] == pytest.approx(2.0) and attrs["alpha"] == pytest.approx(5e-4)
    assert {i.name for i in proto.graph.initializer} >= {"features.0.weight", "classifier.6.bias"}
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["normalization"] == norm and meta["class_names"][9] == "c9"
    assert model.training   # exporting evaluates in eval mode and puts the mode back


def test_adaptive_pool_matrix_follows_pytorch_windows():
    # 5 -> 3: windows [0,2), [1,4), [3,5), overlapping as PyTorch's are.
    expected = np.array([[1 / 2, 1 / 2, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 1 / 2, 1 / 2]])
    np.testing.assert_allclose(adaptive_pool_matrix(5, 3), expected, rtol=1e-7)
    np.testing.assert_array_equal(adaptive_pool_matrix(1, 3), np.ones((3, 1)))


def test_even_lrn_size_is_refused(onnx, tmp_path):
    model = models.alexnet(num_classes=10, variant="cifar")
    setattr(model.features, "1", nn.LocalResponseNorm(4))
    with pytest.raises(ValueError, match="even size 4"):
        export_onnx(model, tmp_path / "m.onnx", 32)
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnx_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)   # makes `import onnx` raise ImportError
    with pytest.raises(MinialexError, match=r"needs the optional onnx package \(pip install onnx"):
        export_onnx(models.alexnet(num_classes=10, variant="cifar"), tmp_path / "m.onnx", 32)
