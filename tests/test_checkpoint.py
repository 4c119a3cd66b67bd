"""Checkpoints: exact round trip, atomic writes, and a clear CheckpointError for every bad file."""
import json
import os
import zipfile

import numpy as np
import pytest

import minialex
from minialex import checkpoint, models, optim
from minialex.checkpoint import (FORMAT_VERSION, HEADER_KEY, CheckpointError, load_checkpoint,
                                 load_weights, model_from_checkpoint, save_checkpoint)
from minialex.data.transforms import IMAGENET_EIGVAL, IMAGENET_EIGVEC

ARCH = {"variant": "cifar", "num_classes": 3, "batch_norm": True, "input_size": 32}
NORM = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "resize": 36, "crop": 32}
NAMES = ["cat", "dog", "bird"]


def _trained_state():
    """A cifar+BN model after one SGD-with-momentum step, with a StepLR and a used Generator."""
    minialex.manual_seed(1)
    model = models.alexnet(num_classes=3, variant="cifar", batch_norm=True)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    loss_fn = minialex.nn.CrossEntropyLoss()
    model.train()
    loss_fn(model(x), np.array([0, 2]))
    model.backward(loss_fn.backward())
    opt.step()
    sched.step()
    minialex.get_generator().random(3)
    train_state = {"epoch": 4, "history": [{"epoch": 1, "val_top1": 0.5, "val_loss": None}],
                   "rng": minialex.get_generator().bit_generator.state, "best_val_top1": 0.5}
    return model, opt, sched, train_state


def _save(path, model, opt=None, sched=None, train_state=None):
    save_checkpoint(path, model, arch=ARCH, class_names=NAMES, normalization=NORM, optimizer=opt,
                    scheduler=sched, train_state=train_state)


def test_round_trip_restores_everything_exactly(tmp_path):
    model, opt, sched, ts = _trained_state()
    path = tmp_path / "w.npz"
    _save(path, model, opt, sched, ts)
    ckpt = load_checkpoint(path)
    assert ckpt.version == FORMAT_VERSION
    # A normalisation saved without PCA components reads back with ImageNet's, the old default.
    assert ckpt.arch == models.Arch.from_dict(ARCH).to_dict() and ckpt.class_names == NAMES
    assert ckpt.normalization == dict(NORM, pca_eigval=list(IMAGENET_EIGVAL),
                                      pca_eigvec=[list(r) for r in IMAGENET_EIGVEC])
    assert list(ckpt.state_dict) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert ckpt.state_dict[k].dtype == v.dtype and np.array_equal(ckpt.state_dict[k], v), k
    # PCG64's 128-bit state ints survive exactly, so the Generator continues the same stream.
    assert ckpt.train_state["rng"] == ts["rng"]
    assert ckpt.train_state["history"] == ts["history"] and ckpt.train_state["epoch"] == 4

    rebuilt = model_from_checkpoint(ckpt)
    assert not rebuilt.training
    opt2 = optim.SGD(rebuilt.parameters(), lr=1.0, momentum=0.9, weight_decay=1e-4)
    sched2 = optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    opt2.load_state_dict(ckpt.optimizer_state)
    sched2.load_state_dict(ckpt.scheduler_state)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.05
    assert sched2.state_dict() == sched.state_dict()
    for i, s in opt.state.items():
        assert np.array_equal(opt2.state[i]["momentum_buffer"], s["momentum_buffer"])


def test_header_is_json_not_pickle(tmp_path):
    model, opt, sched, ts = _trained_state()
    path = tmp_path / "w.npz"
    _save(path, model, opt, sched, ts)
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(z[HEADER_KEY].tobytes().decode("utf-8"))
        names = set(z.files)
    assert header["format_version"] == FORMAT_VERSION
    assert any(n.startswith("model/features.0.weight") for n in names)
    assert any(n.startswith("optim/") for n in names)


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, opt, sched, ts = _trained_state()
    path = tmp_path / "w.npz"
    _save(path, model, opt, sched, ts)
    before = path.read_bytes()

    def disk_full(fileobj, arrays):
        fileobj.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_arrays", disk_full)
    with pytest.raises(CheckpointError, match=r"w\.npz: cannot write checkpoint: No space left"):
        _save(path, model, opt, sched, ts)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["w.npz"]  # the temporary file is gone too


def test_interrupted_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, _, _, _ = _trained_state()
    path = tmp_path / "w.npz"
    _save(path, model)
    before = path.read_bytes()

    def ctrl_c(fileobj, arrays):
        fileobj.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write_arrays", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _save(path, model)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.npz"]


def test_unwritable_target_folder(tmp_path):
    model, _, _, _ = _trained_state()
    with pytest.raises(CheckpointError, match="nofolder"):
        _save(tmp_path / "nofolder" / "w.npz", model)


def _one_line(e):
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("kind", ["missing", "folder", "truncated", "text", "pickled", "npy",
                                  "no_header", "newer", "bad_header"])
def test_bad_files_give_checkpoint_error_naming_the_file(tmp_path, kind):
    model, opt, sched, ts = _trained_state()
    good = tmp_path / "good.npz"
    _save(good, model, opt, sched, ts)
    path = tmp_path / f"{kind}.npz"
    expect = {"missing": "checkpoint not found", "folder": "is a folder", "truncated": "truncated or corrupt",
              "text": "not a readable", "pickled": "pickled", "npy": "single .npy",
              "no_header": "not a minialex checkpoint", "newer": "newer minialex",
              "bad_header": "damaged checkpoint header"}[kind]
    if kind == "folder":
        path.mkdir()
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "pickled":
        np.savez(path, weights=np.array([{"a": 1}], dtype=object))
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "no_header":
        np.savez(path, **{"features.0.weight": np.zeros(3)})
    elif kind in ("newer", "bad_header"):
        with np.load(good) as z:
            arrays = {n: z[n] for n in z.files}
        header = json.loads(arrays[HEADER_KEY].tobytes())
        header["format_version"] = FORMAT_VERSION + 1
        text = json.dumps(header) if kind == "newer" else "{not json"
        arrays[HEADER_KEY] = np.frombuffer(text.encode(), dtype=np.uint8)
        np.savez(path, **arrays)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = _one_line(e)
    assert str(path) in message and expect in message


def test_weights_of_another_architecture_list_the_mismatch(tmp_path):
    model, _, _, _ = _trained_state()
    path = tmp_path / "w.npz"
    _save(path, model)
    ckpt = load_checkpoint(path)
    ckpt.arch = dict(ckpt.arch, batch_norm=False)  # as if saved for the plain cifar model
    with pytest.raises(CheckpointError) as e:
        model_from_checkpoint(ckpt)
    message = _one_line(e)
    assert "w.npz" in message and "another architecture" in message and "unexpected keys" in message


def test_load_weights_reads_plain_state_dict_npz(tmp_path):
    model, _, _, _ = _trained_state()
    path = tmp_path / "sd.npz"
    np.savez(path, **model.state_dict())
    state, ckpt = load_weights(path)
    assert ckpt is None
    assert np.array_equal(state["classifier.6.weight"], model.state_dict()["classifier.6.weight"])


def test_zip_member_damage_is_reported(tmp_path):
    model, _, _, _ = _trained_state()
    path = tmp_path / "w.npz"
    _save(path, model)
    data = bytearray(path.read_bytes())
    # Flip bytes in the middle of the first member's data: the zip CRC check must catch it.
    with zipfile.ZipFile(path) as z:
        info = z.infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 200
    data[start:start + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "w.npz" in _one_line(e)


def test_pca_components_round_trip_and_are_validated(tmp_path):
    model, _, _, _ = _trained_state()
    eigval = [0.1, 0.02, 0.003]
    eigvec = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))[0]
    path = tmp_path / "w.npz"
    save_checkpoint(path, model, arch=ARCH, class_names=NAMES,
                    normalization=dict(NORM, pca_eigval=eigval, pca_eigvec=eigvec))  # an array member
    norm = load_checkpoint(path).normalization
    assert norm["pca_eigval"] == eigval and np.array_equal(norm["pca_eigvec"], eigvec)
    for bad in (dict(pca_eigval=[0.1, 0.2]), dict(pca_eigval=[0.1, -0.2, 0.3]),
                dict(pca_eigvec=np.full((3, 3), np.nan)), dict(pca_eigvec=np.zeros((3, 4)))):
        save_checkpoint(path, model, arch=ARCH, class_names=NAMES, normalization=dict(NORM, **bad))
        with pytest.raises(CheckpointError, match=r"w\.npz: damaged checkpoint header: normalization\.pca_eig"):
            load_checkpoint(path)


def test_fifo_and_device_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.npz")
    for path, what in ((tmp_path / "pipe.npz", "a FIFO"), ("/dev/zero", "a device")):
        for load in (load_checkpoint, load_weights):
            with pytest.raises(CheckpointError, match=f"checkpoint is {what}, not a regular file"):
                load(path)
