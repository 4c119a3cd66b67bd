"""The `minialex` command end to end, as users run it: `python -m minialex ...` in a subprocess.

Everything trains the cifar variant for an epoch or two on a few dozen demo images, with one
compute thread (two where that is the point) so that results are reproducible bit for bit.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minialex.checkpoint import HEADER_KEY, load_checkpoint
from minialex.data import demo_dataset, read_list
from helpers import assert_user_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["-arch", "cifar", "-batchsize", "8", "-threads", "1", "-workers", "1", "-seed", "3"]


def minialex(args, cwd, timeout=180, threads=1):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "minialex", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_list(path, samples):
    path.write_text("".join(f"{s.label} {s.path}\n" for s in samples))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    demo = demo_dataset()
    folder = tmp_path_factory.mktemp("cli")
    train = read_list(demo.train_list)[:24]
    val = read_list(demo.test_list)[:16]
    return {"dir": folder, "train": write_list(folder / "train.list", train),
            "val": write_list(folder / "val.list", val), "labels": demo.labels,
            "images": [s.path for s in val[:2]], "samples": train}


@pytest.fixture(scope="module")
def trained(data):
    """One epoch, checkpoint in w.npz (kept pristine in epoch1.npz)."""
    d = data["dir"]
    r = minialex(["train", "-list", data["train"], "-val", data["val"], "-labels", data["labels"],
                  "-epochs", 1, "-save", "w.npz", "-log", "log.jsonl", *COMMON], cwd=d)
    assert r.returncode == 0, r.stderr
    shutil.copy(d / "w.npz", d / "epoch1.npz")
    return r


def test_train_saves_checkpoint_and_log(data, trained):
    d = data["dir"]
    assert "epoch 1/1" in trained.stdout and "top-1" in trained.stdout and "top-5" in trained.stdout
    ckpt = load_checkpoint(d / "w.npz")
    assert ckpt.arch["variant"] == "cifar" and ckpt.arch["num_classes"] == 10
    assert ckpt.class_names[0] == "T-shirt/top" and ckpt.train_state["epoch"] == 1
    assert ckpt.normalization["crop"] == 32 and ckpt.normalization["resize"] == 36
    records = [json.loads(l) for l in (d / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert {"train_loss", "val_top1", "val_top5", "lr", "time", "data_wait", "skipped"} <= set(records[0])
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]


def test_plot_draws_training_curves_and_confusion_matrix(data, trained, tmp_path):
    pytest.importorskip("matplotlib", reason="-plot needs matplotlib, which is optional")
    shutil.copy(data["dir"] / "epoch1.npz", tmp_path / "w.npz")
    r = minialex(["train", "-list", data["train"], "-val", data["val"], "-epochs", 2, "-resume", "w.npz",
                  "-plot", "curves.png", *COMMON], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = minialex(["eval", "-list", data["val"], "-load", "w.npz", "-batchsize", 4, "-plot", "cm.png"],
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "confusion matrix" in r.stdout
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inference_prints_topk_names(data, trained):
    r = minialex(["inference", "-input", *data["images"], "-load", "w.npz", "-topk", 3], cwd=data["dir"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == data["images"][0] and lines[4] == data["images"][1]
    probs = [float(l.split("%")[0]) for l in lines[1:4]]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 100 for p in probs)
    names = load_checkpoint(data["dir"] / "w.npz").class_names
    assert any(n in lines[1] for n in names)


def test_eval_prints_accuracy_and_confusion(data, trained):
    r = minialex(["eval", "--list", data["val"], "-load", "w.npz", "-batchsize", 4], cwd=data["dir"])
    assert r.returncode == 0, r.stderr
    assert "16 images" in r.stdout and "top-1" in r.stdout and "top-5" in r.stdout
    assert "confusion matrix" in r.stdout and "T-shirt/top" in r.stdout


def test_resume_continues_and_matches_a_straight_run_bitwise(data, trained):
    d = data["dir"]
    shutil.copy(d / "epoch1.npz", d / "resumed.npz")
    common = ["-list", data["train"], "-val", data["val"], "-labels", data["labels"], "-epochs", 2]
    r = minialex(["train", *common, "-resume", "resumed.npz", *COMMON], cwd=d)
    assert r.returncode == 0, r.stderr
    assert "epoch 2/2" in r.stdout and "epoch 1/2" not in r.stdout
    # Double-dash spellings work the same as single-dash ones.
    s = minialex(["train", *common, "--save", "straight.npz", *[a.replace("-", "--", 1) if a.startswith("-")
                                                               else a for a in COMMON]], cwd=d)
    assert s.returncode == 0, s.stderr
    resumed, straight = load_checkpoint(d / "resumed.npz"), load_checkpoint(d / "straight.npz")
    assert resumed.train_state["epoch"] == straight.train_state["epoch"] == 2
    assert len(resumed.train_state["history"]) == 2
    for k, v in straight.state_dict.items():
        assert np.array_equal(resumed.state_dict[k], v), k
    momentum = straight.optimizer_state["state"]
    assert momentum and all(np.array_equal(resumed.optimizer_state["state"][i]["momentum_buffer"],
                                           s["momentum_buffer"]) for i, s in momentum.items())
    assert resumed.train_state["rng"] == straight.train_state["rng"]


def test_resume_matches_a_straight_run_bitwise_with_two_threads(data, tmp_path):
    """Bit-exact resume holds for any fixed thread count, not only one: Numba's static split
    gives each thread the same share of every loop in both runs."""
    two = [*COMMON[:COMMON.index("-threads")], "-threads", "2", *COMMON[COMMON.index("-threads") + 2:]]
    common = ["-list", data["train"], "-val", data["val"], "-labels", data["labels"], *two]
    first = minialex(["train", *common, "-epochs", 1, "-save", "resumed.npz"], cwd=tmp_path, threads=2)
    assert first.returncode == 0, first.stderr
    resumed = minialex(["train", *common, "-epochs", 2, "-resume", "resumed.npz"], cwd=tmp_path, threads=2)
    assert resumed.returncode == 0, resumed.stderr
    straight = minialex(["train", *common, "-epochs", 2, "-save", "straight.npz"], cwd=tmp_path, threads=2)
    assert straight.returncode == 0, straight.stderr
    a, b = load_checkpoint(tmp_path / "resumed.npz"), load_checkpoint(tmp_path / "straight.npz")
    assert a.train_state["epoch"] == b.train_state["epoch"] == 2
    for k, v in b.state_dict.items():
        assert np.array_equal(a.state_dict[k], v), k
    for i, s in b.optimizer_state["state"].items():
        assert np.array_equal(a.optimizer_state["state"][i]["momentum_buffer"], s["momentum_buffer"]), i


def _log(folder, name):
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


@pytest.mark.parametrize("option", [["-label_smoothing", "0.3"], ["-pca"]])
def test_label_smoothing_and_pca_change_training(data, tmp_path, option):
    """Same seed, one epoch with and without the option: the training loss (label smoothing
    changes the loss itself, -pca the colours of every augmented image) and so the weights differ,
    and the checkpoint records the option for -resume."""
    common = ["-list", data["train"], "-labels", data["labels"], "-epochs", 1, *COMMON]
    plain = minialex(["train", *common, "-save", "plain.npz", "-log", "plain.jsonl"], cwd=tmp_path)
    other = minialex(["train", *common, *option, "-save", "other.npz", "-log", "other.jsonl"], cwd=tmp_path)
    assert plain.returncode == 0 and other.returncode == 0, (plain.stderr, other.stderr)
    assert _log(tmp_path, "plain.jsonl")[0]["train_loss"] != _log(tmp_path, "other.jsonl")[0]["train_loss"]
    a, b = load_checkpoint(tmp_path / "plain.npz"), load_checkpoint(tmp_path / "other.npz")
    assert not np.array_equal(a.state_dict["features.0.weight"], b.state_dict["features.0.weight"])
    config = b.train_state["config"]
    if option[0] == "-pca":
        assert config["pca"] is True and a.train_state["config"]["pca"] is False
    else:
        assert config["label_smoothing"] == 0.3 and a.train_state["config"]["label_smoothing"] == 0.0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_exits(data, tmp_path, sig, code):
    env = dict(os.environ, NUMBA_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "minialex", "train", "-list", str(data["train"]),
                             "-epochs", "100", "-save", "w.npz", *COMMON], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the first epoch's line: training is under way
        assert line.startswith("epoch 1/100"), (line, proc.stderr.read() if proc.poll() is not None else "")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err and "saved w.npz" in err
    state = load_checkpoint(tmp_path / "w.npz").train_state
    assert state["epoch"] >= 1


def test_nan_guard_stops_and_keeps_last_good_checkpoint(data, trained, tmp_path):
    shutil.copy(data["dir"] / "epoch1.npz", tmp_path / "w.npz")
    before = (tmp_path / "w.npz").read_bytes()
    r = minialex(["train", "-list", data["train"], "-epochs", 1, "-lr", "1e12", "-save", "w.npz", *COMMON],
                 cwd=tmp_path)
    message = assert_user_error(r, "at epoch 1, batch", "lower learning rate", "w.npz")
    assert "nan" in message or "inf" in message
    assert (tmp_path / "w.npz").read_bytes() == before
    assert os.listdir(tmp_path) == ["w.npz"]


def _jpeg_bytes():
    buf = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    import io
    out = io.BytesIO()
    Image.fromarray(buf).save(out, "JPEG")
    return out.getvalue()


@pytest.mark.parametrize("case", ["missing_image", "corrupt_jpeg", "text_png", "id_out_of_range",
                                  "id_not_integer", "empty_list", "no_path"])
def test_bad_training_input_is_one_line_and_no_checkpoint(data, tmp_path, case):
    good = "".join(f"{s.label} {s.path}\n" for s in data["samples"][:6])
    lst = tmp_path / "train.list"
    extra = []
    if case == "missing_image":
        lst.write_text(good + f"1 {tmp_path / 'gone.png'}\n")
        expect = ["train.list:7", "image not found", "gone.png"]
    elif case == "corrupt_jpeg":
        (tmp_path / "broken.jpeg").write_bytes(_jpeg_bytes()[:300])
        lst.write_text(good + "1 broken.jpeg\n")
        expect = ["train.list:7", "broken.jpeg"]
    elif case == "text_png":
        (tmp_path / "notes.png").write_text("this is a text file\n")
        lst.write_text("2 notes.png\n" + good)
        expect = ["train.list:1", "notes.png", "not an image"]
    elif case == "id_out_of_range":
        lst.write_text(good + f"12 {data['samples'][0].path}\n")
        extra = ["-labels", data["labels"]]
        expect = ["train.list:7", "class id 12 is out of range"]
    elif case == "id_not_integer":
        lst.write_text(f"cat {data['samples'][0].path}\n" + good)
        expect = ["train.list:1", "not an integer"]
    elif case == "empty_list":
        lst.write_text("# nothing here\n\n")
        expect = ["train.list", "empty"]
    else:
        lst.write_text(good + "4\n")
        expect = ["train.list:7", "no image path"]
    r = minialex(["train", "-list", lst, "-epochs", 1, "-save", "w.npz", *extra, *COMMON], cwd=tmp_path)
    assert_user_error(r, *expect)
    assert not (tmp_path / "w.npz").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize("case", ["missing", "not_npz", "other_arch", "folder_input", "missing_input"])
def test_bad_inference_input_is_one_line(data, trained, tmp_path, case):
    weights, inputs = data["dir"] / "w.npz", list(data["images"])
    if case == "missing":
        weights, expect = tmp_path / "nope.npz", ["nope.npz", "checkpoint not found"]
    elif case == "not_npz":
        weights = tmp_path / "weights.npz"
        weights.write_text("not weights")
        expect = ["weights.npz", "not a readable"]
    elif case == "other_arch":
        with np.load(data["dir"] / "w.npz") as z:
            arrays = {n: z[n] for n in z.files}
        header = json.loads(arrays[HEADER_KEY].tobytes())
        header["arch"]["batch_norm"] = True
        arrays[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        weights = tmp_path / "bn.npz"
        np.savez(weights, **arrays)
        expect = ["bn.npz", "another architecture", "missing keys"]
    elif case == "folder_input":
        inputs, expect = [tmp_path], [str(tmp_path), "is a folder"]
    else:
        inputs, expect = [tmp_path / "no.jpeg"], ["no.jpeg", "image not found"]
    r = minialex(["inference", "-input", *inputs, "-load", weights], cwd=tmp_path)
    assert_user_error(r, *expect)
    assert r.stdout == ""


def test_usage_errors_and_help(tmp_path):
    r = minialex(["train", "-batchsize", "0"], cwd=tmp_path)
    assert_user_error(r, "-batchsize", "minialex train -h")
    for command in (["train"], ["inference"], ["eval"], ["summary"], ["prepare", "folder"]):
        h = minialex([*command, "-h"], cwd=tmp_path)
        assert h.returncode == 0 and "usage: minialex" in h.stdout
    s = minialex(["summary", "-arch", "cifar", "-classes", "10"], cwd=tmp_path)
    assert s.returncode == 0 and "classifier.6" in s.stdout


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`minialex summary | head -1`: the pipe closes before the table is written; the command
    stops with the status a shell gives a tool SIGPIPE ended, and nothing on stderr."""
    from minialex.cli import EXIT_BROKEN_PIPE
    p = subprocess.Popen([sys.executable, "-m", "minialex", "summary", "-arch", "cifar", "-classes", "10"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == EXIT_BROKEN_PIPE and err == ""
