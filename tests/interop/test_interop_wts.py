"""TensorRT .wts export: tensorrtx's text format, read back bit for bit."""
import struct
from collections import OrderedDict

import numpy as np
import pytest

import minialex
from minialex import models
from minialex.errors import CheckpointError
from minialex.interop.wts import read_wts, write_wts


def test_state_dict_round_trips_bit_for_bit(tmp_path):
    minialex.manual_seed(0)
    state = models.alexnet(num_classes=10, variant="cifar", batch_norm=True).state_dict()
    state["features.1.running_var"][:3] = [np.float32(1e-38), -0.0, np.float32(3.4e38)]
    path = tmp_path / "alexnet.wts"
    write_wts(state, path)
    back = read_wts(path)
    assert list(back) == list(state)   # every entry, in state_dict order, torchvision names
    for key, value in state.items():
        expected = np.asarray(value, dtype=np.float32).reshape(-1)
        assert back[key].dtype == np.float32
        np.testing.assert_array_equal(back[key].view(np.uint32), expected.view(np.uint32), err_msg=key)


def test_layout_is_what_tensorrtx_reads(tmp_path):
    values = np.array([1.0, -2.5, 0.1], np.float32)
    path = tmp_path / "small.wts"
    write_wts(OrderedDict([("features.0.weight", values.reshape(1, 3)), ("features.0.bias", np.zeros(0))]), path)
    lines = path.read_text().splitlines()
    assert lines[0] == "2"
    # gen_wts.py: struct.pack('>f', v).hex() per value, after the name and the count.
    assert lines[1] == "features.0.weight 3 " + " ".join(struct.pack(">f", float(v)).hex() for v in values)
    assert lines[1].split()[2:4] == ["3f800000", "c0200000"]
    assert lines[2] == "features.0.bias 0"


def test_reads_gen_wts_spacing_and_upper_case(tmp_path):
    path = tmp_path / "gen.wts"
    # gen_wts.py writes '{} {} ' then ' ' before each value: two spaces after the count.
    path.write_text("1\nconv1.weight 2  3F800000  40490fdb\n")
    np.testing.assert_array_equal(read_wts(path)["conv1.weight"], np.array([1.0, np.float32(3.1415927)], np.float32))


@pytest.mark.parametrize("content,message", [
    ("", r":1: first line must be the number of tensors"),
    ("2\na 1 3f800000\n", r": header says 2 tensors, found 1"),
    ("1\na 2 3f800000\n", r":2: expected 2 values, found 1"),
    ("1\na 1 3f80000g\n", r":2: values must be 8 hex digits"),
    ("1\na 1 3f8000\n", r":2: values must be 8 hex digits"),
    ("1\na x 3f800000\n", r":2: expected 'name count hex \.\.\.'"),
    ("2\na 1 3f800000\na 1 3f800000\n", r":3: tensor 'a' appears twice"),
])
def test_bad_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.wts"
    path.write_text(content)
    with pytest.raises(CheckpointError, match=message):
        read_wts(path)


@pytest.mark.parametrize("name", ["a b", "a\nb", "a\tb", "a\x1b[2Jb", "a\x00b", "", "a\u2028b"])
def test_names_that_break_the_line_format_cannot_be_written(tmp_path, name):
    with pytest.raises(CheckpointError, match="cannot be written to a .wts file") as err:
        write_wts({"ok": np.zeros(1), name: np.zeros(1)}, tmp_path / "x.wts")
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)
    assert not (tmp_path / "x.wts").exists()


@pytest.mark.parametrize("value,message", [
    (np.array([1 + 2j], np.complex64), "complex64; a .wts file holds float32 only"),
    (np.array(["a"]), "<U1; a .wts file holds float32 only"),
    (np.array([1e300]), "beyond float32's range"),
    (np.array([np.nan], np.float32), "NaN or inf"),
])
def test_values_float32_cannot_hold_are_refused(tmp_path, value, message):
    with pytest.raises(CheckpointError, match=message):
        write_wts({"w": np.zeros(2), "v": value}, tmp_path / "x.wts")
    assert not (tmp_path / "x.wts").exists()


def test_integers_and_booleans_are_written_as_float32(tmp_path):
    write_wts({"n": np.array([7], np.int64), "b": np.array([True, False])}, tmp_path / "x.wts")
    back = read_wts(tmp_path / "x.wts")
    assert back["n"].tolist() == [7.0] and back["b"].tolist() == [1.0, 0.0]
