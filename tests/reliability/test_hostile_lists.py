"""Hostile images.list files: every malformation is a one-line DataError naming file:line (exit 2
from the CLI), or, for duplicates and Windows line endings, accepted as documented."""
import os

import pytest

from minialex.data import read_list
from minialex.errors import DataError
from minialex.run import read_data
from minialex.train import TrainConfig

from .conftest import FAST, assert_one_line_error, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def _read_for_training(path):
    """What `minialex train -list PATH` does with a list before the first batch."""
    d = read_data(TrainConfig(list_path=str(path)))
    return d.train, d.val, d.class_names, d.lists, d.default_arch


def _error(fn, *args):
    with pytest.raises(DataError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("content, line, words", [
    (PNG_MAGIC + bytes(range(256)), 1, "not UTF-8"),           # an image passed as -list
    (b"0 a.png\n1 b\x00\x01garbage\n", 2, "binary data (NUL byte)"),
    (b"0 a.png\n" + b"7 " + b"x" * 100_000 + b"\n", 2, "longer than 16384 bytes"),
    (b"0 a.png\n-3 b.png\n", 2, "class id -3 is negative"),
    (b"1.5 b.png\n", 1, "not an integer"),
    (b"1e3 b.png\n", 1, "not an integer"),
    (b"0 a.png\n" + b"9" * 5000 + b" b.png\n", 2, "out of range"),
    (b"0 caf\xe9.png\n", 1, "not UTF-8"),
    (b"0 a.png\r1 b.png\r", 1, "old Mac line endings"),
    (b"0 a.png\n0\n", 2, "no image path"),
], ids=["png_as_list", "nul_bytes", "huge_line", "negative_id", "float_id", "exponent_id", "huge_id",
        "latin1", "cr_only", "no_path"])
def test_malformed_lines_name_file_and_line(tmp_path, content, line, words):
    path = tmp_path / "images.list"
    path.write_bytes(content)
    message = _error(read_list, path)
    assert message.startswith(f"{path}:{line}: ") and words in message, message


def test_windows_line_endings_are_accepted(tmp_path, demo16):
    _, samples = demo16
    path = tmp_path / "crlf.list"
    path.write_bytes(b"".join(f"{s.label} {s.path}\r\n".encode() for s in samples[:3]))
    assert [s.path for s in read_list(path)] == [s.path for s in samples[:3]]


def test_missing_image_folder_symlink_loop_and_fifo_are_named_before_training(tmp_path, demo16):
    _, samples = demo16
    good = samples[0].path
    (tmp_path / "folder.png").mkdir()
    os.symlink(tmp_path / "loop_b.png", tmp_path / "loop_a.png")
    os.symlink(tmp_path / "loop_a.png", tmp_path / "loop_b.png")
    os.mkfifo(tmp_path / "pipe.png")
    cases = {"gone.png": "image not found", "folder.png": "is a folder",
             "loop_a.png": "symbolic link loop", "pipe.png": "not a regular file"}
    for name, words in cases.items():
        path = tmp_path / f"{name}.list"
        path.write_text(f"0 {good}\n1 {name}\n")
        message = _error(_read_for_training, path)
        assert message.startswith(f"{path}:2: ") and words in message and name in message, message


def test_list_file_that_is_a_folder_or_a_symlink_loop(tmp_path):
    os.symlink(tmp_path / "b.list", tmp_path / "a.list")
    os.symlink(tmp_path / "a.list", tmp_path / "b.list")
    assert "is a folder" in _error(read_list, tmp_path)
    assert "Too many levels of symbolic links" in _error(read_list, tmp_path / "a.list")


def test_sparse_huge_class_id_is_refused_without_a_labels_file(tmp_path, demo16):
    _, samples = demo16
    path = tmp_path / "typo.list"
    path.write_text(f"0 {samples[0].path}\n99999 {samples[1].path}\n1 {samples[2].path}\n")
    message = _error(_read_for_training, path)
    assert message.startswith(f"{path}:2: ") and "99999 means 100000 classes" in message
    assert "-labels" in message


def test_duplicates_are_kept_with_one_counted_warning(tmp_path, demo16, capsys):
    _, samples = demo16
    a, b = samples[0], samples[1]
    path = tmp_path / "dups.list"
    path.write_text(f"{a.label} {a.path}\n{b.label} {b.path}\n{a.label} {a.path}\n{a.label} {a.path}\n"
                    f"{(b.label + 1) % 10} {b.path}\n")
    train, *_ = _read_for_training(path)
    assert len(train) == 5  # nothing dropped: repeating a line is how an image is weighted
    err = capsys.readouterr().err
    assert f"{path}: 2 line(s) repeat an earlier image (line 3 repeats line 1)" in err
    assert f"{path}:5: image also listed at line 2 with class {b.label}" in err


# -- the same through the command line: one line on stderr, exit 2, nothing written ---------------

@pytest.mark.parametrize("case", ["binary", "sparse_id", "symlink_loop", "non_utf8"])
def test_cli_bad_list_is_one_line_exit_2(tmp_path, demo16, case):
    good = demo16[1][0].path
    lst = tmp_path / "train.list"
    if case == "binary":
        lst.write_bytes(PNG_MAGIC + os.urandom(2000))
        expect = ["train.list:1", "not UTF-8"]
    elif case == "sparse_id":
        lst.write_text(f"0 {good}\n123456 {good}\n")
        expect = ["train.list:2", "123456"]
    elif case == "symlink_loop":
        os.symlink("loop.png", tmp_path / "loop.png")
        lst.write_text(f"0 {good}\n3 loop.png\n")
        expect = ["train.list:2", "symbolic link loop"]
    else:
        lst.write_bytes(f"0 {good}\n".encode() + b"1 \xff\xfe.png\n")
        expect = ["train.list:2", "not UTF-8"]
    r = run_cli(["train", "-list", lst, "-epochs", 1, "-save", "w.npz", *FAST], cwd=tmp_path, timeout=60)
    assert_one_line_error(r, *expect)
    assert sorted(os.listdir(tmp_path)) == sorted([lst.name] + (["loop.png"] if case == "symlink_loop" else []))


def test_cli_trains_on_a_windows_list_with_duplicates(tmp_path, demo16):
    _, samples = demo16
    rows = [f"{s.label} {s.path}\r\n" for s in samples[:8]] + [f"{samples[0].label} {samples[0].path}\r\n"]
    lst = tmp_path / "train.list"
    lst.write_bytes("".join(rows).encode())
    r = run_cli(["train", "-list", lst, "-epochs", 1, "-save", "w.npz", *FAST], cwd=tmp_path, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "1 line(s) repeat an earlier image (line 9 repeats line 1)" in r.stderr
    assert "epoch 1/1" in r.stdout and (tmp_path / "w.npz").exists()


# -- FIFOs: a list, labels file or validation list that is a pipe is refused at once -----------------

@pytest.mark.parametrize("option", ["-list", "-labels", "-val", "eval -list"])
def test_cli_fifo_list_is_refused_without_blocking(tmp_path, demo16, option):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: forever
    if option == "eval -list":
        r = run_cli(["train", "-list", demo16[0], "-epochs", 1, "-save", "w.npz", *FAST], cwd=tmp_path, timeout=90)
        assert r.returncode == 0, r.stderr
        args = ["eval", "-list", fifo, "-load", "w.npz"]
    else:
        args = ["train", "-list", demo16[0], option, fifo, "-epochs", 1, "-save", "w.npz", *FAST]
        if option == "-list":
            args = ["train", "-list", fifo, "-epochs", 1, "-save", "w.npz", *FAST]
    what = "labels file" if option == "-labels" else "list file"
    r = run_cli(args, cwd=tmp_path, timeout=60)
    assert_one_line_error(r, f"{fifo}: {what} is a FIFO, not a regular file")


def test_device_as_a_list_is_refused(tmp_path):
    assert "list file is a device, not a regular file" in _error(read_list, "/dev/zero")
