"""Checkpoints that load as zip archives but hold hostile header values, shapes or sizes: every one
is refused at load, one line naming the file and the field, exit 2, whichever command reads it
(`train -resume`, `train -load_pretrained`, `inference`, `eval`), and before any model or large
buffer is allocated."""
import json
import os
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from minialex.checkpoint import HEADER_KEY, MAX_HEADER_BYTES

from .conftest import FAST, assert_one_line_error, run_cli
from .limits import run_cli_limited


@pytest.fixture(scope="module")
def trained(demo16, tmp_path_factory):
    """A real checkpoint after one epoch (SGD momentum, a step schedule, RNG state, history)."""
    folder = tmp_path_factory.mktemp("trained")
    r = run_cli(["train", "-list", demo16[0], "-epochs", 1, "-schedule", "step", "-save", "w.npz", *FAST],
                cwd=folder, timeout=120)
    assert r.returncode == 0, r.stderr
    Image.new("RGB", (40, 30), (120, 30, 200)).save(folder / "img.png")
    return folder / "w.npz"


def _arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {n: z[n] for n in z.files}


def _write(path, arrays, header):
    arrays = dict(arrays)
    arrays[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    return path


def _at(header, dotted, value):
    """header with the field at `a.b.c` set to value (a fresh copy)."""
    header = json.loads(json.dumps(header))
    *parents, last = dotted.split(".")
    target = header
    for key in parents:
        target = target[key]
    target[last] = value
    return header


# (id, field path, hostile value, command, words the one-line error must hold)
CASES = [
    ("epoch_text", "train_state.epoch", "2", "resume", "train_state.epoch is '2'"),
    ("epoch_negative", "train_state.epoch", -1, "resume", "train_state.epoch is -1"),
    ("epoch_bool", "train_state.epoch", True, "resume", "train_state.epoch is true"),
    ("history_not_list", "train_state.history", {"epoch": 1}, "resume", "train_state.history is"),
    ("history_not_dicts", "train_state.history", [1, 2], "resume", "train_state.history[0] is 1"),
    ("best_not_number", "train_state.best_val_top1", "high", "resume", "train_state.best_val_top1"),
    ("lr_nan", "train_state.config.lr", float("nan"), "resume", "train_state.config -lr: nan is not a finite number"),
    ("milestones_negative", "train_state.config.milestones", [-2], "resume", "train_state.config -milestones"),
    ("batch_size_zero", "train_state.config.batch_size", 0, "resume", "train_state.config -batchsize: 0 must be at least 1"),
    ("unknown_optimizer", "train_state.config.optimizer", "rmsprop", "resume", "train_state.config -optimizer rmsprop: choose one of sgd, adam"),
    ("unknown_schedule", "train_state.config.schedule", "cosine", "resume", "train_state.config -schedule cosine: choose one of"),
    ("momentum_one", "train_state.config.momentum", 1.5, "resume", "train_state.config -momentum 1.5: must be at least 0 and below 1"),
    ("rng_damaged", "train_state.rng.state", "x", "resume", "train_state.rng is"),
    ("interrupted_malformed", "train_state.interrupted", {"epoch": "x", "batch": 1}, "resume",
     "train_state.interrupted.epoch"),
    ("lists_not_text", "train_state.lists.train", 5, "resume", "train_state.lists.train is 5"),
    ("param_groups_empty", "optimizer.param_groups", [], "resume", "optimizer.param_groups is []"),
    ("scheduler_injected", "scheduler.step", 5, "resume", "scheduler has the fields"),
    ("unknown_variant", "arch.variant", "vgg", "inference", "arch.variant: unknown 'vgg'"),
    ("crop_not_cifar", "normalization", {"mean": [0.5] * 3, "std": [0.2] * 3, "resize": 72, "crop": 64},
     "inference", "normalization.crop is 64, expected 32"),
    ("resize_huge", "normalization.resize", 4096, "inference", "normalization.resize is 4096"),
    ("batch_norm_text", "arch.batch_norm", "no", "inference", "arch.batch_norm must be true or false, got 'no'"),
    ("class_count", "class_names", ["a"], "inference", "class_names is 1 names, expected a list of 10"),
    ("class_name_long", "class_names", ["x" * 5000] * 10, "eval", "class_names[0] is"),
    ("class_name_number", "class_names", list(range(10)), "eval", "class_names[0] is 0"),
    ("too_many_classes", "arch.num_classes", 200_000, "eval", "arch.num_classes must be an integer in 1..100000, got 200000"),
    ("pretrained_variant", "arch.variant", "resnet", "pretrained", "arch.variant: unknown 'resnet'"),
]


def _command(kind, ckpt, demo16):
    folder = ckpt.parent
    return {"resume": ["train", "-list", demo16[0], "-resume", ckpt, "-epochs", 3, "-threads", 1, "-workers", 1],
            "inference": ["inference", "-input", folder / "img.png", "-load", ckpt],
            "eval": ["eval", "-list", demo16[0], "-load", ckpt, "-workers", 1],
            "pretrained": ["train", "-list", demo16[0], "-load_pretrained", ckpt, "-epochs", 1, "-save",
                           folder / "new.npz", *FAST]}[kind]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_field_is_one_line_exit_2(trained, demo16, tmp_path, case):
    name, dotted, value, kind, words = case
    arrays = _arrays(trained)
    header = json.loads(arrays.pop(HEADER_KEY).tobytes())
    path = _write(tmp_path / f"{name}.npz", arrays, _at(header, dotted, value))
    (tmp_path / "img.png").write_bytes((trained.parent / "img.png").read_bytes())
    r = run_cli(_command(kind, path, demo16), cwd=tmp_path, timeout=90)
    assert_one_line_error(r, f"{path}: ", words)
    assert not (tmp_path / "new.npz").exists()


def test_zero_d_bias_is_refused_before_a_model_is_built(trained, demo16, tmp_path):
    arrays = _arrays(trained)
    header = json.loads(arrays.pop(HEADER_KEY).tobytes())
    arrays["model/classifier.6.bias"] = np.float32(0.5)
    path = _write(tmp_path / "scalar_bias.npz", arrays, header)
    r = run_cli(_command("pretrained", path, demo16), cwd=tmp_path, timeout=90)
    assert_one_line_error(r, f"{path}: ", "'classifier.6.bias' has shape (), expected (10,)")


def test_header_member_without_npy_suffix(trained, tmp_path):
    path = tmp_path / "bare.npz"
    with zipfile.ZipFile(trained) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            name = info.filename[:-4] if info.filename == HEADER_KEY + ".npy" else info.filename
            dst.writestr(name, src.read(info))
    r = run_cli(["inference", "-input", trained.parent / "img.png", "-load", path], cwd=tmp_path, timeout=60)
    assert_one_line_error(r, f"{path}: ", "archive member '__minialex__' is not a .npy array")


# -- sizes: refused before they cost memory (the child runs under an address-space limit) ----------

def _npy_header(descr, shape):
    """The .npy version 1.0 preamble for an array of `descr` and `shape` (data to follow)."""
    text = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (descr, shape)
    text += " " * ((64 - (10 + len(text) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _tiny_header_file(path, header):
    """A compressed archive of nothing but a header: a few KB however many classes it declares."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open(HEADER_KEY + ".npy", "w") as f:
            np.lib.format.write_array(f, np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
        with z.open("model/features.0.weight.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros((64, 3, 11, 11), np.float32))
    return path


def _header(num_classes, variant="torchvision"):
    crop = {"torchvision": 224, "cifar": 32}[variant]
    return {"format_version": 1, "arch": {"variant": variant, "num_classes": num_classes},
            "class_names": ["a"] * num_classes,
            "normalization": {"mean": [0.5] * 3, "std": [0.2] * 3, "resize": crop + crop // 7, "crop": crop}}


def test_many_classes_without_their_weights_allocate_nothing(trained, tmp_path):
    """100,000 classes is allowed, but the weights must be in the file: a 0.2 MB archive declaring
    them is refused from the shapes, before a 1.6 GB classifier is built."""
    path = _tiny_header_file(tmp_path / "many.npz", _header(100_000))
    assert path.stat().st_size < 500_000
    r = run_cli_limited(["inference", "-input", trained.parent / "img.png", "-load", path], cwd=tmp_path,
                        megabytes=1200)
    assert_one_line_error(r, f"{path}: ", "weights are for another architecture", "missing keys")


def test_class_count_over_the_cap_is_refused(trained, tmp_path):
    path = _tiny_header_file(tmp_path / "huge.npz", _header(200_000))
    assert path.stat().st_size < 500_000
    r = run_cli_limited(["inference", "-input", trained.parent / "img.png", "-load", path], cwd=tmp_path,
                        megabytes=1200)
    assert_one_line_error(r, f"{path}: ", "arch.num_classes must be an integer in 1..100000, got 200000")


def test_huge_header_is_refused_before_it_is_decoded(trained, tmp_path):
    """A header member of 100 MB of text (0.1 MB compressed): refused from its size alone."""
    path = tmp_path / "big_header.npz"
    chars = 25 << 20  # 100 MB as UTF-32
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open(HEADER_KEY + ".npy", "w", force_zip64=True) as f:
            f.write(_npy_header(f"<U{chars}", ()))
            block = ("x" * (1 << 20)).encode("utf-32-le")
            for _ in range(chars >> 20):
                f.write(block)
    assert path.stat().st_size < 2_000_000
    r = run_cli_limited(["inference", "-input", trained.parent / "img.png", "-load", path], cwd=tmp_path,
                        megabytes=1200)
    assert_one_line_error(r, f"{path}: ", "damaged checkpoint header", f"over the limit of {MAX_HEADER_BYTES:,}")


def test_archive_of_very_many_members_is_refused_before_zipfile_lists_them(trained, tmp_path):
    """70,000 empty members (over 65,535, so the counts sit in a zip64 end record): refused from
    the end record, before an object per member is built."""
    from minialex.checkpoint import MAX_MEMBERS
    path = tmp_path / "many_members.npz"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(70_000):
            z.writestr(f"m{i}.npy", b"")
    r = run_cli_limited(["inference", "-input", trained.parent / "img.png", "-load", path], cwd=tmp_path,
                        megabytes=1200)
    assert_one_line_error(r, f"{path}: ", "archive declares 70,000 members", f"{MAX_MEMBERS:,}")


def test_end_record_claiming_a_huge_directory_is_refused(trained, tmp_path):
    """A real checkpoint whose end record says its central directory is 3 GB."""
    path = tmp_path / "huge_directory.npz"
    data = bytearray(trained.read_bytes())
    at = data.rfind(b"PK\x05\x06")
    struct.pack_into("<L", data, at + 12, 3 << 30)
    path.write_bytes(bytes(data))
    r = run_cli(["inference", "-input", trained.parent / "img.png", "-load", path], cwd=tmp_path, timeout=60)
    assert_one_line_error(r, f"{path}: ", "3,221,225,472-byte directory", "over the limits of")


# -- FIFOs and devices: refused at once, never waited on --------------------------------------------

@pytest.mark.parametrize("command", ["inference", "resume", "pretrained"])
def test_fifo_as_a_checkpoint_is_refused_without_blocking(trained, demo16, tmp_path, command):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    (tmp_path / "img.png").write_bytes((trained.parent / "img.png").read_bytes())
    r = run_cli(_command(command, fifo, demo16), cwd=tmp_path, timeout=60)
    assert_one_line_error(r, f"{fifo}: ", "checkpoint is a FIFO, not a regular file")
