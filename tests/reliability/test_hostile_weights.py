"""Hostile weights files: every one is a one-line CheckpointError naming the file (exit 2 from the
CLI); nothing in a weights file is ever unpickled; fuzzed checkpoints load or raise CheckpointError,
never another exception and never a hang."""
import contextlib
import json
import os
import re
import signal
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minialex
from minialex import checkpoint, models, nn, optim
from minialex.checkpoint import (FORMAT_VERSION, HEADER_KEY, CheckpointError, load_checkpoint, load_weights,
                                 model_from_checkpoint, save_checkpoint)
from minialex.evaluation import eval_transform as _eval_transform

from .conftest import REPO, assert_one_line_error, run_cli

NORM = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "resize": 36, "crop": 32}


def _save_cifar(path, classes=3):
    minialex.manual_seed(0)
    model = models.alexnet(num_classes=classes, variant="cifar")
    save_checkpoint(path, model, arch={"variant": "cifar", "num_classes": classes, "batch_norm": False,
                                       "input_size": 32},
                    class_names=[f"c{i}" for i in range(classes)], normalization=NORM,
                    train_state={"epoch": 1, "history": [], "rng": minialex.get_generator().bit_generator.state})
    return model


def _arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {n: z[n] for n in z.files}


def _rewrite(src, dst, change):
    arrays = _arrays(src)
    change(arrays)
    np.savez(dst, **arrays)
    return dst


def _set_header(arrays, **fields):
    header = json.loads(arrays[HEADER_KEY].tobytes())
    header.update(fields)
    arrays[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "good.npz"
    _save_cifar(path)
    return path


def _make(kind, good, folder):
    """Write the hostile file `kind` into folder; returns (path, words its error must contain)."""
    path = folder / f"{kind}.npz"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
        return path, "truncated or corrupt"
    if kind == "not_npz":
        path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(500))
        return path, "not a zip archive"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "an empty file"
    if kind == "pickled":
        class Boom:
            def __reduce__(self):
                return (os.system, ("touch pwned",))
        np.savez(path, **{HEADER_KEY: np.array([Boom()], dtype=object)})
        return path, "pickled objects"
    if kind == "int_weights":
        def to_int(a):
            a["model/features.0.weight"] = a["model/features.0.weight"].astype(np.int32)
        return _rewrite(good, path, to_int), "'features.0.weight' is stored as int32, expected floating point"
    if kind == "text_weights":
        def to_text(a):
            a["model/features.0.bias"] = a["model/features.0.bias"].astype("U8")
        return _rewrite(good, path, to_text), "'features.0.bias' is stored as <U8"
    if kind == "nan_weights":
        def poison(a):
            a["model/features.4.weight"][0, 0, 0, 0] = np.nan
            a["model/classifier.6.bias"][1] = np.inf
        return _rewrite(good, path, poison), "'model/features.4.weight' holds NaN or inf"
    if kind == "other_arch":
        return _rewrite(good, path, lambda a: _set_header(a, arch={"variant": "cifar", "num_classes": 3,
                                                                   "batch_norm": True})), "another architecture"
    if kind == "unknown_arch":
        return _rewrite(good, path, lambda a: _set_header(a, arch={"variant": "vgg", "num_classes": 3})), \
            "damaged checkpoint header: arch.variant: unknown 'vgg', expected one of torchvision, paper, cifar"
    if kind == "newer":
        return _rewrite(good, path, lambda a: _set_header(a, format_version=FORMAT_VERSION + 1)), "newer minialex"
    if kind == "zero_std":
        return _rewrite(good, path, lambda a: _set_header(a, normalization=dict(NORM, std=[0.2, 0, 0.3]))), \
            "normalization.std"
    if kind == "deep_json":
        def deep(a):
            a[HEADER_KEY] = np.frombuffer(b'{"format_version": 1, "arch": ' + b"[" * 100_000 + b"]" * 100_000
                                          + b"}", dtype=np.uint8)
        return _rewrite(good, path, deep), "damaged checkpoint header"
    raise AssertionError(kind)


KINDS = ["truncated", "not_npz", "empty", "pickled", "int_weights", "text_weights", "nan_weights",
         "other_arch", "unknown_arch", "newer", "zero_std", "deep_json"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_weights_are_a_one_line_checkpoint_error(good, tmp_path, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, words = _make(kind, good, tmp_path)
    with pytest.raises(CheckpointError) as e:
        model_from_checkpoint(load_checkpoint(path))
    message = str(e.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message, message
    assert not (tmp_path / "pwned").exists()


def test_plain_state_dict_npz_with_nan_is_refused_too(tmp_path):
    model = _save_cifar(tmp_path / "ckpt.npz")
    sd = model.state_dict()
    sd["classifier.1.weight"][3, 3] = np.nan
    np.savez(tmp_path / "sd.npz", **sd)
    with pytest.raises(CheckpointError, match=r"sd\.npz: 'classifier\.1\.weight' holds NaN or inf"):
        load_weights(tmp_path / "sd.npz")


def test_zip_bomb_is_refused_before_decompressing(tmp_path, monkeypatch):
    np.savez_compressed(tmp_path / "bomb.npz", **{HEADER_KEY: np.zeros(3, np.uint8),
                                                  "model/x": np.zeros(4_000_000, np.float32)})
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000
    monkeypatch.setattr(checkpoint, "MAX_ARCHIVE_BYTES", 1_000_000)
    with pytest.raises(CheckpointError, match=r"bomb\.npz: archive members claim 16,000,\d+ bytes"):
        load_checkpoint(tmp_path / "bomb.npz")


@pytest.mark.parametrize("kind", ["pickled", "nan_weights", "newer", "truncated"])
def test_cli_inference_with_bad_weights_is_one_line_exit_2(good, tmp_path, kind):
    path, words = _make(kind, good, tmp_path)
    image = tmp_path / "img.png"
    from PIL import Image
    Image.new("RGB", (40, 40), (120, 30, 200)).save(image)
    r = run_cli(["inference", "-input", image, "-load", path], cwd=tmp_path, timeout=60)
    assert_one_line_error(r, path.name, words)
    assert r.stdout == "" and not (tmp_path / "pwned").exists()


def test_cli_resume_from_bad_weights_is_one_line_exit_2(good, demo16, tmp_path):
    path, words = _make("nan_weights", good, tmp_path)
    r = run_cli(["train", "-list", demo16[0], "-resume", path, "-epochs", 3, "-threads", 1], cwd=tmp_path,
                timeout=60)
    assert_one_line_error(r, path.name, words)


def test_package_never_unpickles_untrusted_files():
    """Every np.load passes allow_pickle=False; the only Unpickler is the restricted .pth reader."""
    package = os.path.join(REPO, "minialex")
    loads, unpicklers = [], []
    for folder, _, files in os.walk(package):
        for name in files:
            if not name.endswith(".py"):
                continue
            text = open(os.path.join(folder, name), encoding="utf-8").read()
            rel = os.path.relpath(os.path.join(folder, name), package)
            for call in re.findall(r"np\.load\([^)]*\)", text):
                loads.append((rel, call))
            if re.search(r"pickle\._?(loads?|Unpickler)\b", text):
                unpicklers.append(rel)
            assert "allow_pickle=True" not in text, rel
            assert not re.search(r"torch\.load\((?![^)]*weights_only=True)", text), rel
    assert loads and all("allow_pickle=False" in call for _, call in loads), loads
    assert unpicklers == [os.path.join("interop", "torch_pickle.py")], unpicklers


# -- fuzzing ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def deadline(seconds):
    """Fail, instead of hanging the suite, if the body runs longer than `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds}s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _small_checkpoint(path):
    """A real checkpoint (header, weights, SGD momentum, RNG state) of the smallest AlexNet: its
    weights must have the shapes its header declares, or nothing would ever load."""
    minialex.manual_seed(0)
    model = models.alexnet(num_classes=3, variant="cifar")
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad[...] = 0.01
    opt.step()
    save_checkpoint(path, model, arch={"variant": "cifar", "num_classes": 3, "input_size": 32},
                    class_names=["a", "b", "c"], normalization=NORM, optimizer=opt,
                    train_state={"epoch": 2, "history": [{"epoch": 1}],
                                 "rng": minialex.get_generator().bit_generator.state})
    return path.read_bytes()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    data = _small_checkpoint(folder / "small.npz")
    with zipfile.ZipFile(folder / "small.npz") as z:
        info = z.getinfo(HEADER_KEY + ".npy")
        offsets = [i.header_offset for i in z.infolist()]
    header_span = (info.header_offset, info.header_offset + 30 + len(info.filename) + info.compress_size)
    central = data.find(b"PK\x01\x02")  # the central directory, then its end record
    return {"folder": folder, "data": data, "header": header_span, "central": central, "offsets": offsets}


def _load_or_checkpoint_error(path):
    with deadline(10):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e)
            return None
    return ckpt


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_bytes_load_or_raise_checkpoint_error(small, data):
    raw = bytearray(small["data"])
    region = data.draw(st.sampled_from(["anywhere", "header", "central", "local_headers"]))
    lo, hi = {"anywhere": (0, len(raw)), "header": small["header"], "central": (small["central"], len(raw)),
              "local_headers": (0, len(raw))}[region]
    for _ in range(data.draw(st.integers(1, 8))):
        if region == "local_headers":
            at = data.draw(st.sampled_from(small["offsets"])) + data.draw(st.integers(0, 45))
        else:
            at = data.draw(st.integers(lo, hi - 1))
        raw[min(at, len(raw) - 1)] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = small["folder"] / "mutated.npz"
    path.write_bytes(bytes(raw))
    ckpt = _load_or_checkpoint_error(path)
    if ckpt is not None:
        assert ckpt.state_dict and ckpt.train_state["epoch"] >= 0


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
FIELDS = ["format_version", "arch", "class_names", "normalization", "train_state", "optimizer"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(replace=st.dictionaries(st.sampled_from(FIELDS), JSON, min_size=1, max_size=3),
       nested=st.dictionaries(st.sampled_from(["mean", "std", "resize", "crop", "variant", "num_classes"]),
                              JSON, max_size=2))
def test_fuzz_header_values_load_or_raise_checkpoint_error(small, replace, nested):
    """Valid zip, valid JSON, hostile values: loading checks every field a model is built from."""
    arrays = _arrays(small["folder"] / "small.npz")
    header = json.loads(arrays[HEADER_KEY].tobytes())
    for key, value in nested.items():
        target = "normalization" if key in NORM else "arch"
        header[target] = dict(header[target], **{key: value})
    header.update(replace)
    arrays[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    path = small["folder"] / "header.npz"
    np.savez(path, **arrays)
    ckpt = _load_or_checkpoint_error(path)
    if ckpt is not None:  # whatever loads must be usable: the transform is built and applied
        x = _eval_transform(ckpt)(np.full((20, 30, 3), 128, np.uint8))
        assert x.shape == (3, ckpt.normalization["crop"], ckpt.normalization["crop"]) and np.isfinite(x).all()
