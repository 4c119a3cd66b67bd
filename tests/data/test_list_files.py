import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minialex.data import read_dataset, read_labels, read_list
from minialex.data.listfile import MAX_CLASS_NAME_CHARS, MAX_LINE_BYTES, Sample
from minialex.errors import DataError


def write(tmp_path, content, name="images.list"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_parses_ids_and_paths_with_spaces_comments_and_blank_lines(tmp_path):
    path = write(tmp_path, "# header\n\n0 a.png\n  \n2\tsub dir/my photo 1.jpg  \n1 /abs/x.png\n"
                           "   # indented comment\n")
    samples = read_list(path)
    assert [s.label for s in samples] == [0, 2, 1]
    assert samples[0].path == os.path.join(str(tmp_path), "a.png")
    assert samples[1].path == os.path.join(str(tmp_path), "sub dir/my photo 1.jpg")
    assert samples[2].path == "/abs/x.png"
    assert [s.line for s in samples] == [3, 5, 6]


def test_relative_paths_resolve_against_the_list_folder_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "lists").mkdir()
    path = write(tmp_path, "0 ../img/a.png\n", "lists/train.list")
    monkeypatch.chdir("/")
    assert read_list(path)[0].path == os.path.join(str(tmp_path), "lists", "../img/a.png")


def test_windows_line_endings_and_byte_order_mark(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf0 a.png\r\n1 b c.png\r\n")
    samples = read_list(path)
    assert [(s.label, os.path.basename(s.path)) for s in samples] == [(0, "a.png"), (1, "b c.png")]


def test_unicode_paths(tmp_path):
    samples = read_list(write(tmp_path, "0 日本/猫 ü.jpg\n"))
    assert samples[0].path.endswith("日本/猫 ü.jpg")


@pytest.mark.parametrize("content, line, words", [
    ("0 a.png\nx b.png\n", 2, "not an integer"),
    ("0 a.png\n1.5 b.png\n", 2, "not an integer"),
    ("-1 a.png\n", 1, "negative"),
    ("0 a.png\n7\n", 2, "no image path"),
    ("0 a.png\n7   \t \n", 2, "no image path"),
    ("0 a.png\n99999999999999999999999 b.png\n", 2, "out of range"),
    ("0 a.png\n1\x0cb.png\n", 2, "control character"),
    ("0 a.png\r1 b.png\r", 1, "old Mac line endings"),
    (b"0 a.png\n1 caf\xe9.png\n", 2, "not UTF-8"),
    (b"0 a.png\n\x89PNG\x00\x00\x1a\n", 2, "binary"),
])
def test_bad_lines_name_file_and_line(tmp_path, content, line, words):
    path = write(tmp_path, content)
    message = error_of(read_list, path)
    assert message.startswith(f"{path}:{line}: ")
    assert words in message


def test_ids_must_be_below_the_number_of_classes(tmp_path):
    path = write(tmp_path, "0 a.png\n3 b.png\n")
    message = error_of(read_list, path, num_classes=3)
    assert message.startswith(f"{path}:2: ") and "out of range" in message and "0..2" in message
    assert len(read_list(path, num_classes=4)) == 2


def test_absurdly_long_line(tmp_path):
    path = write(tmp_path, "0 a.png\n1 " + "x" * (MAX_LINE_BYTES + 10) + "\n")
    assert error_of(read_list, path).startswith(f"{path}:2: line longer than")


def test_long_line_without_newline_at_end_of_file(tmp_path):
    path = write(tmp_path, "1 " + "x" * (3 * MAX_LINE_BYTES))
    assert error_of(read_list, path).startswith(f"{path}:1: line longer than")


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n", "\ufeff\r\n"])
def test_empty_list(tmp_path, content):
    path = write(tmp_path, content)
    assert error_of(read_list, path) == f"{path}: the list is empty (no 'class_id image_path' lines)"


def test_missing_list_and_folder_instead_of_list(tmp_path):
    missing = str(tmp_path / "nope.list")
    assert error_of(read_list, missing) == f"{missing}: list file not found"
    assert "is a folder" in error_of(read_list, str(tmp_path))


def test_labels_file_names_classes_and_bounds_ids(tmp_path):
    labels = write(tmp_path, "# id name\n1 ankle boot\r\n0 T-shirt/top\n2 bag\n", "labels.txt")
    assert read_labels(labels) == ["T-shirt/top", "ankle boot", "bag"]
    good = write(tmp_path, "0 a.png\n1 b.png\n")
    samples, names = read_dataset(good, labels)
    assert len(samples) == 2 and names == ["T-shirt/top", "ankle boot", "bag"]
    bad = write(tmp_path, "0 a.png\n3 b.png\n", "bad.list")
    assert error_of(read_dataset, bad, labels).startswith(f"{bad}:2: class id 3 is out of range")


def test_without_labels_classes_are_numbered_up_to_the_largest_id(tmp_path):
    samples, names = read_dataset(write(tmp_path, "2 a.png\n0 b.png\n"))
    assert names == ["class_0", "class_1", "class_2"]
    _, names = read_dataset(write(tmp_path, "0 a.png\n", "test.list"), num_classes=4)
    assert names == ["class_0", "class_1", "class_2", "class_3"]


@pytest.mark.parametrize("content, words", [
    ("0 a\n0 b\n", "named twice"),
    ("0 a\n2 c\n", "no name for 1"),
    ("0 a\n1\n", "no class name"),
    ("zero a\n", "not an integer"),
    ("", "empty"),
])
def test_bad_labels_files(tmp_path, content, words):
    path = write(tmp_path, content, "labels.txt")
    message = error_of(read_labels, path)
    assert message.startswith(path + ":") and words in message


def test_labels_file_size_must_match_a_given_class_count(tmp_path):
    labels = write(tmp_path, "0 a\n1 b\n", "labels.txt")
    lst = write(tmp_path, "0 x.png\n")
    assert "names 2 classes but the model has 5" in error_of(read_dataset, lst, labels, num_classes=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(
    st.binary(max_size=300),
    st.lists(st.tuples(st.sampled_from(["0", "1", "12", "-3", "x", "", "#", "007", "1e3", "٣"]),
                       st.sampled_from([" ", "\t", "", "  "]),
                       st.text(max_size=20),
                       st.sampled_from(["\n", "\r\n", "\r", ""])),
             max_size=8).map(lambda rows: "".join("".join(r) for r in rows).encode("utf-8", "surrogatepass")),
))
def test_fuzz_any_bytes_give_samples_or_a_data_error(tmp_path, content):
    path = write(tmp_path, content, "fuzz.list")
    try:
        samples = read_list(path)
    except DataError as e:
        message = str(e)
        assert message.startswith(path) and "\n" not in message
        return
    assert samples
    for s in samples:
        assert s.label >= 0 and s.line >= 1 and os.path.isabs(s.path)
        assert not s.path.endswith((" ", "\t"))
        assert not any(c in s.path for c in "\0\r\n")


def test_class_names_longer_than_a_checkpoint_keeps_are_refused(tmp_path):
    path = write(tmp_path, "0 a\n1 " + "b" * (MAX_CLASS_NAME_CHARS + 1) + "\n", "labels.txt")
    assert error_of(read_labels, path).startswith(f"{path}:2: class name of {MAX_CLASS_NAME_CHARS + 1} characters")


def test_fifo_list_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.list")
    assert error_of(read_list, str(tmp_path / "pipe.list")).endswith("list file is a FIFO, not a regular file")
    assert error_of(read_labels, str(tmp_path / "pipe.list")).endswith("labels file is a FIFO, not a regular file")


def test_samples_carry_their_list_file():
    assert Sample(0, "a.png", 3, "x.list").where("bad") == "x.list:3: bad"
    assert Sample(0, "a.png", 3).where("bad") == "bad"
