"""`export w8.npz model.onnx`: the int8 model as ONNX QDQ, run in onnxruntime against our int8 model.

onnxruntime fuses each DequantizeLinear -> Conv/Gemm -> Relu -> QuantizeLinear into its own int8
kernel, whose requantisation rounds at its own points, so its logits may differ from ours by a few
steps of the activations' scales: the same bound as the int8 model against the float one
(tests/quant/test_model.py) is allowed, and on these images the two agree to float32 rounding.
"""
import numpy as np
import pytest

from helpers import run_cli
from minialex.data import read_list

from .conftest import calibrated, image_batches

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
MAX_TOLERANCE = 0.025


def _session(proto_or_path):
    data = proto_or_path.SerializeToString() if hasattr(proto_or_path, "SerializeToString") else str(proto_or_path)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("which", ["trained", "trained_bn"])
def test_qdq_graph_in_onnxruntime_matches_our_int8_model(which, request, demo_lists):
    from minialex.interop.onnx_export import onnx_model_int8
    ckpt, _, result = calibrated(request.getfixturevalue(which), demo_lists[0], images=32, criteria=("max",))
    qmodel = result.best.model
    proto = onnx_model_int8(qmodel)
    x = np.concatenate(image_batches(read_list(demo_lists[1])[:64], ckpt))
    ours = qmodel(x).astype(np.float64)
    theirs = _session(proto).run(["logits"], {"input": x})[0].astype(np.float64)
    r = (ours.max(axis=1) - ours.min(axis=1)).max()
    assert np.abs(theirs - ours).max() <= MAX_TOLERANCE * r
    assert (theirs.argmax(axis=1) == ours.argmax(axis=1)).mean() >= 0.95


def test_qdq_graph_holds_the_int8_weights_and_int32_biases_as_stored(trained, demo_lists):
    import onnx
    from onnx import numpy_helper

    from minialex.interop.onnx_export import onnx_model_int8
    from minialex.models.quantized import quantisation_points
    _, _, result = calibrated(trained, demo_lists[0], images=16, criteria=("max",))
    qmodel = result.best.model
    proto = onnx_model_int8(qmodel)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for key, layer in qmodel.params.layers.items():
        assert inits[f"{key}.weight"].dtype == np.int8 and (inits[f"{key}.weight"] == layer.weight).all()
        assert (inits[f"{key}.weight_scale"] == layer.weight_scale).all()
        assert inits[f"{key}.bias"].dtype == np.int32 and (inits[f"{key}.bias"] == layer.bias).all()
    # no float weight anywhere: every float initialiser is a scale
    assert all(a.dtype != np.float32 or name.endswith("scale") for name, a in inits.items())
    ops = [n.op_type for n in proto.graph.node]
    # one Quantize/Dequantize pair for the input, each quantisation point and each max-pool
    pairs = 1 + len(quantisation_points(qmodel.arch)) + ops.count("MaxPool")
    assert ops.count("QuantizeLinear") == pairs
    assert ops.count("DequantizeLinear") == pairs + 2 * len(qmodel.params.layers)
    scales = {n.input[1] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    for key in quantisation_points(qmodel.arch):
        assert inits[f"{key}.output.scale"] == np.float32(qmodel.params.activation_scales[key])
    assert "input.scale" in scales and inits["input.zero_point"] == 128
    onnx.checker.check_model(proto)


def test_grouped_paper_variant_exports_and_runs(tmp_path):
    """The paper variant (groups=2, LRN) at random weights, calibrated on random images."""
    from minialex import _random, models
    from minialex.calibration import calibrate
    from minialex.interop.onnx_export import onnx_model_int8
    _random.manual_seed(0)
    model = models.alexnet(10, "paper").eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 227, 227), dtype=np.float32)
    qmodel = calibrate(model, models.Arch("paper", 10), lambda: iter([x]), ("max",)).best.model
    ours = qmodel(x).astype(np.float64)
    theirs = _session(onnx_model_int8(qmodel)).run(["logits"], {"input": x})[0]
    assert np.abs(theirs - ours).max() <= MAX_TOLERANCE * np.abs(ours).max()


def test_export_command_writes_what_the_int8_checkpoint_computes(trained, demo_lists, tmp_path):
    """quantize -> export *.onnx through the CLI; the file, in onnxruntime, against the checkpoint
    loaded back as `eval` loads it (class names and normalisation in the metadata as for float)."""
    import json

    import onnx

    from minialex.checkpoint import load_checkpoint, model_from_checkpoint
    r = run_cli(["quantize", "-load", trained, "-calib", demo_lists[0], "-save", "w8.npz", "-images", 8,
                 "-criterion", "max", "-threads", 1, "-workers", 1], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    r = run_cli(["export", "w8.npz", "w8.onnx"], cwd=tmp_path)
    assert r.returncode == 0 and "w8.onnx" in r.stdout, r.stderr
    ckpt = load_checkpoint(tmp_path / "w8.npz", int8=True)
    qmodel = model_from_checkpoint(ckpt)
    x = np.concatenate(image_batches(read_list(demo_lists[1])[:16], ckpt))
    ours = qmodel(x).astype(np.float64)
    theirs = _session(tmp_path / "w8.onnx").run(["logits"], {"input": x})[0]
    assert np.abs(theirs - ours).max() <= MAX_TOLERANCE * (ours.max(axis=1) - ours.min(axis=1)).max()
    props = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "w8.onnx")).metadata_props}
    assert props["class_names"] == ckpt.class_names and props["normalization"] == ckpt.normalization
