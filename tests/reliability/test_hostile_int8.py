"""int8 checkpoints where they do not belong, float ones dressed as int8, empty calibration lists
and damaged int8 sections: each refused in one line naming the file (and the field), exit 2, no
traceback, before anything large is allocated."""
import json
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from minialex.checkpoint import HEADER_KEY

from .conftest import FAST, assert_one_line_error, run_cli
from .limits import run_cli_limited


@pytest.fixture(scope="module")
def checkpoints(demo16, tmp_path_factory):
    """(float checkpoint after one epoch of cifar on demo16, its int8 version, an image)."""
    folder = tmp_path_factory.mktemp("int8")
    r = run_cli(["train", "-list", demo16[0], "-epochs", 1, "-save", "w.npz", *FAST], cwd=folder, timeout=180)
    assert r.returncode == 0, r.stderr
    r = run_cli(["quantize", "-load", "w.npz", "-save", "w8.npz", "-images", 4, "-criterion", "max",
                 "-threads", 1, "-workers", 1], cwd=folder, timeout=180)
    assert r.returncode == 0, r.stderr
    Image.new("RGB", (40, 30), (120, 30, 200)).save(folder / "img.png")
    return folder / "w.npz", folder / "w8.npz", folder / "img.png"


def _arrays(path):
    with np.load(path, allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}
    return arrays, json.loads(arrays.pop(HEADER_KEY).tobytes())


def _write(path, arrays, header):
    arrays = dict(arrays)
    arrays[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    return path


def _inference(path, image):
    return ["inference", "-input", image, "-load", path, "-threads", 1]


# -- an int8 checkpoint where float weights are needed ---------------------------------------------

def test_int8_checkpoint_refused_where_float_weights_are_needed(checkpoints, demo16, tmp_path, torch):
    _, w8, image = checkpoints
    (tmp_path / "dummy.pth").write_bytes(b"not read")
    commands = {
        "resume": ["train", "-list", demo16[0], "-resume", w8, "-epochs", 2, "-threads", 1, "-workers", 1],
        "pretrained": ["train", "-list", demo16[0], "-load_pretrained", w8, "-save", "new.npz", *FAST],
        "export wts": ["export", w8, "out.wts"],
        "compare": ["compare", "-load", w8, "-torch", "dummy.pth", "-input", image],
    }
    for name, args in commands.items():
        r = run_cli(args, cwd=tmp_path, timeout=90)
        assert_one_line_error(r, f"{w8}: ", "is an int8 checkpoint", "needs the float checkpoint")
    assert not any((tmp_path / n).exists() for n in ("new.npz", "out.wts"))


def test_quantize_refuses_an_int8_checkpoint(checkpoints, demo16, tmp_path):
    r = run_cli(["quantize", "-load", checkpoints[1], "-calib", demo16[0], "-save", "again.npz"], cwd=tmp_path)
    assert_one_line_error(r, f"{checkpoints[1]}: ", "already an int8 checkpoint")
    assert not (tmp_path / "again.npz").exists()


# -- a float checkpoint dressed as int8, and the reverse ------------------------------------------

def test_float_weights_under_an_int8_header(checkpoints, tmp_path):
    w, w8, image = checkpoints
    floats, _ = _arrays(w)
    _, header8 = _arrays(w8)
    path = _write(tmp_path / "float_as_int8.npz", {k: v for k, v in floats.items() if k.startswith("model/")},
                  header8)
    assert_one_line_error(run_cli(_inference(path, image), cwd=tmp_path), f"{path}: ",
                          "float weights ('model/", "beside the header's int8 section")


def test_int8_weights_under_a_float_header(checkpoints, tmp_path):
    w, w8, image = checkpoints
    floats, header = _arrays(w)
    ints, _ = _arrays(w8)
    path = _write(tmp_path / "int8_as_float.npz", {**floats, **ints}, header)
    assert_one_line_error(run_cli(_inference(path, image), cwd=tmp_path), f"{path}: ",
                          "int8 weights ('int8/", "without the header's int8 section")


# -- calibration lists ----------------------------------------------------------------------------

def test_empty_calibration_list(checkpoints, tmp_path):
    (tmp_path / "empty.list").write_text("\n# nothing\n")
    r = run_cli(["quantize", "-load", checkpoints[0], "-calib", "empty.list", "-save", "w8.npz"], cwd=tmp_path)
    assert_one_line_error(r, "empty.list", "the list is empty")
    assert not (tmp_path / "w8.npz").exists()


def test_calibration_list_required_without_a_recorded_one(checkpoints, tmp_path):
    arrays, header = _arrays(checkpoints[0])
    header["train_state"] = header["optimizer"] = header["scheduler"] = None
    path = _write(tmp_path / "weights_only.npz", {k: v for k, v in arrays.items() if k.startswith("model/")},
                  header)
    r = run_cli(["quantize", "-load", path, "-save", "w8.npz"], cwd=tmp_path)
    assert_one_line_error(r, "-calib is required", f"{path} records no training list")


# -- damaged int8 sections ------------------------------------------------------------------------

def _header_at(header, dotted, value):
    header = json.loads(json.dumps(header))
    *parents, last = dotted.split(".", 2) if dotted.startswith("int8.activations.") else dotted.split(".")
    target = header
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return header


_DELETE = object()

HEADER_CASES = [
    ("version_newer", "int8.version", 2, "int8.version is 2: written by a newer minialex"),
    ("version_text", "int8.version", "1", "int8.version is '1', expected 1"),
    ("section_not_object", "int8", [1], "int8 is [1], expected an object"),
    ("criterion", "int8.criterion", "magic", "int8.criterion is 'magic', expected one of max"),
    ("zero_point", "int8.input.zero_point", 0, "int8.input.zero_point is 0, expected 128"),
    ("input_scale_nan", "int8.input.scale", float("nan"), "int8.input.scale is nan, expected a scale"),
    ("input_scale_inf", "int8.input.scale", float("inf"), "int8.input.scale is inf"),
    ("input_scale_zero", "int8.input.scale", 0.0, "int8.input.scale is 0.0"),
    ("input_scale_negative", "int8.input.scale", -0.1, "int8.input.scale is -0.1"),
    ("input_scale_text", "int8.input.scale", "0.1", "int8.input.scale is '0.1'"),
    ("activation_nan", "int8.activations.features.0", float("nan"), "int8.activations.features.0 is nan"),
    ("activation_negative", "int8.activations.classifier.1", -1.0, "int8.activations.classifier.1 is -1.0"),
    ("activation_missing", "int8.activations.features.2", _DELETE, "int8.activations.features.2 is missing"),
    ("activation_extra", "int8.activations.features.99", 0.5, "unexpected key 'features.99'"),
    ("results_bad", "int8.calibration.results", [{"criterion": "max", "agreement": 2, "logit_mse": 0}],
     "int8.calibration.results[0].agreement is 2"),
    ("images_zero", "int8.calibration.images", 0, "int8.calibration.images is 0"),
]


@pytest.mark.parametrize("case", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_damaged_int8_header_field(checkpoints, tmp_path, case):
    name, dotted, value, words = case
    arrays, header = _arrays(checkpoints[1])
    path = _write(tmp_path / f"{name}.npz", arrays, _header_at(header, dotted, value))
    assert_one_line_error(run_cli(_inference(path, checkpoints[2]), cwd=tmp_path), f"{path}: ", words)


def _set(name, make):
    def change(arrays):
        arrays[name] = make(arrays[name])
    return change


ARRAY_CASES = [
    ("weight_float", _set("int8/features.0.weight", lambda a: a.astype(np.float32)),
     "'int8/features.0.weight' is float32 (48, 3, 7, 7), expected int8 (48, 3, 7, 7)"),
    ("weight_shape", _set("int8/features.0.weight", lambda a: a[..., :6].copy()),
     "'int8/features.0.weight' is int8 (48, 3, 7, 6), expected int8 (48, 3, 7, 7)"),
    ("bias_int64", _set("int8/classifier.6.bias", lambda a: a.astype(np.int64)),
     "'int8/classifier.6.bias' is int64 (10,), expected int32 (10,)"),
    ("bias_missing", lambda arrays: arrays.pop("int8/features.4.bias"), "array 'int8/features.4.bias' is missing"),
    ("array_extra", lambda arrays: arrays.update({"int8/features.1.weight": np.zeros(3, np.int8)}),
     "unexpected array 'int8/features.1.weight'"),
    ("weight_scale_nan", _set("int8/features.4.weight_scale", lambda a: np.where(np.arange(len(a)) == 3, np.nan, a)
                              .astype(np.float32)), "features.4.weight_scale holds values outside"),
    ("weight_scale_inf", _set("int8/classifier.1.weight_scale", lambda a: np.full_like(a, np.inf)),
     "classifier.1.weight_scale holds values outside"),
    ("weight_scale_zero", _set("int8/classifier.6.weight_scale", lambda a: np.zeros_like(a)),
     "classifier.6.weight_scale holds values outside"),
    ("weight_minus_128", _set("int8/features.0.weight", lambda a: np.full_like(a, -128)),
     "features.0.weight holds -128"),
    ("bias_overflow", _set("int8/classifier.1.bias", lambda a: np.full_like(a, 2 ** 31 - 1)),
     "classifier.1.bias holds values beyond"),
]


@pytest.mark.parametrize("case", ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_damaged_int8_array(checkpoints, tmp_path, case):
    name, change, words = case
    arrays, header = _arrays(checkpoints[1])
    change(arrays)
    path = _write(tmp_path / f"{name}.npz", arrays, header)
    assert_one_line_error(run_cli(_inference(path, checkpoints[2]), cwd=tmp_path), f"{path}: ", words)


def test_damaged_int8_section_refused_by_eval(checkpoints, demo16, tmp_path):
    arrays, header = _arrays(checkpoints[1])
    path = _write(tmp_path / "eval.npz", arrays, _header_at(header, "int8.input.scale", 0.0))
    r = run_cli(["eval", "-list", demo16[0], "-load", path, "-workers", 1, "-threads", 1], cwd=tmp_path)
    assert_one_line_error(r, f"{path}: ", "int8.input.scale is 0.0")


# -- sizes: refused before they cost memory --------------------------------------------------------

def _npy_header(descr, shape):
    text = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, shape)
    text += " " * ((64 - (10 + len(text) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def test_huge_declared_int8_array_is_refused_unread(checkpoints, tmp_path):
    """A member whose .npy header claims 4 GB of int8 weights in a tiny archive."""
    arrays, header = _arrays(checkpoints[1])
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, a in arrays.items():
            if name != "int8/classifier.1.weight":
                with z.open(name + ".npy", "w") as f:
                    np.lib.format.write_array(f, a)
        with z.open("int8/classifier.1.weight.npy", "w") as f:
            f.write(_npy_header("|i1", (2048, 2 ** 21)))
            f.write(b"\0" * 4096)
        with z.open(HEADER_KEY + ".npy", "w") as f:
            np.lib.format.write_array(f, np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    r = run_cli_limited(_inference(path, checkpoints[2]), cwd=tmp_path, megabytes=1200)
    assert_one_line_error(r, f"{path}: ", "'int8/classifier.1.weight'")


def test_many_classes_without_their_int8_weights_allocate_nothing(checkpoints, tmp_path):
    """100,000 classes declared, the arrays those need absent: refused from the shapes."""
    arrays, header = _arrays(checkpoints[1])
    header["arch"]["num_classes"] = 100_000
    header["class_names"] = ["a"] * 100_000
    path = _write(tmp_path / "many.npz", arrays, header)
    r = run_cli_limited(_inference(path, checkpoints[2]), cwd=tmp_path, megabytes=1200)
    assert_one_line_error(r, f"{path}: ", "'int8/classifier.6.weight' is int8 (10, 2048), expected int8 (100000, 2048)")
